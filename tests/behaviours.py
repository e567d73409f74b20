"""Run targets that misbehave on purpose. Each calls the `ready` tool once its
misbehaviour is fully set up, so tests wait on an event instead of sleeping.

Every target also runs a ticker thread that keeps calling the `tick` tool,
so each stop races live egress traffic.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

from deadstop.worker import egress


def _ticker(period: float = 0.001) -> None:
    def loop() -> None:
        while True:
            try:
                egress.call("tick")
            except Exception:
                return  # revoked: the run's egress is closed for good
            time.sleep(period)

    threading.Thread(target=loop, daemon=True).start()


def _ready() -> None:
    """Tell the test we are set up. The test may stop us the moment the tool
    has run, while the reply is still on its way: the call is then cancelled
    by the revoke and raises here, which must not end the misbehaviour."""
    try:
        egress.call("ready")
    except egress.DeadstopError:
        pass


def _wait_bytes(fd: int, n: int) -> None:
    got = 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            raise RuntimeError(f"only {got} of {n} readiness bytes arrived")
        got += len(chunk)


def busy(out_dir: str) -> None:
    _ticker()
    _ready()
    x = 0
    while True:
        x += 1


def ignore_term(out_dir: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _ticker()
    _ready()
    while True:
        time.sleep(0.05)


def busy_children(n: int) -> None:
    """Fork `n` children that loop on the CPU for ever; return once all of them run."""
    r, w = os.pipe()
    for _ in range(n):
        if os.fork() == 0:
            os.write(w, b"c")
            x = 0
            while True:
                x += 1
    got = 0
    while got < n:
        got += len(os.read(r, n - got))


def fork_pairs(children: int) -> None:
    """Fork `children` sleeping children, each with one sleeping grandchild, and
    return once all 2 * children exist."""
    r, w = os.pipe()
    for _ in range(children):
        if os.fork() == 0:
            if os.fork() == 0:
                os.write(w, b"g")
                while True:
                    time.sleep(1)
            os.write(w, b"c")
            while True:
                time.sleep(1)
    _wait_bytes(r, 2 * children)
    os.close(r)
    os.close(w)


def tree(out_dir: str, children: int = 20) -> None:
    """`children` children, each with one grandchild: 2 * children + 1 processes."""
    fork_pairs(children)
    _ticker()
    _ready()
    while True:
        time.sleep(1)


def setsid_escaper(out_dir: str) -> None:
    """Double fork + setsid: the grandchild leaves the run's session and process
    group, is re-parented away from the run, and ignores SIGTERM."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with open(os.path.join(out_dir, "escaper.pid"), "w") as f:
                f.write(str(os.getpid()))
            os.write(w, b"e")
            while True:
                time.sleep(1)
        os._exit(0)
    _wait_bytes(r, 1)
    _ticker()
    _ready()
    while True:
        time.sleep(1)


def gil_holder(out_dir: str) -> None:
    """A Python SIGTERM handler that cannot run: the main thread sits in a C call
    (catastrophic regex backtracking) that never releases the GIL."""
    signal.signal(signal.SIGTERM, lambda *_: None)
    _ticker()
    _ready()
    re.match(r"(a+)+$", "a" * 64 + "b")


def flooder(out_dir: str, threads: int = 4) -> None:
    """Tool calls as fast as the broker answers, from several threads, plus a
    sync tool with a commit gate."""
    def flood(tool: str) -> None:
        while True:
            try:
                egress.call(tool)
            except Exception:
                return

    for i in range(threads):
        threading.Thread(target=flood, args=("tick" if i % 2 else "send",), daemon=True).start()
    _ready()
    flood("tick")


