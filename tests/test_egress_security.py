"""G6: the worker is untrusted. Forged, malformed and oversized requests from a
real run, on the real socket, are each refused with their own code, journaled,
and change nothing for anyone else."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import behaviours
from deadstop.ipc.errors import ErrorCode
from deadstop.supervisor import Supervisor


def test_forged_malformed_and_oversized_requests_are_refused(tmp_path) -> None:
    secret_calls: list[str] = []
    ready = threading.Event()
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("secret", lambda: secret_calls.append("called") or "leaked")
        sup.register_tool("echo", lambda text: text)
        sup.register_tool("ready", ready.set)
        victim = sup.start(behaviours.victim, tools=["secret", "ready"])
        assert ready.wait(30)

        attacker = sup.start(behaviours.attacker, victim.id, tools=["echo"])
        codes = attacker.result(timeout=60)

        assert codes == {
            "own_credential_other_run": ErrorCode.UNAUTHENTICATED,
            "guessed_credential": ErrorCode.UNAUTHENTICATED,
            "empty_credential": ErrorCode.UNAUTHENTICATED,
            "unknown_run": ErrorCode.UNAUTHENTICATED,
            "too_few_frames": ErrorCode.MALFORMED,
            "too_many_frames": ErrorCode.MALFORMED,
            "bad_version": ErrorCode.BAD_VERSION,
            "not_json": ErrorCode.MALFORMED,
            "missing_field": ErrorCode.MALFORMED,
            "wrong_type": ErrorCode.MALFORMED,
            "unknown_verb": ErrorCode.MALFORMED,
            "stale_generation": ErrorCode.STALE_GENERATION,
            "generation_not_a_number": ErrorCode.MALFORMED,
            "id_out_of_range": ErrorCode.MALFORMED,
            "negative_id": ErrorCode.MALFORMED,
            "oversized": ErrorCode.TOO_LARGE,
            "over_hard_cap": None,  # libzmq drops the peer before Python sees a byte
            "unknown_tool": ErrorCode.TOOL_DENIED,  # not on the allow-list: existence is not revealed
            "denied_tool": ErrorCode.TOOL_DENIED,
            "bad_arguments": ErrorCode.BAD_ARGUMENTS,
            "still_served": 0,
        }
        assert secret_calls == [], "a forged request reached the victim's tool"
        assert victim.state.value == "running", "the victim must be untouched"
        victim.stop()

        db = sqlite3.connect(sup.journal_path)
        refused = {code for (code,) in db.execute("SELECT code FROM egress WHERE decision = 'refused'")}
        db.close()
        expected = {int(c) for c in codes.values() if c}
        assert expected <= refused, f"refusals missing from the journal: {expected - refused}"


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


def test_runtime_directory_is_owner_only() -> None:
    """Nobody but the supervisor lists or creates anything in its runtime
    directory. With per-run identities a run may traverse it, and reaches only
    its own endpoint: the shared socket is the owner's alone."""
    ready = threading.Event()
    with Supervisor() as sup:
        sup.register_tool("ready", ready.set)
        runtime = sup.core.runtime_dir
        mode = stat.S_IMODE(os.stat(runtime).st_mode)
        identities = sup.isolation.has("identity")
        assert mode == (0o711 if identities else 0o700)
        shared = os.stat(os.path.join(runtime, "egress"))
        assert stat.S_ISSOCK(shared.st_mode) and stat.S_IMODE(shared.st_mode) & 0o077 == 0
        if identities:
            run = sup.start(behaviours.victim, tools=["ready"])
            assert ready.wait(30)
            uid = _uid_of(run.pid)
            own = [os.path.join(runtime, n) for n in os.listdir(runtime) if n.startswith("r-")]
            assert len(own) == 1, own
            st = os.stat(own[0])
            assert (st.st_uid, st.st_gid) == (0, uid), "the endpoint directory belongs to root and the run's gid"
            assert stat.S_IMODE(st.st_mode) & 0o077 == 0o010, f"only the run's gid may traverse it: {oct(st.st_mode)}"
            run.stop()
            assert not os.path.exists(own[0]), "stop() removes the run's endpoint"
    assert not os.path.exists(runtime), "the socket directory must be removed at close"


def test_argv_run_never_sees_its_credential_in_the_environment(workspace, monkeypatch) -> None:
    monkeypatch.setenv("GATEWAY_SMTP_PASSWORD", "canary-d41d8cd9")  # a host secret
    out = workspace / "env.txt"
    with Supervisor() as sup:
        # The fd is read through /proc: dash's `<&N` takes one digit only, and the fd may be 10 or more.
        run = sup.start(["/bin/sh", "-c", f"env > {out}; cat /proc/self/fd/$DEADSTOP_CREDENTIAL_FD > {out}.cred"],
                        cwd=str(workspace))
        run.wait(timeout=30)
    env = out.read_text()
    cred = (workspace / "env.txt.cred").read_text().strip()
    assert len(cred) == 64
    assert cred not in env
    assert f"DEADSTOP_RUN_ID={run.id}" in env and f"DEADSTOP_RUN_MARKER={run.id}" in env
    # The run starts from a clean environment: nothing of the host's reaches it.
    assert "canary-d41d8cd9" not in env and "GATEWAY_SMTP_PASSWORD" not in env
