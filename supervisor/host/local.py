"""LocalHost: the provisioner that prepares, launches, contains and cleans up runs on this machine.

The engine asks a host for four things per run, and nothing else about the
operating system:

    provision(...)      everything before the fork: an identity, the sandbox
                        plan and environment, a cgroup, kernel limits; on any
                        failure what was taken is given back
    launch(...)         the spawner forks the run inside that plan
    containment_for(...) the layer that signals, freezes, sweeps and watches it
    release(...)        give back what provision took, once the run has ended

For the supervisor's lifetime it owns what those need: the cgroup subtree and
its watcher, the v1 memory/pids hierarchies, the identity pool, the spawner,
and the isolation profile probed once. A remote host would implement the same
calls; the engine holds no cgroup, uid or spawner of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import sys
from typing import Any, Callable

from ...ipc import framing, spawner_wire
from ..errors import ContainmentDegraded, InvalidTarget, LimitUnenforceable
from ..mechanisms import isolation as iso
from ..mechanisms.cgroup_v1 import V1Tree
from ..mechanisms.cgroups import Cgroup, CgroupTree, InotifyWatcher
from ..mechanisms.containment import (CGROUP, PGROUP, PGROUP_SUBREAPER, CgroupContainment, Containment,
                                      ProcessGroupContainment, RunIdentity)
from ..mechanisms.identities import IdentityPool
from ..mechanisms.limits import KernelLimits, Limits, LimitSupport, rlimits_for
from .spawner_client import SpawnerClient, Started

log = logging.getLogger("deadstop.host")

CONTAINMENT_CHOICES = ("auto", CGROUP, "process-group")


@dataclasses.dataclass
class Provisioned:
    """What the host set up for one run before it exists."""

    run_id: str
    uid: int | None
    confined: iso.Confinement
    cgroup: Cgroup | None
    kernel: KernelLimits | None
    plan: dict[str, str]  # limit -> what enforces it


class LocalHost:
    def __init__(self, supervisor_id: str, *, containment: str, isolation: str, uid_range: tuple[int, int],
                 spawner_timeout: float):
        if containment not in CONTAINMENT_CHOICES:
            raise ValueError(f"containment must be one of {CONTAINMENT_CHOICES}, not {containment!r}")
        if isolation not in iso.ISOLATION_CHOICES:
            raise ValueError(f"isolation must be one of {iso.ISOLATION_CHOICES}, not {isolation!r}")
        self._id = supervisor_id
        self._containment_choice = containment
        self._isolation_choice = isolation
        self._uid_range = uid_range
        self._spawner_timeout = spawner_timeout
        self.identities: IdentityPool | None = None
        self.cgroups: CgroupTree | None = None
        self.watcher: InotifyWatcher | None = None
        self.containment_degraded_reason = ""
        self.containment = ""

    # -- lifetime ------------------------------------------------------------------------------
    async def open(self, loop: asyncio.AbstractEventLoop, runtime_dir: str, on_lost: Callable[[], None]) -> None:
        """Set up containment and the spawner, probe isolation; ContainmentDegraded if a requirement fails.

        On any failure what was set up is taken down again before the error is raised.
        """
        self._loop = loop
        self.runtime_dir = runtime_dir
        if self._containment_choice != "process-group":
            self.cgroups, why = CgroupTree.create(self._id)
            if self.cgroups is None:
                if self._containment_choice == CGROUP:
                    raise ContainmentDegraded(f"cgroup containment required but unavailable: {why}")
                self.containment_degraded_reason = why
                log.warning("deadstop: cgroup v2 not usable (%s); using process groups", why)
            else:
                self.watcher = InotifyWatcher(loop)
        else:
            self.containment_degraded_reason = "process-group containment forced by configuration"
        # Kernel limits: v2 controllers where delegated, else v1 memory/pids
        # hierarchies (hybrid hosts), whatever the containment layer.
        self.v1 = V1Tree.create(self._id)
        self.limit_support = LimitSupport(self.cgroups, self.containment_degraded_reason, self.v1)
        isolated = self._isolation_choice != "off"
        try:
            self.spawner = await SpawnerClient.launch(self.cgroups.child("spawner") if self.cgroups else None,
                                                      env=iso.spawner_environment() if isolated else None,
                                                      isolated=isolated)
        except BaseException:
            self._remove_trees()
            raise
        self.spawner.on_lost = on_lost
        self.spawner.answer_timeout = self._spawner_timeout
        try:
            await self._probe_isolation()
            # What the spawner (and its watchdog) must kill should we die.
            self.spawner.configure(spawner_wire.Config(
                cgroup_root=self.cgroups.root.path if self.cgroups else None,
                home_procs=self.cgroups.home_procs if self.cgroups else None,
                uid_block=[self.identities.first, self.identities.size] if self.identities else None))
        except BaseException:
            await self.spawner.shutdown()
            self._remove_trees()
            raise
        if self.cgroups is not None:
            self.containment = CGROUP
        else:
            self.containment = PGROUP_SUBREAPER if self.spawner.subreaper else PGROUP

    async def close(self) -> None:
        """After every run has ended: stop the spawner, remove the cgroups, give back the uid block."""
        await self.spawner.shutdown()
        if self.watcher is not None:
            self.watcher.close()
        self._remove_trees()

    def _remove_trees(self) -> None:
        if self.cgroups is not None:
            self.cgroups.remove()
        self.v1.remove()
        if self.identities is not None:
            self.identities.close()

    async def _probe_isolation(self) -> None:
        """Find which isolation layers this host gives (once), and refuse if strict and any is missing."""
        mode = self._isolation_choice
        if mode == "off":
            self.isolation = iso.profile_from_probe(mode, {})
            return
        if os.geteuid() == 0:
            self.identities = IdentityPool(self._uid_range)
        probe_uid = self.identities.allocate() if self.identities else None
        try:
            results = await self.spawner.probe(iso.probe_plan(probe_uid))
        finally:
            self._release_uid(probe_uid)
        self.isolation = iso.profile_from_probe(mode, results)
        if mode == "strict" and self.isolation.missing:
            raise ContainmentDegraded(f"isolation='strict' but these layers are missing: {self.isolation.missing}")
        if self.isolation.missing:
            log.warning("deadstop: isolation degraded: %s", self.isolation)
        if self.isolation.has("identity"):
            os.chmod(self.runtime_dir, 0o711)  # runs traverse it to their own endpoint, and list nothing
        self._voids = iso.make_voids(self.runtime_dir)
        paths = iso.interpreter_paths()
        if probe_uid is not None:
            run_uid, run_gid = probe_uid, probe_uid  # any run uid sees the host as every other does
        else:
            run_uid, run_gid = os.geteuid(), os.getegid()
        self._planners = {tmp: iso.base_planner(run_uid, run_gid, tmp, paths) for tmp in (False, True)}
        essential = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
        self._unreadable_interpreter = iso.unreadable(sorted(essential), run_uid, run_gid) if probe_uid else []

    @property
    def alive(self) -> bool:
        return bool(self.spawner.alive)

    @property
    def lost_reason(self) -> str:
        return str(self.spawner.lost_reason)

    # -- checks --------------------------------------------------------------------------------
    def check_limits(self, limits: Limits | None) -> dict[str, str]:
        """How each limit would be enforced here (limit -> mechanism); raises
        LimitUnenforceable for a memory_bytes / processes limit no kernel
        controller can enforce, unless Limits(enforcement="sampled")."""
        if limits is not None and not isinstance(limits, Limits):
            raise InvalidTarget(f"limits must be a Limits, not {type(limits).__name__}")
        return self.limit_support.plan(limits)

    def proxy_unavailable(self, isolation: str | None) -> str:
        """Why a proxied run cannot be served here ('' when it can): it needs a network namespace the
        spawner prepares as root, so that the proxy's listener is inside it before the run exists."""
        if isolation == "off" or self.isolation.mode == "off":
            return "the run is not isolated (isolation='off'): it would share the host's network"
        if not self.isolation.has("namespace:network"):
            return "network namespaces are not available on this host (see deadstop doctor)"
        if os.geteuid() != 0:
            return "the spawner is not root, and only a root spawner prepares the runs' network namespaces"
        return ""

    def check_options(self, cwd: str | None, network: str, isolation: str | None = None) -> None:
        if network not in iso.NETWORK_CHOICES:
            raise ValueError(f"network must be one of {iso.NETWORK_CHOICES}, not {network!r}")
        if cwd is not None and not os.path.isdir(cwd):
            raise InvalidTarget(f"cwd {cwd!r} is not a directory")
        if isolation is not None and isolation not in iso.ISOLATION_CHOICES:
            raise ValueError(f"isolation must be one of {iso.ISOLATION_CHOICES} or None, not {isolation!r}")
        if isolation == "strict" and getattr(self, "isolation", None) is not None and self.isolation.missing:
            raise InvalidTarget(f"isolation='strict' for this agent, but this host lacks: {self.isolation.missing}")

    # -- one run ----------------------------------------------------------------------------------
    def provision(self, run_id: str, argv: list[str] | None, cwd: str | None, env: dict[str, str] | None,
                  network: str, private_tmp: bool | None, limits: Limits | None, plan: dict[str, str],
                  masks: list[str], *, trusted: bool = False) -> Provisioned:
        """Everything before the fork; InvalidTarget / LimitUnenforceable with nothing left behind.
        trusted: no sandbox and no identity of its own (an agent registered with isolation="off")."""
        try:
            kernel = KernelLimits.create(run_id, limits, plan, self.v1)  # v1 groups, limits written
        except OSError as exc:
            raise LimitUnenforceable(f"run {run_id}: cannot set its kernel limits {plan}: {exc}") from exc
        confine = not trusted and self.isolation.mode != "off"
        uid = self.identities.allocate() if confine and self.identities is not None and self.isolation.has("identity") \
            else None
        try:
            confined = self._confinement(run_id, uid, argv, cwd, env, network, private_tmp, masks, confine)
        except BaseException:
            self._release_uid(uid)
            if kernel is not None:
                kernel.cleanup()
            raise
        cgroup = self.cgroups.child(f"run-{run_id}") if self.cgroups else None
        if kernel is not None:
            try:
                kernel.apply_v2(cgroup)
            except OSError as exc:
                if cgroup is not None:
                    cgroup.remove()
                kernel.cleanup()
                self._forget_endpoint(run_id)
                self._release_uid(uid)
                raise LimitUnenforceable(f"run {run_id}: cannot set its kernel limits {plan}: {exc}") from exc
        return Provisioned(run_id, uid, confined, cgroup, kernel, plan)

    def start_message(self, p: Provisioned, *, blob: bytes | None, argv: list[str] | None, generation: int,
                      egress: str, limits: Limits | None) -> spawner_wire.Start:
        confined, cgroup, kernel = p.confined, p.cgroup, p.kernel
        return spawner_wire.Start(
            run_id=p.run_id, blob=blob, argv=argv, env=confined.env, clean_env=confined.clean_env,
            cwd=confined.cwd, cgroup_procs=cgroup.procs_file if cgroup else None, pin_group=cgroup is None,
            generation=generation, egress=egress, supervisor_pid=os.getpid(),
            rlimits=rlimits_for(limits, p.plan), sandbox=confined.plan,
            # v1 memory/pids groups, joined (as root, before any user code) right after the v2 cgroup
            join_cgroups=kernel.join_files() if kernel is not None else [])

    async def launch(self, msg: spawner_wire.Start, credential: bytes, stdio_fd: int | None = None, *,
                     still_wanted: Callable[[], bool] | None = None) -> Started:
        """Fork the run; its credential travels in a sealed memfd, never in its environment.
        stdio_fd: the run's stdin and stdout (an argv run). still_wanted: asked once a start slot is
        free, before the spawner is; False fails the start (nothing was forked)."""
        cred_fd = framing.credential_memfd(credential)
        try:
            return await self.spawner.start(msg, cred_fd, stdio_fd, still_wanted=still_wanted)
        finally:
            os.close(cred_fd)

    def containment_for(self, p: Provisioned, pid: int, leaders: Callable[[], set[int]]) -> Containment:
        """`leaders`: every live run's leader pid (its own included), read at each sweep."""
        marker = f"{framing.ENV_MARKER}={p.run_id}"
        if p.cgroup is not None:
            identity = RunIdentity(p.uid, marker.encode(), self.spawner.pid if self.spawner.subreaper else None,
                                   leaders, pid)
            return self.cgroup_layer(p.cgroup, identity)
        return ProcessGroupContainment(pid, marker, self.spawner.pid, self.spawner.subreaper, uid=p.uid)

    def cgroup_layer(self, cgroup: Cgroup, identity: RunIdentity | None = None) -> CgroupContainment:
        assert self.watcher is not None and self.cgroups is not None  # a run has a cgroup only then
        return CgroupContainment(cgroup, self.watcher, self.cgroups.has_kill, identity)

    def abort(self, p: Provisioned) -> None:
        """A start that failed after provision: remove its cgroup and kernel groups (what they hold is
        already killed by the stop path's abort_start), then give back the rest."""
        if p.cgroup is not None:
            p.cgroup.remove()  # if still populated, close() removes the subtree after the spawner is gone
        if p.kernel is not None:
            p.kernel.cleanup()  # kills a child forked before the cancel, removes the v1 groups
        self.release(p.run_id, p.uid)

    def release(self, run_id: str, uid: int | None) -> None:
        """Give back what the run's confinement held once it ended: its endpoint directory, its uid
        (None: quarantined, because something of the run survived)."""
        self.spawner.run_ended(run_id)
        self._forget_endpoint(run_id)
        self._release_uid(uid)

    def _forget_endpoint(self, run_id: str) -> None:
        endpoint_dir = os.path.join(self.runtime_dir, f"r-{run_id}")
        try:
            os.rmdir(endpoint_dir)  # empty: the broker removed the socket when it closed the endpoint
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(endpoint_dir, ignore_errors=True)

    def _release_uid(self, uid: int | None) -> None:
        if uid is not None and self.identities is not None:
            self.identities.release(uid)

    def _confinement(self, run_id: str, uid: int | None, argv: list[str] | None, cwd: str | None,
                     env: dict[str, str] | None, network: str, private_tmp: bool | None,
                     masks: list[str], confine: bool = True) -> iso.Confinement:
        """The run's sandbox plan, environment and endpoint; InvalidTarget if its cwd is unusable."""
        if not confine:
            return iso.Confinement(None, dict(env or {}), False, cwd, None, {"mode": "off", "network": "host"})
        if private_tmp is None:
            private_tmp = self.isolation.mode == "strict"
        workdir = os.path.abspath(cwd) if cwd else "/"
        if uid is not None:
            why = iso.check_workspace(workdir, uid, uid)
            if why:
                raise InvalidTarget(why)
            blocked = self._unreadable_interpreter + iso.unreadable(
                [a for a in argv or () if os.path.isabs(a)], uid, uid)
            if blocked:
                raise InvalidTarget(f"the run's own uid could not read {', '.join(blocked)} even inside its "
                                    "namespace (the mode itself refuses others); make it world-readable, "
                                    "or pass isolation='off' for trusted code")
        endpoint_dir = None
        if uid is not None:
            endpoint_dir = os.path.join(self.runtime_dir, f"r-{run_id}")
            os.mkdir(endpoint_dir, 0o710)
            os.chown(endpoint_dir, 0, uid)
        # A run without an identity of its own reaches the shared socket in the runtime directory:
        # that directory is then what its mount namespace must still show (the base may sit on a
        # filesystem the sandbox covers with a private tmpfs, as /dev/shm or a private /tmp).
        reached = endpoint_dir if endpoint_dir is not None else self.runtime_dir
        plan = iso.sandbox_plan(self.isolation, run_id, uid, workdir, argv, network,
                                self._planners[bool(private_tmp)], reached, self._voids, masks=masks)
        summary: dict[str, Any] = {**self.isolation.to_dict(), "network": network, "private_tmp": private_tmp}
        if network == "host":
            summary["missing"] = {**summary["missing"], "namespace:network": "network='host': the run is unconfined"}
            summary["active"] = [n for n in summary["active"] if n != "namespace:network"]
        return iso.Confinement(plan, iso.run_environment(env, workdir), True, workdir, endpoint_dir, summary)
