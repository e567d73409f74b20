"""LeaseOwners: session owners kept as Kubernetes Leases (coordination.k8s.io/v1), one per session key.

Every router of a cluster reads and writes the same records through the API
server, so they agree on owners without talking to each other:

* a session's record is the Lease `deadstop-s-<sha256(key), 32 hex>` (a key
  may hold any character; a Kubernetes name may not), holderIdentity the
  owning daemon's name (its node's), the key itself in the annotation
  `deadstop.dev/session-key` (checked on read, so that a hash collision is
  refused instead of routing to a stranger's session);
* it is created before the first message is sent: a create that meets an
  existing Lease (409 AlreadyExists) lost the race, and the session goes to
  the holder on record;
* it is changed only by compare-and-swap (a replace carrying the
  resourceVersion that was read; 409 Conflict means someone else wrote in
  between, so read again), and removed the same way (a delete with that
  resourceVersion as precondition);
* each daemon is announced by a Lease `deadstop-d-<sha256(name), 32 hex>`
  whose annotations give its control endpoint and CURVE public key, renewed
  within `leaseDurationSeconds`; a daemon whose Lease was not renewed in
  time is not listed.

The official `kubernetes` client is imported here only (`pip install
'deadstop[k8s]'`), on first use of this module: nothing else of deadstop
pays for it.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from typing import Any, Iterable

from ...ipc.control import ControlFault, Fault
from .owners import DaemonAddress

GROUP = "deadstop.dev"
KEY_ANNOTATION = f"{GROUP}/session-key"
ENDPOINT_ANNOTATION = f"{GROUP}/endpoint"
SERVER_KEY_ANNOTATION = f"{GROUP}/server-key"
RECORD_LABEL = f"{GROUP}/record"  # "session" | "daemon"
MANAGED = {"app.kubernetes.io/managed-by": "deadstop"}
#: tries of a read-then-write that keeps meeting another writer's change
RETRIES = 8


def lease_name(kind: str, text: str) -> str:
    """A valid Lease name (DNS-1123 subdomain) for any text: a prefix and 128 bits of its sha256."""
    return f"deadstop-{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _micro(when: "datetime.datetime | None" = None) -> Any:
    """A MicroTime as the API server parses it: RFC 3339 with exactly six fractional digits. Given as a string
    (the client's models are typed datetime, hence Any): the client would send datetime.isoformat(), which drops
    the fraction at a whole second and is then refused."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _api_client() -> Any:
    """In a pod: its service account; elsewhere: the kubeconfig ($KUBECONFIG, ~/.kube/config)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class LeaseOwners:
    """The Owners backend of a cluster: one Lease per session key in `namespace`.

    `api_client`: a `kubernetes.client.ApiClient` (default: in-cluster, else kubeconfig). `daemons`: a fixed list
    instead of the announced daemons' Leases, which are otherwise listed again at most every `daemons_ttl` seconds
    (a stop then costs one read of its session's record, not two requests).

    An owner read is kept for `owners_ttl` seconds (0: read every time): a session changes owner only when its
    node is gone and a new message starts it elsewhere, and a router whose copy is out of date learns it from
    the old owner's failure, reads the record again (`refresh`) and follows it. A missing record is never kept:
    another router may create it the next moment.
    """

    authoritative = True

    def __init__(self, namespace: str, *, api_client: Any = None, daemons: "Iterable[str | DaemonAddress] | None" = None,
                 daemons_ttl: float = 5.0, owners_ttl: float = 30.0):
        from kubernetes import client

        self.namespace = namespace
        self._k8s = client
        self._api = client.CoordinationV1Api(api_client if api_client is not None else _api_client())
        self._static = None if daemons is None else [d if isinstance(d, DaemonAddress) else DaemonAddress.parse(d)
                                                      for d in daemons]
        self._ttl = daemons_ttl
        self._listed: tuple[float, list[DaemonAddress]] | None = None
        self._owners_ttl = owners_ttl
        self._owners: dict[str, tuple[float, str]] = {}  # key -> (when read, holder)

    # -- the Owners protocol ------------------------------------------------------------------------------
    def daemons(self) -> list[DaemonAddress]:
        if self._static is not None:
            return list(self._static)
        if self._listed is not None and time.monotonic() - self._listed[0] < self._ttl:
            return list(self._listed[1])
        try:
            leases = self._do(lambda: self._api.list_namespaced_lease(self.namespace, label_selector=f"{RECORD_LABEL}=daemon"))
        except self._k8s.ApiException as exc:
            raise self._fault(exc) from None
        now = datetime.datetime.now(datetime.timezone.utc)
        out = []
        for lease in leases.items:
            spec, notes = lease.spec, lease.metadata.annotations or {}
            if not spec or not spec.holder_identity or ENDPOINT_ANNOTATION not in notes:
                continue
            renewed, duration = spec.renew_time, spec.lease_duration_seconds
            if renewed is not None and duration and renewed + datetime.timedelta(seconds=duration) < now:
                continue  # not renewed in time: its node is gone or its daemon is not serving
            out.append(DaemonAddress(spec.holder_identity, notes[ENDPOINT_ANNOTATION], notes.get(SERVER_KEY_ANNOTATION)))
        out.sort(key=lambda d: d.name)
        self._listed = (time.monotonic(), out)
        return list(out)

    def owner(self, key: str) -> str | None:
        kept = self._owners.get(key)
        if kept is not None and time.monotonic() - kept[0] < self._owners_ttl:
            return kept[1]
        return self.refresh(key)

    def refresh(self, key: str) -> str | None:
        lease = self._read(key)
        if lease is None:
            self._owners.pop(key, None)
            return None
        return self._keep(key, lease.spec.holder_identity)

    def _keep(self, key: str, holder: str) -> str:
        if self._owners_ttl > 0:
            self._owners[key] = (time.monotonic(), holder)
        return holder

    def record(self, key: str, daemon: str, *, replacing: str | None = None) -> str:
        for _ in range(RETRIES):
            lease = self._read(key)
            if lease is None:
                try:
                    self._do(lambda: self._api.create_namespaced_lease(self.namespace, self._session_lease(key, daemon)))
                    return self._keep(key, daemon)
                except self._k8s.ApiException as exc:
                    if exc.status != 409:
                        raise self._fault(exc) from None
                    continue  # another router created it first: read whose it is
            holder = lease.spec.holder_identity
            if replacing is None or holder != replacing:
                return self._keep(key, str(holder))
            lease.spec.holder_identity = daemon
            lease.spec.acquire_time = _micro()
            lease.spec.lease_transitions = (lease.spec.lease_transitions or 0) + 1
            try:
                self._do(lambda: self._api.replace_namespaced_lease(lease.metadata.name, self.namespace, lease))  # with its rv
                return self._keep(key, daemon)
            except self._k8s.ApiException as exc:
                if exc.status not in (404, 409):
                    raise self._fault(exc) from None
        raise ControlFault(Fault.FAILED, f"the owner record of session {key!r} kept changing under {RETRIES} tries")

    def forget(self, key: str, *, holder: str | None = None) -> None:
        self._owners.pop(key, None)
        lease = self._read(key)
        if lease is None or (holder is not None and lease.spec.holder_identity != holder):
            return
        options = self._k8s.V1DeleteOptions(preconditions=self._k8s.V1Preconditions(
            resource_version=lease.metadata.resource_version))
        try:
            self._do(lambda: self._api.delete_namespaced_lease(lease.metadata.name, self.namespace, body=options))
        except self._k8s.ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or rewritten since: no longer ours to drop
                raise self._fault(exc) from None

    # -- daemons announcing themselves ----------------------------------------------------------------------
    def announce(self, name: str, where: str, *, server_key: str | None = None, duration: int = 30) -> None:
        """Create or renew daemon `name`'s Lease: listed by every router until `duration` seconds pass unrenewed
        (renew it every duration/3)."""
        self._listed = None
        lease = lease_name("d", name)
        meta = self._k8s.V1ObjectMeta(name=lease, labels={**MANAGED, RECORD_LABEL: "daemon"},
                                      annotations={ENDPOINT_ANNOTATION: where,
                                                   **({SERVER_KEY_ANNOTATION: server_key} if server_key else {})})
        for _ in range(RETRIES):
            current = self._get(lease)
            now = _micro()
            try:
                if current is None:
                    body = self._k8s.V1Lease(metadata=meta, spec=self._k8s.V1LeaseSpec(
                        holder_identity=name, lease_duration_seconds=duration, acquire_time=now, renew_time=now))
                    self._do(lambda: self._api.create_namespaced_lease(self.namespace, body))
                else:
                    meta.resource_version = current.metadata.resource_version
                    body = self._k8s.V1Lease(metadata=meta, spec=self._k8s.V1LeaseSpec(
                        holder_identity=name, lease_duration_seconds=duration, acquire_time=_micro(current.spec.acquire_time),
                        renew_time=now))
                    self._do(lambda: self._api.replace_namespaced_lease(lease, self.namespace, body))
                return
            except self._k8s.ApiException as exc:
                if exc.status not in (404, 409):
                    raise self._fault(exc) from None
        raise ControlFault(Fault.FAILED, f"the Lease of daemon {name!r} kept changing under {RETRIES} tries")

    def withdraw(self, name: str) -> None:
        """Remove daemon `name`'s Lease (it stops serving)."""
        self._listed = None
        try:
            self._do(lambda: self._api.delete_namespaced_lease(lease_name("d", name), self.namespace))
        except self._k8s.ApiException as exc:
            if exc.status != 404:
                raise self._fault(exc) from None

    # -- plumbing -------------------------------------------------------------------------------------------
    def _session_lease(self, key: str, daemon: str) -> Any:
        return self._k8s.V1Lease(
            metadata=self._k8s.V1ObjectMeta(name=lease_name("s", key), labels={**MANAGED, RECORD_LABEL: "session"},
                                            annotations={KEY_ANNOTATION: key}),
            spec=self._k8s.V1LeaseSpec(holder_identity=daemon, acquire_time=_micro(), lease_transitions=0))

    def _read(self, key: str) -> Any:
        lease = self._get(lease_name("s", key))
        if lease is not None and (lease.metadata.annotations or {}).get(KEY_ANNOTATION) != key:
            raise ControlFault(Fault.FAILED, f"the Lease {lease.metadata.name} is the record of another key than {key!r}")
        return lease

    def _get(self, name: str) -> Any:
        try:
            return self._do(lambda: self._api.read_namespaced_lease(name, self.namespace))
        except self._k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise self._fault(exc) from None

    def _do(self, fn: Any) -> Any:
        """One API call; an API server that cannot be reached is UNREACHABLE (its refusals stay ApiException)."""
        from urllib3.exceptions import HTTPError

        try:
            return fn()
        except (HTTPError, OSError) as exc:
            raise ControlFault(Fault.UNREACHABLE, f"the Kubernetes API server did not answer: {exc}") from None

    def _fault(self, exc: Any) -> ControlFault:
        fault = Fault.FORBIDDEN if exc.status in (401, 403) else Fault.FAILED
        return ControlFault(fault, f"Kubernetes API ({self.namespace}): {exc.status} {exc.reason}")


def announce_while_serving(owners: LeaseOwners, name: str, endpoint: str, runtime_dir: str, *, every: float = 10.0,
                           stop: "Any" = None) -> None:
    """Keep daemon `name` announced at `endpoint` while the daemon of `runtime_dir` answers `health` on its ipc://
    socket there (its CURVE key read from its connection file), withdrawn while it does not; until `stop` (a
    threading.Event) is set, then withdrawn. The daemon is asked, not its pid looked up: a sidecar container has a
    PID namespace of its own, where the daemon's pid names no one."""
    import os
    import threading

    import msgspec

    from ...ipc import gateway
    from .client import Client
    from .locate import FILE_NAME

    stop = stop or threading.Event()
    announced = False
    while not stop.is_set():
        try:
            with open(os.path.join(runtime_dir, FILE_NAME), "rb") as f:
                where = msgspec.json.decode(f.read(), type=gateway.ConnectionFile)
            local = next(e for e in where.control if e.startswith("ipc://"))
            with Client(local, kind="gateway", name=f"announce-{name}", timeout=max(1.0, every)) as probe:
                probe.health()
        except (OSError, StopIteration, msgspec.DecodeError, msgspec.ValidationError, ControlFault):
            if announced:
                owners.withdraw(name)  # its daemon is not serving: routers must not send it new sessions
                announced = False
        else:
            owners.announce(name, endpoint, server_key=where.server_key, duration=max(1, round(3 * every)))
            announced = True
        stop.wait(every)
    if announced:
        owners.withdraw(name)


def main(argv: "list[str] | None" = None) -> int:
    """`python -m deadstop.supervisor.client.leases --namespace NS --name NODE --endpoint tcp://IP:7400
    --connection-file /run/deadstop/daemon/daemon.json`: a DaemonSet pod's sidecar, announcing its node's daemon
    to the routers; SIGTERM withdraws it."""
    import argparse
    import signal
    import threading

    parser = argparse.ArgumentParser(prog="python -m deadstop.supervisor.client.leases", description=main.__doc__)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True, help="the daemon's name in owner records (its node's name)")
    parser.add_argument("--endpoint", required=True, help="where routers reach its control socket (tcp://POD_IP:PORT)")
    parser.add_argument("--runtime-dir", required=True, help="the daemon's runtime directory (daemon.json, its ipc:// socket)")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between renewals (the Lease lasts 3x that)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    announce_while_serving(LeaseOwners(args.namespace), args.name, args.endpoint, args.runtime_dir, every=args.every,
                           stop=stop)
    return 0


__all__ = ["LeaseOwners", "announce_while_serving", "lease_name"]


if __name__ == "__main__":
    raise SystemExit(main())
