"""Run targets for tests/test_batched_wire.py: runs that speak the batched wire (ds2) by hand.

Each uses a raw DEALER socket of its own with the run's real address and
credential, sends the messages it is given, and reports every reply
message as (version, decoded body). Every wait is bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import zmq

from deadstop.worker import egress


def _body(item: Any) -> bytes:
    """A body from the test's description: a str is sent as is, anything else as JSON."""
    return item.encode() if isinstance(item, str) else json.dumps(item).encode()


def exchange(messages: list[dict], expect: int, seconds: float = 10.0, ignore_term: bool = False,
             out_path: str | None = None) -> list:
    """Send each message ({"version", "body", optional "generation"}); collect replies until
    `expect` replies (array elements count one each) came or `seconds` passed.

    Returns [[version, body], ...] in arrival order, and writes it to
    `out_path` too (a revoked run cannot report a result). With ignore_term
    the run outlives the SIGTERM of its own stop long enough to write it.
    """
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cfg = egress._cfg()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.address)
    for m in messages:
        gen = m.get("generation", cfg.generation.decode()).encode()
        sock.send_multipart([m["version"].encode(), cfg.run_id, cfg.credential, gen, _body(m["body"])])
    got: list = []
    count = 0
    deadline = time.monotonic() + seconds
    while count < expect and time.monotonic() < deadline:
        if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            break
        version, body = sock.recv_multipart()
        decoded = json.loads(body)
        got.append([version.decode(), decoded])
        count += len(decoded) if isinstance(decoded, list) else 1
    sock.close(0)
    if out_path is not None:
        with open(out_path + ".tmp", "w") as f:
            json.dump(got, f)
        os.rename(out_path + ".tmp", out_path)
    return got


def many_acalls(tool: str, n: int) -> list:
    """`n` concurrent egress.acall(tool, i) through the Python client (which batches them); their results."""
    import asyncio

    async def main() -> list:
        return await asyncio.gather(*(egress.acall(tool, i) for i in range(n)))

    return asyncio.run(main())


def acalls_until_revoked(out_dir: str, tool: str, n: int) -> None:
    """`n` concurrent acalls of a tool that never answers; write how each ended, then one more call's fate."""
    import asyncio

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # outlive the stop's SIGTERM long enough to write

    async def main() -> dict:
        results = await asyncio.gather(*(egress.acall(tool) for _ in range(n)), return_exceptions=True)
        kinds: dict[str, int] = {}
        for r in results:
            name = type(r).__name__
            kinds[name] = kinds.get(name, 0) + 1
        try:
            await egress.acall(tool)
            after = "answered"
        except Exception as exc:
            after = type(exc).__name__
        return {"ended": kinds, "after": after}

    ends = asyncio.run(main())
    with open(os.path.join(out_dir, "ends.tmp"), "w") as f:
        json.dump(ends, f)
    os.rename(os.path.join(out_dir, "ends.tmp"), os.path.join(out_dir, "ends.json"))
    time.sleep(60)  # killed at the end of the grace
