"""CURVE keys for the daemon's tcp:// endpoints: the server's pair, and client keys with scopes.

Layout, under the keys directory (default `<state dir>/keys`, mode 0700):

    server.key            the daemon's public certificate (clients need its key)
    server.key_secret     the daemon's secret certificate
    authorized/NAME.key   one public certificate per client; its metadata names
                          its scopes: `scopes = "read,write"`
    clients/NAME.key_secret  the client's secret certificate, to hand to that client

`deadstop keys generate NAME --scopes read,write` makes a client's pair. The
certificate files are pyzmq's (zmq.auth), so any ZeroMQ CURVE tooling reads
them. A key removed from `authorized/` is refused from the next connection
(`deadstop daemon reload` re-reads the directory).
"""

from __future__ import annotations

import os
import re

import zmq
import zmq.auth

from ...ipc.control import Scope

SERVER = "server"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def ensure_dirs(keys_dir: str) -> None:
    for sub in ("", "authorized", "clients"):
        path = os.path.join(keys_dir, sub)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)


def server_keys(keys_dir: str) -> tuple[bytes, bytes]:
    """(public, secret) of the daemon, made on first use."""
    ensure_dirs(keys_dir)
    secret_file = os.path.join(keys_dir, f"{SERVER}.key_secret")
    if not os.path.exists(secret_file):
        zmq.auth.create_certificates(keys_dir, SERVER)
        os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    return public, secret


def generate_client(keys_dir: str, name: str, scopes: list[str]) -> str:
    """A client's key pair with its scopes; returns the path of its secret certificate."""
    if not _NAME.match(name):
        raise ValueError(f"key name {name!r}: letters, digits, '_', '.', '-' (1 to 64, not starting with a symbol)")
    wanted = [Scope(s).value for s in scopes]  # ValueError names a bad scope
    ensure_dirs(keys_dir)
    public_file, secret_file = zmq.auth.create_certificates(os.path.join(keys_dir, "clients"), name,
                                                            metadata={"scopes": ",".join(wanted)})
    os.chmod(secret_file, 0o600)
    # pyzmq writes the metadata into the secret certificate only; the scopes belong with the public one.
    with open(public_file, encoding="utf8") as f:
        text = f.read()
    text = text.replace("metadata\n", f'metadata\n    scopes = "{",".join(wanted)}"\n', 1)
    target = os.path.join(keys_dir, "authorized", f"{name}.key")
    with open(target + ".tmp", "w", encoding="utf8") as f:
        f.write(text)
    os.replace(target + ".tmp", target)
    os.unlink(public_file)
    return secret_file


def authorized(keys_dir: str) -> dict[str, tuple[str, frozenset[Scope]]]:
    """Z85 public key -> (client name, its scopes), from `authorized/`."""
    folder = os.path.join(keys_dir, "authorized")
    out: dict[str, tuple[str, frozenset[Scope]]] = {}
    if not os.path.isdir(folder):
        return out
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".key"):
            continue
        path = os.path.join(folder, entry)
        public, _secret = zmq.auth.load_certificate(path)
        out[public.decode()] = (entry[:-len(".key")], _scopes_of(path))
    return out


def _scopes_of(path: str) -> frozenset[Scope]:
    """The `scopes` metadata of a certificate; none (a key that can do nothing) if absent or unknown."""
    with open(path, encoding="utf8") as f:
        for line in f:
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "scopes":
                names = [v.strip() for v in value.strip().strip('"').split(",") if v.strip()]
                return frozenset(Scope(n) for n in names if n in {s.value for s in Scope})
    return frozenset()


def load_client(secret_file: str) -> tuple[bytes, bytes]:
    """(public, secret) of a client from its secret certificate."""
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key (that is the public certificate)")
    return public, secret
