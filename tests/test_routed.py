"""Many daemons behind one RoutedClient: two real `deadstop serve` processes on this host stand in for two nodes,
each with its own runtime and state directories. What a stop leaves alive is read from /proc (procscan).

The Kubernetes backend is driven through the real `kubernetes` client against `LeaseApiStandIn`, a stand-in
for the API server that this test starts on 127.0.0.1 (the Lease endpoints only, with its resourceVersion
conflict semantics): there is no cluster here.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from daemonctl import SLEEPER_CONFIG, Daemon, Ready
from deadstop.ipc.control import ControlFault, Fault
from deadstop.supervisor.client import RoutedClient, StaticOwners
from deadstop.supervisor.client.owners import rendezvous
from procscan import marked_processes

CONFIG = SLEEPER_CONFIG


@pytest.fixture
def nodes(tmp_path, workspace):
    """Two daemons, `a` and `b`, as two nodes would run them; both stopped in the end, whatever happened."""
    started: list[Daemon] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            started.append(Daemon(tmp_path / name, CONFIG, workspace).start())
        yield dict(zip("ab", started))
    finally:
        for d in started:
            assert d.stop() == 0, d.output()


def _spec(nodes: dict[str, Daemon]) -> str:
    return ",".join(f"{name}={d.runtime}" for name, d in nodes.items())


def _msg(ready: Ready) -> dict:
    return {"ready": ready.path}


def _key_for(daemon: str, names: list[str], prefix: str) -> str:
    """A session key whose rendezvous daemon is `daemon`."""
    return next(k for k in (f"{prefix}-{i}" for i in range(1000)) if rendezvous(k, names) == daemon)


def test_the_router_merges_every_list_and_sends_each_verb_to_the_owner(nodes, ready) -> None:
    a, b = nodes["a"], nodes["b"]
    with a.client() as ca, b.client() as cb:
        ca.send("on-a", _msg(ready), agent="sleeper")  # started on the nodes directly: the router must find them
        cb.send("on-b", _msg(ready), agent="sleeper")
        ready.wait(2)
        run_b = cb.session("on-b").active_run

    table = a.cli("sessions", "list", "--daemons", _spec(nodes))
    assert table.returncode == 0 and table.stderr == "", table
    head, *rows = table.stdout.splitlines()
    assert head.split()[:3] == ["KEY", "DAEMON", "STATE"]
    assert sorted(tuple(r.split()[:3]) for r in rows) == [("on-a", "a", "running"), ("on-b", "b", "running")]
    merged = json.loads(a.cli("sessions", "list", "--daemons", _spec(nodes), "--json").stdout)
    assert merged["unreachable"] == {}
    assert sorted((s["key"], s["daemon"]) for s in merged["result"]) == [("on-a", "a"), ("on-b", "b")]

    # The stop goes through the router (a fresh process: it asks both daemons who has the key) to b.
    out = a.cli("sessions", "stop", "on-b", "--daemons", _spec(nodes), "--json")
    assert out.returncode == 0, out.stderr
    (report,) = json.loads(out.stdout)["reports"]
    assert report["run_id"] == run_b and report["survivors"] == 0 and report["revoke_source"] == "cli"
    assert marked_processes(run_b) == {}, "the routed stop returned with a process of the run alive"
    with b.client() as cb:
        assert cb.session("on-b").state == "idle"

    with RoutedClient(StaticOwners(_spec(nodes).split(",")), name="router") as router:
        assert router.session("on-a").state == "running" and router.owner_of("on-a") == "a"
        # New keys go to their rendezvous daemon, and nowhere else.
        fresh = {name: _key_for(name, ["a", "b"], "new") for name in ("a", "b")}
        sent = {name: router.send(key, _msg(ready), agent="sleeper") for name, key in fresh.items()}
        ready.wait(2)
        for name, key in fresh.items():
            other = nodes["b" if name == "a" else "a"]
            with nodes[name].client() as owner, other.client() as stranger:
                assert owner.session(key).active_run == sent[name].run_id
                with pytest.raises(ControlFault) as missing:
                    stranger.session(key)
                assert missing.value.fault == Fault.NO_SUCH_SESSION
        assert {h.supervisor_id for h in router.health().values()} == {a.connection()["supervisor_id"],
                                                                        b.connection()["supervisor_id"]}
        assert [agent.name for agent in router.agents()] == ["sleeper"]
        runs = router.runs(active=True)
        assert sorted(r.id for r in runs) == sorted([s.run_id for s in sent.values()] + [router.session("on-a").active_run])
        for key in [*fresh.values(), "on-a"]:
            run_id = router.session(key).active_run
            stopped = router.stop(key)
            assert [r["run_id"] for r in stopped.reports] == [run_id] and stopped.reports[0]["survivors"] == 0
            assert marked_processes(run_id) == {}
        assert router.unreachable == {}


def test_one_stream_follows_every_daemons_events(nodes, ready) -> None:
    spec = _spec(nodes)
    keys = {name: _key_for(name, ["a", "b"], "ev") for name in ("a", "b")}
    with RoutedClient(spec.split(","), name="router") as router:
        with router.events() as stream:
            assert set(stream.streams) == {"a", "b"} and stream.unreachable == {}
            sent = {name: router.send(key, _msg(ready), agent="sleeper") for name, key in keys.items()}
            ready.wait(2)
            stopped = {name: router.stop(key) for name, key in keys.items()}
            seen: dict[str, list] = {"a": [], "b": []}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(any(e.kind == "run.ended" for e in seen[n]) for n in seen):
                item = next(stream)
                seen[item.daemon].append(item.event)
        # Each daemon's own session, from that daemon only, in its seq order, from its start to its end.
        for name, key in keys.items():
            mine = [e for e in seen[name] if e.session == key]
            kinds = [e.kind for e in mine]
            assert "run.started" in kinds and kinds.index("run.started") < kinds.index("run.ended"), kinds
            assert {e.run_id for e in mine if e.kind == "run.ended"} == {sent[name].run_id}
            assert [e.seq for e in mine] == sorted(e.seq for e in mine)
            other = "b" if name == "a" else "a"
            assert not [e for e in seen[other] if e.session == key], "a session's events come from its owner only"
            assert stopped[name].reports[0]["survivors"] == 0
            assert marked_processes(sent[name].run_id) == {}

        # The command line follows both too, each line naming its daemon. It subscribes on its own
        # schedule: a round of work is repeated (a few times at most) until it has shown both daemons'.
        follower = subprocess.Popen([sys.executable, "-m", "deadstop.supervisor", "events", "--daemons", spec,
                                     "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=nodes["a"].env)
        ended: dict[str, str] = {}
        try:
            for _round in range(5):
                for key in keys.values():
                    router.send(key, _msg(ready), agent="sleeper")
                ready.wait(2)
                for key in keys.values():
                    assert router.stop(key).reports[0]["survivors"] == 0
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and len(ended) < 2:
                    if not select.select([follower.stdout], [], [], 0.2)[0]:
                        continue
                    line = follower.stdout.readline()
                    if not line:
                        break
                    row = json.loads(line)
                    if row["kind"] == "run.ended":
                        ended[row["daemon"]] = row["session"]
                if len(ended) == 2:
                    break
        finally:
            follower.send_signal(signal.SIGINT)
            try:
                follower.wait(10)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
    assert ended == keys, (ended, follower.stderr.read() if follower.stderr else "")
    assert follower.returncode == 0, follower.returncode


def test_the_async_router_routes_and_follows_like_the_blocking_one(nodes, ready) -> None:
    import asyncio

    from deadstop.supervisor.client import AsyncRoutedClient

    spec = _spec(nodes)
    keys = {name: _key_for(name, ["a", "b"], "aio") for name in ("a", "b")}

    async def main() -> tuple[dict, dict, dict]:
        async with AsyncRoutedClient(spec.split(","), name="aio-router") as router:
            events = await router.events()
            try:
                sent = dict(zip(keys, await asyncio.gather(*(router.send(k, _msg(ready), agent="sleeper")
                                                               for k in keys.values()))))
                await asyncio.get_running_loop().run_in_executor(None, ready.wait, 2)
                owners = {name: await router.owner_of(k) for name, k in keys.items()}
                stopped = dict(zip(keys, await asyncio.gather(*(router.stop(k) for k in keys.values()))))
                ended: dict[str, str] = {}
                async def follow() -> None:
                    async for item in events:
                        if item.event.kind == "run.ended":
                            ended[item.daemon] = item.event.run_id
                            if len(ended) == 2:
                                return
                await asyncio.wait_for(follow(), 30)
            finally:
                await events.aclose()
            listed = {s.key for s in await router.sessions()}
            assert set(keys.values()) <= listed and router.unreachable == {}
        return sent, stopped, {"owners": owners, "ended": ended}

    sent, stopped, seen = asyncio.run(main())
    assert seen["owners"] == {name: name for name in keys}, "each key went to its rendezvous daemon"
    assert seen["ended"] == {name: sent[name].run_id for name in keys}, "each run's end came from its own daemon"
    for name in keys:
        assert stopped[name].reports[0]["run_id"] == sent[name].run_id and stopped[name].reports[0]["survivors"] == 0
        assert marked_processes(sent[name].run_id) == {}


def test_a_daemon_down_is_named_and_the_others_still_answer(nodes, ready) -> None:
    a, b = nodes["a"], nodes["b"]
    spec = _spec(nodes)
    with a.client() as ca, b.client() as cb:
        ca.send("on-a", _msg(ready), agent="sleeper")
        cb.send("on-b", _msg(ready), agent="sleeper")
        ready.wait(2)
        run_a = ca.session("on-a").active_run
    warm = RoutedClient(spec.split(","), name="warm")  # has learned who owns what before b goes away
    try:
        assert {s.key for s in warm.sessions()} == {"on-a", "on-b"} and warm.owner_of("on-b") == "b"
        assert b.stop() == 0  # the node's daemon is gone (and its runs with it)

        table = a.cli("sessions", "list", "--daemons", spec)
        assert table.returncode == 0, table.stderr
        assert [r.split()[:2] for r in table.stdout.splitlines()[1:]] == [["on-a", "a"]]
        assert "daemon 'b' did not answer" in table.stderr and b.runtime in table.stderr, table.stderr
        listed = json.loads(a.cli("sessions", "list", "--daemons", spec, "--json").stdout)
        assert [s["key"] for s in listed["result"]] == ["on-a"] and list(listed["unreachable"]) == ["b"]

        assert [s.key for s in warm.sessions()] == ["on-a"] and list(warm.unreachable) == ["b"]
        with pytest.raises(ControlFault) as down:
            warm.stop("on-b")
        assert down.value.fault == Fault.UNREACHABLE and "daemon 'b'" in str(down.value), down.value
        cold = a.cli("sessions", "stop", "on-b", "--daemons", spec)  # a new router cannot tell where it was
        assert cold.returncode == 5 and "daemon 'b'" in cold.stderr, cold
        assert warm.session("on-a").active_run == run_a  # per-key verbs of the live node are untouched

        gone = a.cli("sessions", "list", "--daemons", f"b={b.runtime}")
        assert gone.returncode == 5 and "no daemon answered" in gone.stderr, gone
        both = a.cli("sessions", "list", "--daemons", spec, "--daemon", a.runtime)
        assert both.returncode == 2 and "not both" in both.stderr
        with warm.events() as stream:  # the merged stream follows the daemons that are up, and names the other
            assert set(stream.streams) == {"a"} and list(stream.unreachable) == ["b"]

        assert warm.stop("on-a").reports[0]["survivors"] == 0
        assert marked_processes(run_a) == {}
    finally:
        warm.close()


# -- Kubernetes: Leases ---------------------------------------------------------------------------------------------
class LeaseApiStandIn:
    """A stand-in for the Kubernetes API server's Lease endpoints (coordination.k8s.io/v1): get, create, replace,
    delete and list of `namespaces/{ns}/leases[/{name}]`, with the server's resourceVersion semantics (a create
    of an existing name and a write carrying a stale resourceVersion are 409). Nothing else of Kubernetes."""

    PREFIX = "/apis/coordination.k8s.io/v1/namespaces/"

    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._version = 0
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                stand_in._serve(self, "GET")

            def do_POST(self) -> None:
                stand_in._serve(self, "POST")

            def do_PUT(self) -> None:
                stand_in._serve(self, "PUT")

            def do_DELETE(self) -> None:
                stand_in._serve(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="lease-api-stand-in", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        self.requests.append((method, url.path))
        size = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(size)) if size else None
        rest = url.path[len(self.PREFIX):].split("/") if url.path.startswith(self.PREFIX) else []
        if len(rest) not in (2, 3) or rest[1] != "leases":
            return self._reply(h, 404, self._status(404, "NotFound", f"no route {url.path}"))
        ns, name = rest[0], (rest[2] if len(rest) == 3 else None)
        with self._lock:
            code, obj = self._handle(method, ns, name, body, parse_qs(url.query))
        self._reply(h, code, obj)

    def _handle(self, method: str, ns: str, name: str | None, body, query) -> tuple[int, dict]:
        if name is None and method == "GET":
            wanted = dict(term.split("=", 1) for term in query.get("labelSelector", [""])[0].split(",") if term)
            items = [obj for (n, _), obj in sorted(self.leases.items()) if n == ns and
                     all((obj["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]
            return 200, {"kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                         "metadata": {"resourceVersion": str(self._version)}, "items": items}
        if name is None and method == "POST":
            name = body["metadata"]["name"]
            if (ns, name) in self.leases:
                return 409, self._status(409, "AlreadyExists", f'leases.coordination.k8s.io "{name}" already exists')
            return 201, self._store(ns, name, body, created=True)
        current = self.leases.get((ns, name)) if name else None
        if current is None:
            return 404, self._status(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found')
        if method == "GET":
            return 200, current
        if method == "PUT":
            wanted_rv = body["metadata"].get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                return 409, self._status(409, "Conflict", "the object has been modified; please apply your changes "
                                                          "to the latest version and try again")
            body["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"]
            body["metadata"]["uid"] = current["metadata"]["uid"]
            return 200, self._store(ns, name, body)
        if method == "DELETE":
            wanted_rv = ((body or {}).get("preconditions") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                return 409, self._status(409, "Conflict", "Precondition failed: resourceVersion")
            del self.leases[(ns, name)]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
        return 405, self._status(405, "MethodNotAllowed", method)

    def _store(self, ns: str, name: str, body: dict, created: bool = False) -> dict:
        self._version += 1
        meta = body.setdefault("metadata", {})
        meta.update(namespace=ns, name=name, resourceVersion=str(self._version))
        if created:
            meta.update(uid=str(uuid.uuid4()), creationTimestamp="2026-01-01T00:00:00Z")
        body.update(kind="Lease", apiVersion="coordination.k8s.io/v1")
        self.leases[(ns, name)] = body
        return body

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": code}

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture
def lease_api():
    pytest.importorskip("kubernetes", reason="the Kubernetes backend needs the `kubernetes` package (deadstop[k8s])")
    api = LeaseApiStandIn()
    try:
        yield api
    finally:
        api.close()


def _api_client(url: str):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


def test_lease_records_route_every_router_to_the_same_owner(nodes, ready, lease_api, tmp_path) -> None:
    from kubernetes import client as k8s

    from deadstop.supervisor.client import LeaseOwners
    from deadstop.supervisor.client.leases import KEY_ANNOTATION, lease_name

    ns = "deadstop"
    owners = LeaseOwners(ns, api_client=_api_client(lease_api.url))
    for name, d in nodes.items():  # what each node's daemon announces in the DaemonSet
        owners.announce(name, d.runtime)
    owners.announce("c", "/nowhere", duration=1)  # a node that stopped renewing long ago:
    lease_api.leases[(ns, lease_name("d", "c"))]["spec"]["renewTime"] = "2026-01-01T00:00:00.000000Z"
    assert [d.name for d in owners.daemons()] == ["a", "b"]

    key = next(k for k in (f"Chat/{i} ü:X" for i in range(100)) if rendezvous(k, ["a", "b"]) == "b")  # no k8s name
    with RoutedClient(owners, name="router-1") as one:
        sent = one.send(key, _msg(ready), agent="sleeper")
        ready.wait(1)
    record = lease_api.leases[(ns, lease_name("s", key))]
    assert record["spec"]["holderIdentity"] == "b" and record["metadata"]["annotations"][KEY_ANNOTATION] == key
    assert record["metadata"]["name"].startswith("deadstop-s-") and len(record["metadata"]["name"]) == 43
    with nodes["b"].client() as cb:
        assert cb.session(key).active_run == sent.run_id

    # Another router, knowing nothing but the API server, reads the record and stops at the owner.
    other = LeaseOwners(ns, api_client=_api_client(lease_api.url))
    with RoutedClient(other, name="router-2") as two:
        assert two.owner_of(key) == "b"
        before = len(lease_api.requests)
        stopped = two.stop(key)
        assert [r["run_id"] for r in stopped.reports] == [sent.run_id] and stopped.reports[0]["survivors"] == 0
        # The owner owner_of read is kept: the stop lists the daemons (once per daemons_ttl) and reads no Lease.
        assert lease_api.requests[before:] == [("GET", f"{LeaseApiStandIn.PREFIX}{ns}/leases")]
    assert marked_processes(sent.run_id) == {}

    # A kept owner that is out of date, and holds an idle copy of the session (as a daemon back from a restart
    # would, after the session moved away): its "nothing was running" must not be the stop's answer. The
    # router reads the record again and stops the session where it runs.
    with nodes["b"].client() as cb:
        cb.send("moving", _msg(ready), agent="sleeper")
        ready.wait(1)
        assert cb.stop("moving").reports[0]["survivors"] == 0  # b now holds "moving", idle
    assert owners.record("moving", "b") == "b"
    kept = LeaseOwners(ns, api_client=_api_client(lease_api.url))
    assert kept.owner("moving") == "b"
    with nodes["a"].client() as ca:
        moved = ca.send("moving", _msg(ready), agent="sleeper")  # the session runs on a now
        ready.wait(1)
    assert owners.record("moving", "a", replacing="b") == "a"  # and its record says so; `kept` still holds "b"
    with RoutedClient(kept, name="router-3") as three:
        stopped = three.stop("moving")
        assert [r["run_id"] for r in stopped.reports] == [moved.run_id], stopped
        assert stopped.reports[0]["survivors"] == 0 and kept.owner("moving") == "a"
        assert three.session("moving").state == "idle"  # a show reads the record afresh
    assert marked_processes(moved.run_id) == {}

    # First writer wins; a move is a compare-and-swap on resourceVersion.
    assert other.record(key, "a") == "b", "an existing record is not overwritten"
    assert other.record(key, "a", replacing="someone-else") == "b"
    race: list[str] = []
    threads = [threading.Thread(target=lambda n=n: race.append(owners.record("raced", n))) for n in ("a", "b") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(race)) == 1, f"two routers disagree on an owner: {race}"
    api = k8s.CoordinationV1Api(_api_client(lease_api.url))
    stale = api.read_namespaced_lease(lease_name("s", key), ns)
    assert other.record(key, "a", replacing="b") == "a"
    with pytest.raises(k8s.ApiException) as conflict:
        api.replace_namespaced_lease(stale.metadata.name, ns, stale)  # the resourceVersion read before the move
    assert conflict.value.status == 409
    moved = lease_api.leases[(ns, lease_name("s", key))]["spec"]
    assert moved["holderIdentity"] == "a" and moved["leaseTransitions"] == 1
    other.forget(key, holder="b")
    assert other.owner(key) == "a", "forget of a holder that no longer holds it changes nothing"
    other.forget(key)
    assert other.owner(key) is None

    # The command line on the same records: --daemons k8s:NAMESPACE with a kubeconfig naming the stand-in.
    with nodes["a"].client() as ca:
        ca.send("on-a", _msg(ready), agent="sleeper")
        ready.wait(1)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": lease_api.url}}],
        "users": [{"name": "nobody", "user": {}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "nobody"}}]}))
    env = {**nodes["a"].env, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    listed = subprocess.run([sys.executable, "-m", "deadstop.supervisor", "sessions", "list", "--daemons", f"k8s:{ns}",
                             "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["result"]
    assert sorted((s["key"], s["daemon"], s["state"]) for s in rows) == sorted([("on-a", "a", "running"), (key, "b", "idle"),
                                                                                        ("moving", "a", "idle"),
                                                                                        ("moving", "b", "idle")])
    out = subprocess.run([sys.executable, "-m", "deadstop.supervisor", "sessions", "stop", "on-a", "--daemons", f"k8s:{ns}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "0 survivor(s)" in out.stdout, out
    assert lease_api.leases[(ns, lease_name("s", "on-a"))]["spec"]["holderIdentity"] == "a", \
        "a session started on its node directly gets its record once a router finds it"
    assert marked_processes() == {}

    # The DaemonSet's sidecar: announces its node's daemon while it serves, withdraws it at SIGTERM.
    announcer = subprocess.Popen([sys.executable, "-m", "deadstop.supervisor.client.leases", "--namespace", ns,
                                  "--name", "node-c", "--endpoint", "ipc:///nowhere", "--runtime-dir",
                                  nodes["a"].runtime, "--every", "0.2"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while (ns, lease_name("d", "node-c")) not in lease_api.leases:  # bounded wait for the sidecar's first write
            assert announcer.poll() is None and time.monotonic() < deadline, announcer.stdout.read()
            time.sleep(0.02)
        announced = lease_api.leases[(ns, lease_name("d", "node-c"))]
        assert announced["spec"]["holderIdentity"] == "node-c" and announced["spec"]["leaseDurationSeconds"] == 1
        assert announced["metadata"]["annotations"]["deadstop.dev/endpoint"] == "ipc:///nowhere"
        assert "node-c" in [d.name for d in LeaseOwners(ns, api_client=_api_client(lease_api.url)).daemons()]
    finally:
        announcer.terminate()
        out, _ = announcer.communicate(timeout=60)
    assert announcer.returncode == 0, out
    assert (ns, lease_name("d", "node-c")) not in lease_api.leases, "a stopped sidecar withdraws its daemon"


def test_stop_all_ends_every_session_of_every_daemon_in_one_step(nodes, ready) -> None:
    """`sessions stop-all --daemons`: each daemon revokes every run of every busy session before it signals any;
    nothing of them is left in /proc; idle sessions are not touched; a daemon that is down makes the verb fail."""
    a, b = nodes["a"], nodes["b"]
    keys = {"a": [f"all-a-{i}" for i in range(4)], "b": [f"all-b-{i}" for i in range(3)]}
    runs: dict[str, str] = {}
    for name, d in nodes.items():
        with d.client() as c:
            c.send(f"idle-{name}", _msg(ready), agent="sleeper")
            ready.wait(1)
            c.stop(f"idle-{name}")  # stopped before: stop_all has nothing of it to end
            for key in keys[name]:
                c.send(key, _msg(ready), agent="sleeper")
            ready.wait(len(keys[name]))
            runs.update({c.session(k).active_run: name for k in keys[name]})
    assert all(marked_processes(r) for r in runs)

    out = a.cli("sessions", "stop-all", "--daemons", _spec(nodes), "--json")
    assert out.returncode == 0, out
    replies = json.loads(out.stdout)
    assert replies["unreachable"] == {}
    for name in ("a", "b"):
        reply = replies["result"][name]
        assert sorted(reply["sessions"]) == sorted(keys[name])  # the idle one is not among them
        assert sorted(reply["revoked"]) == sorted(r for r, n in runs.items() if n == name)
        reports = reply["reports"]
        assert sorted(r["run_id"] for r in reports) == sorted(reply["revoked"])
        assert all(r["survivors"] == 0 and r["outcome"] == "stopped" for r in reports)
        # one step: every revocation of the daemon is before any signal it sent
        assert max(r["revoked_at"] for r in reports) < min(r["term_sent_at"] for r in reports)
        assert max(r["requested_at"] for r in reports) <= min(r["revoked_at"] for r in reports)
    assert {r: marked_processes(r) for r in runs} == {r: {} for r in runs}
    with a.client() as c:
        assert all(s.active_run is None for s in c.sessions() if s.key in keys["a"])

    again = a.cli("sessions", "stop-all", "--daemons", _spec(nodes))
    assert again.returncode == 0 and again.stdout.splitlines() == ["a: nothing was running", "b: nothing was running"]

    assert b.stop() == 0
    down = a.cli("sessions", "stop-all", "--daemons", _spec(nodes))
    assert down.returncode == 1, down  # b's sessions (had it any) were not stopped: the caller must know
    assert "daemon 'b' did not answer" in down.stderr and "a: nothing was running" in down.stdout
