"""What the runs of benchmarks/effects_latency.py run (imported by reference in each run)."""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.parse

from deadstop.worker import egress


def timed_calls(tool: str, n: int, arguments: dict) -> list[int]:
    """n calls of `tool`, each timed from the run's side (send -> reply)."""
    out = []
    for _ in range(n):
        t0 = time.monotonic_ns()
        egress.call(tool, **arguments)
        out.append(time.monotonic_ns() - t0)
    return out


def _proxy() -> tuple[str, int]:
    url = urllib.parse.urlsplit(os.environ["HTTP_PROXY"])
    return url.hostname or "127.0.0.1", url.port or 3128


def proxied_gets(url: str, n: int) -> list[int]:
    """n GETs of `url` through the run's proxy, each on a new connection, timed to the last body byte."""
    host, port = _proxy()
    out = []
    for _ in range(n):
        t0 = time.monotonic_ns()
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", url)
        conn.getresponse().read()
        conn.close()
        out.append(time.monotonic_ns() - t0)
    return out


def download(host: str, port: int, target: str) -> list[int]:
    """[bytes, ns] of one GET of `target` from host:port (a proxy, with an absolute URL, or the server)."""
    t0 = time.monotonic_ns()
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", target)
    response = conn.getresponse()
    total = 0
    while True:
        chunk = response.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    return [total, time.monotonic_ns() - t0]


def proxied_download(url: str) -> list[int]:
    """[bytes, ns] of one GET of `url` through the run's proxy."""
    return download(*_proxy(), url)


def holds_tunnels(host: str, port: int, k: int, ready: str) -> None:
    """Opens k CONNECT tunnels through the proxy to host:port, says so on the ready FIFO, then idles."""
    proxy = _proxy()
    held = []
    for _ in range(k):
        sock = socket.create_connection(proxy, timeout=30)
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        held.append(sock)
    fd = os.open(ready, os.O_WRONLY)  # the benchmark's ReadyChannel line: tag pid t_ns
    os.write(fd, f"tunnels {os.getpid()} {time.monotonic_ns()}\n".encode())
    os.close(fd)
    while True:
        time.sleep(1)