def writer(out_dir: str) -> None:
    """The run and its child append a monotonic timestamp to a file every millisecond."""
    path = os.path.join(out_dir, "writes.log")
    r, w = os.pipe()

    def write_forever(tag: str, announce: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if announce:
            os.write(w, b"w")
        while True:
            os.write(fd, f"{tag} {time.monotonic_ns()}\n".encode())
            time.sleep(0.001)

    if os.fork() == 0:
        write_forever("child", True)
    _wait_bytes(r, 1)
    _ticker()
    threading.Thread(target=write_forever, args=("leader", False), daemon=True).start()
    _ready()
    while True:
        time.sleep(1)


def stubborn_caller(out_dir: str) -> None:
    """Ignores SIGTERM and keeps calling tools after its egress is revoked,
    logging every refusal it receives."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log = open(os.path.join(out_dir, "refusals.log"), "a", buffering=1)
    try:
        egress.call("tick")
        _ready()
        while True:
            try:
                egress.call("tick")
            except Exception as exc:
                log.write(f"{type(exc).__name__} {getattr(exc, 'code', '?')} {time.monotonic_ns()}\n")
                time.sleep(0.001)
    except BaseException:
        import traceback
        with open(os.path.join(out_dir, "crash.log"), "w") as f:
            traceback.print_exc(file=f)
        raise


BEHAVIOURS = {
    "busy": busy,
    "ignore_term": ignore_term,
    "tree": tree,
    "setsid_escaper": setsid_escaper,
    "gil_holder": gil_holder,
    "flooder": flooder,
    "writer": writer,
}


def raw_exchange(frames: list[bytes], timeout_ms: int = 5000) -> dict | None:
    """Send hand-made frames on a fresh DEALER socket; the decoded reply, or None if none came."""
    import json

    import zmq

    cfg = egress._cfg()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.address)
    try:
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close(0)


def attacker(victim_id: str) -> dict:
    """Forge, malform and oversize requests against the broker; report each reply's error code."""
    import json

    cfg = egress._cfg()
    call = json.dumps({"verb": "call", "id": 7, "tool": "secret"}).encode()

    def code(frames: list[bytes]) -> int | None:
        reply = raw_exchange(frames)
        if reply is None:
            return None
        return 0 if reply["ok"] else reply["error"]["code"]

    v, rid, cred, gen = b"ds1", cfg.run_id, cfg.credential, cfg.generation
    return {
        "own_credential_other_run": code([v, victim_id.encode(), cred, gen, call]),
        "guessed_credential": code([v, rid, b"0" * len(cred), gen, call]),
        "empty_credential": code([v, rid, b"", gen, call]),
        "unknown_run": code([v, b"nosuchrun000", cred, gen, call]),
        "too_few_frames": code([v, rid, cred, call]),
        "too_many_frames": code([v, rid, cred, gen, call, b"extra"]),
        "bad_version": code([b"ds0", rid, cred, gen, call]),
        "not_json": code([v, rid, cred, gen, b"{not json"]),
        "missing_field": code([v, rid, cred, gen, json.dumps({"verb": "call", "id": 8}).encode()]),
        "wrong_type": code([v, rid, cred, gen, json.dumps({"verb": "call", "id": 9, "tool": 5}).encode()]),
        "unknown_verb": code([v, rid, cred, gen, json.dumps({"verb": "format_disk", "id": 10}).encode()]),
        "stale_generation": code([v, rid, cred, b"99", call]),
        "generation_not_a_number": code([v, rid, cred, b" +0", call]),
        "id_out_of_range": code([v, rid, cred, gen, json.dumps({"verb": "call", "id": 2**64, "tool": "echo"}).encode()]),
        "negative_id": code([v, rid, cred, gen, json.dumps({"verb": "call", "id": -1, "tool": "echo"}).encode()]),
        "oversized": code([v, rid, cred, gen, b" " * (2 << 20) + call]),
        "over_hard_cap": code([v, rid, cred, gen, b" " * (9 << 20) + call]),
        "unknown_tool": code([v, rid, cred, gen, json.dumps({"verb": "call", "id": 11, "tool": "rm_rf"}).encode()]),
        "denied_tool": code([v, rid, cred, gen, call]),
        "bad_arguments": code([v, rid, cred, gen, json.dumps(
            {"verb": "call", "id": 12, "tool": "echo", "kwargs": {"nope": 1}}).encode()]),
        "still_served": code([v, rid, cred, gen, json.dumps(
            {"verb": "call", "id": 13, "tool": "echo", "args": ["hi"]}).encode()]),
    }


def victim() -> None:
    _ready()
    while True:
        time.sleep(1)


def returns(value):
    return value


def raises(message: str) -> None:
    raise ValueError(message)


def exits_at_once(code: int) -> None:
    os._exit(code)


def returns_unjsonable() -> object:
    return {"handle": object()}


def calls_with_unjsonable_argument() -> str:
    try:
        egress.call("echo", object())
    except TypeError as exc:
        return f"TypeError: {exc}"
    return "no error"


def calls_many(tool: str, n: int) -> int:
    """`n` sequential calls of `tool` with one small argument; how many were answered."""
    done = 0
    for i in range(n):
        egress.call(tool, f"call {i}")
        done += 1
    return done


def calls_and_reports(tool: str, *args, **kwargs) -> dict:
    """Call a tool and report the outcome (value or refusal class and code) as the result."""
    try:
        return {"ok": True, "value": egress.call(tool, *args, **kwargs)}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "code": int(getattr(exc, "code", 0)),
                "message": str(exc)}


def emits(n: int) -> int:
    for i in range(n):
        egress.emit("progress", {"i": i})
    return n


def leaves_children_behind(out_dir: str) -> str:
    """Exits at once, leaving a child and a setsid grandchild that ignore SIGTERM."""
    r, w = os.pipe()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.fork() == 0:
            os.setsid()
            os.write(w, b"g")
            while True:
                time.sleep(1)
        os.write(w, b"c")
        while True:
            time.sleep(1)
    _wait_bytes(r, 2)
    return "bye"


