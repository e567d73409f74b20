"""What routing costs a stop, on this host: `.venv/bin/python benchmarks/routed_latency.py [--trials 30]`.

Two real `deadstop serve` processes (as two nodes would run them), one session on the second, stopped again and
again (the run restarted between trials, untimed) by:

* `direct`: a Client connected to the owning daemon,
* `routed, owner known`: a RoutedClient that has the owner cached (StaticOwners),
* `routed, owner asked`: the same, with the cache dropped before each stop (it asks both daemons first),
* `routed, Lease read`: a RoutedClient over LeaseOwners(owners_ttl=0), reading the session's Lease at each stop
  (the daemons' Leases are listed at most every 5 s) through the real `kubernetes` client from a stand-in API
  server on 127.0.0.1 (tests/test_routed.py),
* `routed, Lease kept`: the same with LeaseOwners' default, the owner read kept for 30 s,

and, as floors, one `sessions.show` round trip and one Lease read alone.

Times are client call -> reply with the stop report, medians and 90th percentiles of interleaved trials.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The two-daemon fixture and the stand-in Lease API server are the tests' own.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from daemonctl import Daemon, Ready  # noqa: E402
from test_routed import CONFIG, LeaseApiStandIn, _api_client  # noqa: E402

from deadstop.supervisor.client import Client, RoutedClient, StaticOwners  # noqa: E402


_shows: dict[str, Client] = {}


def starter_show(where: str, key: str) -> None:
    client = _shows.get(where) or _shows.setdefault(where, Client(where))
    client.session(key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ds-routed-"))
    work = root / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    nodes: dict[str, Daemon] = {}
    api = None
    try:
        for name in ("a", "b"):
            (root / name).mkdir()
            nodes[name] = Daemon(root / name, CONFIG, work).start()
        ready = Ready(work)
        spec = [f"{name}={d.runtime}" for name, d in nodes.items()]
        key = "bench"
        ways: dict[str, object] = {"direct": Client(nodes["b"].runtime), "routed, owner known": RoutedClient(spec),
                                   "routed, owner asked": RoutedClient(StaticOwners(spec))}
        try:
            from deadstop.supervisor.client import LeaseOwners

            api = LeaseApiStandIn()
            leases = LeaseOwners("deadstop", api_client=_api_client(api.url), owners_ttl=0)
            for name, d in nodes.items():
                leases.announce(name, d.runtime)
            leases.record(key, "b")
            ways["routed, Lease read"] = RoutedClient(leases)
            ways["routed, Lease kept"] = RoutedClient(LeaseOwners("deadstop", api_client=_api_client(api.url)))
        except ImportError:
            print("(no `kubernetes` package: the Lease backend is not measured)")
        with Client(nodes["b"].runtime) as starter:
            samples: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(args.trials):
                for way, client in ways.items():
                    starter.send(key, {"ready": ready.path}, agent="sleeper")
                    ready.wait(1)
                    if way == "routed, owner asked":
                        client.owners.forget(key)  # type: ignore[attr-defined]
                    t0 = time.perf_counter_ns()
                    reply = client.stop(key)  # type: ignore[attr-defined]
                    samples[way].append((time.perf_counter_ns() - t0) / 1e6)
                    assert reply.reports and reply.reports[0]["survivors"] == 0, reply
        direct = statistics.median(samples["direct"])
        print(f"stop of one session, {args.trials} trials each, interleaved (load average {os.getloadavg()[0]:.1f})")
        print(f"{'way':<24} {'p50 ms':>8} {'p90 ms':>8} {'p50 - direct':>13}")
        for way, values in samples.items():
            values.sort()
            p50, p90 = statistics.median(values), values[int(len(values) * 0.9) - 1]
            print(f"{way:<24} {p50:>8.2f} {p90:>8.2f} {p50 - direct:>+12.2f}")
        floors = {"one sessions.show, direct": lambda: starter_show(nodes["b"].runtime, key)}
        if "routed, Lease read" in ways:
            floors["one Lease read (kubernetes client)"] = lambda: leases.refresh(key)
        for what, fn in floors.items():
            fn()
            t0 = time.perf_counter_ns()
            for _ in range(200):
                fn()
            print(f"floor: {what:<34} {(time.perf_counter_ns() - t0) / 200 / 1e6:.2f} ms")
        for client in ways.values():
            client.close()  # type: ignore[attr-defined]
        ready.close()
        for c in _shows.values():
            c.close()
    finally:
        for d in nodes.values():
            d.stop()
        if api is not None:
            api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
