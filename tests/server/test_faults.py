"""Faults the federation survives (docs/federation.md, "Faults"): `mmn-fed deploy-local` stopped by a signal,
a site with broken data, too few valid sites (the quorum)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# ---- `mmn-fed deploy-local` stopped by SIGTERM / Ctrl-C stops every process it started ------------------------

def tagged(tag: str) -> dict[int, str]:
    """Every live process whose environment holds ``tag`` (inherited by all descendants, reparented or not):
    pid -> command line."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if tag.encode() not in (d / "environ").read_bytes():
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state not in ("Z", "X"):
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def wait_for(predicate, timeout: float, step: float = 0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_deploy_local_stopped_by_a_signal_stops_every_process_it_started(sig, tmp_path):
    """SIGTERM (a supervisor, `timeout`) and SIGINT (Ctrl-C) shut down cleanly: the SuperLink, SuperNodes,
    SuperExecs and app processes stop, exit code 128 + signal. SIGKILL cannot be handled: the kernel then sends
    the SuperLink and SuperNodes SIGTERM (PR_SET_PDEATHSIG), which stop their own children."""
    tag = f"MMN_FED_FAULT_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(REPO), tag.split("=")[0]: tag.split("=")[1]}
    cmd = [sys.executable, "-m", "mmn_fed.cli", "deploy-local", "--sites", "2", "--rounds", "1", "--insecure",
           "--tasks", "disease", "--out", str(tmp_path / "out")]
    parent = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up():  # the SuperLink, both SuperNodes, and the run submitted (`flwr run`)
            procs = tagged(tag).values()
            return (sum("flower-superlink" in c for c in procs) == 1 and sum("flower-supernode" in c for c in procs) == 2
                    and any(" run " in c and "flwr" in c for c in procs))
        assert wait_for(up, 90), f"deployment not up: {tagged(tag)}\n{parent.stdout.read1(20000).decode() if parent.poll() is not None else ''}"
        before = tagged(tag)
        parent.send_signal(sig)
        try:
            code = parent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"deploy-local still running 20 s after {sig.name}")
        out = parent.stdout.read().decode()
        survivors = wait_for(lambda: not tagged(tag), 10) or tagged(tag)
        assert survivors is True, f"still running after {sig.name}: {survivors} (before: {before})"
        if sig != signal.SIGKILL:
            assert code == 128 + sig, out[-3000:]
            assert f"stopped by {sig.name}" in out
    finally:
        for pid in tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if parent.poll() is None:
            parent.kill()
        parent.wait()
