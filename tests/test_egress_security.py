"""G6: the worker is untrusted. Forged, malformed and oversized requests from a
real run, on the real socket, are each refused with their own code, journaled,
and change nothing for anyone else."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import behaviours
from ipc.errors import ErrorCode
from supervisor import Supervisor


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


def test_runtime_directory_is_owner_only() -> None:
    with Supervisor() as sup:
        runtime = sup.core.runtime_dir
        mode = stat.S_IMODE(os.stat(runtime).st_mode)
        assert mode == 0o700
        assert os.path.exists(os.path.join(runtime, "egress"))
    assert not os.path.exists(runtime), "the socket directory must be removed at close"


def test_argv_run_never_sees_its_credential_in_the_environment(tmp_path) -> None:
    out = tmp_path / "env.txt"
    with Supervisor() as sup:
        run = sup.start(["/bin/sh", "-c", f"env > {out}; cat <&$DEADSTOP_CREDENTIAL_FD > {out}.cred"])
        run.wait(timeout=30)
    env = out.read_text()
    cred = (tmp_path / "env.txt.cred").read_text().strip()
    assert len(cred) == 64
    assert cred not in env
    assert f"DEADSTOP_RUN_ID={run.id}" in env and f"DEADSTOP_RUN_MARKER={run.id}" in env