def slow_tool_caller(tool: str = "slow") -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    egress.call(tool)


def duplicate_ids(copies: int = 2) -> None:
    """Several calls in flight at once that all carry the same request id."""
    import json

    import zmq

    cfg = egress._cfg()
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(copies):
        sock = ctx.socket(zmq.DEALER)
        sock.connect(cfg.address)
        sock.send_multipart([b"ds1", cfg.run_id, cfg.credential, cfg.generation,
                             json.dumps({"verb": "call", "id": 5, "tool": "slow"}).encode()])
        socks.append(sock)
    while True:
        time.sleep(1)


def busy_for(seconds: float, **context) -> None:
    """Spin on the CPU for `seconds`, then end."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def identity() -> dict:
    """Who the run is: its uid and how many pids its /proc shows (1 under hidepid)."""
    return {"uid": os.getuid(), "visible_pids": sum(1 for p in os.listdir("/proc") if p.isdigit())}


def calls_with(tool: str, arguments: dict) -> dict:
    """calls_and_reports with keyword arguments (start() passes positional ones only)."""
    return calls_and_reports(tool, **arguments)


# -- through the network proxy (tests/test_proxy.py) ------------------------------------------------------
def fetch_all(url: str, refused_url: str, direct: tuple[str, int]) -> dict:
    """The same allowed URL through urllib, requests and curl (each honours HTTP_PROXY), one refused URL,
    and one attempt to go around the proxy."""
    import socket
    import subprocess
    import urllib.error
    import urllib.request

    import requests

    out: dict = {"urllib": urllib.request.urlopen(url, timeout=30).read().decode()}
    out["requests"] = requests.get(url, timeout=30).text
    curl = subprocess.run(["curl", "-sS", "--max-time", "30", url], capture_output=True, text=True, timeout=60)
    out["curl"] = curl.stdout or curl.stderr
    try:
        urllib.request.urlopen(refused_url, timeout=30)
        out["refused"] = "not refused"
    except urllib.error.HTTPError as exc:
        out["refused"] = f"{exc.code} {exc.headers.get('X-Deadstop-Refused', '')}"
    try:
        socket.create_connection(direct, timeout=5).close()
        out["direct"] = "connected"
    except OSError as exc:
        out["direct"] = f"{type(exc).__name__}: {exc}"
    return out


def requests_through_the_proxy_then_sleeps(url: str) -> None:
    """Connect to the run's proxy and send one GET for `url` at once (the kernel completes the
    handshake from the listener's backlog, whether or not the proxy is served yet), then say ready
    and wait for whatever comes back, until stopped."""
    import socket
    import urllib.parse

    proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
    conn = socket.create_connection((proxy.hostname, proxy.port), timeout=30)
    host = urllib.parse.urlsplit(url).netloc
    conn.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    _ready()
    conn.settimeout(None)
    while conn.recv(65536):
        pass
    while True:
        time.sleep(1)


def uploads_for_ever(url: str, marker_dir: str) -> None:
    """POSTs an endless body through the proxy, counting what it handed to its socket."""
    import http.client
    import os
    import urllib.parse

    proxy = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
    conn = http.client.HTTPConnection(proxy.hostname, proxy.port, timeout=60)
    conn.putrequest("POST", url)
    conn.putheader("Content-Length", str(1 << 40))
    conn.endheaders()
    chunk = b"x" * 65536
    sent = 0
    while True:
        conn.send(chunk)
        sent += len(chunk)
        with open(os.path.join(marker_dir, "sent.tmp"), "w") as f:
            f.write(str(sent))
        os.replace(os.path.join(marker_dir, "sent.tmp"), os.path.join(marker_dir, "sent"))  # a kill leaves a whole count


def blocking_send(to: str, ready_path: str, outbox: str) -> str:
    """A blocking tool with no commit gate: says it started, takes its time, then makes its effect."""
    import json
    import os
    import time

    fd = os.open(ready_path, os.O_WRONLY)
    os.write(fd, (json.dumps({"pid": os.getpid(), "to": to}) + "\n").encode())
    os.close(fd)
    time.sleep(0.5)
    with open(os.path.join(outbox, f"sent-to-{to}"), "w") as f:
        f.write("sent")
    return f"sent to {to}"


def asks_the_model(prompt: str) -> str:
    """One chat call through the brokered `chat` tool (examples/model_tool.py)."""
    return egress.call("chat", messages=[{"role": "user", "content": prompt}], model="test-model")


def mcp_agent(message, **context):
    """A session's agent: calls message["tool"] with message["args"]; the result is its answer."""
    return egress.call(message["tool"], **message.get("args", {}))
