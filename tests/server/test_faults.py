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

from server.engines import read_result, write_site_data
from server.engines.inprocess import InProcessGrid, run_inprocess, server_context

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
        def up():  # the SuperLink, both SuperNodes, and the run started (its `flwr-serverapp` process)
            procs = tagged(tag).values()
            return (sum("flower-superlink" in c for c in procs) == 1 and sum("flower-supernode" in c for c in procs) == 2
                    and any("flwr-serverapp" in c for c in procs))
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


# ---- a site with broken data is excluded by name; the others federate; the quorum decides when to stop --------

SMALL = {"num-server-rounds": 1, "val-fraction": 0.0, "keep-best": False, "patience-rounds": 0, "state-size": 8,
         "hidden": 8, "seed": 0}
GOOD, BAD = ("Cleveland", "Hungary"), "VA Long Beach"


def break_rows(kind: str, df, schema):
    """A copy of ``df`` broken in one way (the CSV as written, or None for a file written by ``break_file``)."""
    df = df.copy()
    if kind == "zero rows":
        return df.iloc[:0]
    if kind == "label column missing":
        return df.drop(columns=[schema.tasks["disease"].column])
    if kind == "some columns of a modality missing":
        return df.drop(columns=[schema.modalities["rest"][0]])
    if kind == "string in a numeric column":
        df["age"] = df["age"].astype(object)
        df.loc[3, "age"] = "forty"
        return df
    return df


def break_file(kind: str, path: Path) -> None:
    if kind == "unreadable file":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + os.urandom(256))
    if kind == "empty file":
        path.write_bytes(b"")


def federate(tmp_path, sites, schema, broken_files=None, client=None, **settings):
    """The in-process engine over ``sites`` (ServerApp and ClientApp as on every engine); ``broken_files``:
    site index -> kind for ``break_file``. Returns the result, or raises the run's FederationError."""
    data = write_site_data(tmp_path / "data", sites, schema)
    for i, kind in (broken_files or {}).items():
        break_file(kind, data / f"site_{i}.csv")
    rc = {**SMALL, "data-dir": str(data), "run-dir": str(tmp_path / "run"), **settings}
    if client is None:
        run_inprocess(rc, len(sites))
    else:
        from server.app import app as server_app
        grid = InProcessGrid(client, [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))], rc)
        server_app(grid, server_context(rc))
    return read_result(tmp_path / "run")


@pytest.fixture
def flwr_log():
    """What the ServerApp logs (Flower's logger does not propagate to the root logger)."""
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = Keep()
    logging.getLogger("flwr").addHandler(h)
    yield records
    logging.getLogger("flwr").removeHandler(h)


REASONS = {"zero rows": "no data rows", "label column missing": "'num' (task disease) not in the data",
           "some columns of a modality missing": "(modality rest) not in the data",
           "string in a numeric column": "value 'forty'", "unreadable file": "site_2.csv as a CSV table (UnicodeDecodeError",
           "empty file": "site_2.csv as a CSV table (EmptyDataError"}


@pytest.mark.parametrize("kind", list(REASONS))
def test_a_site_with_broken_data_is_excluded_by_name_and_the_others_federate(kind, heart_sites, tmp_path, flwr_log):
    sites, schema = heart_sites
    chosen = {n: sites[n].iloc[:60].reset_index(drop=True) for n in GOOD}
    chosen[BAD] = break_rows(kind, sites[BAD].iloc[:60].reset_index(drop=True), schema)
    res = federate(tmp_path, chosen, schema, broken_files={2: kind})
    assert list(res.extra["excluded"]) == [BAD]  # by its name, not its node id
    assert REASONS[kind] in res.extra["excluded"][BAD]
    assert sorted(res.extra["profile"]) == sorted(GOOD)  # the others federated, the broken site took no part
    assert len(res.history) == 1 and {c["site"] for c in res.comm} == set(GOOD)
    assert res.trained.metadata["provenance"]["excluded"] == res.extra["excluded"]
    assert any(f"site '{BAD}' excluded" in m and REASONS[kind] in m for m in flwr_log)


def test_a_site_without_any_column_of_a_modality_federates_without_that_modality(heart_sites, tmp_path, flwr_log):
    """Not broken: MultiModN's point. The site trains every other module; it never receives the imaging encoder."""
    sites, schema = heart_sites
    chosen = {n: sites[n].iloc[:60].reset_index(drop=True) for n in GOOD}
    chosen[BAD] = sites[BAD].iloc[:60].drop(columns=list(schema.modalities["imaging"])).reset_index(drop=True)
    res = federate(tmp_path, chosen, schema)
    assert res.extra["excluded"] == {}
    assert res.extra["profile"][BAD].get("encoders.imaging", 0) == 0 and res.extra["profile"][BAD]["encoders.rest"] > 0
    assert not any(m.startswith("encoders.imaging") for c in res.comm if c["site"] == BAD for m in c["modules"])
    assert any(f"site '{BAD}' holds no column of modality(ies) imaging" in m for m in flwr_log)


def test_fewer_valid_sites_than_the_quorum_stop_the_run_naming_the_excluded_sites(heart_sites, tmp_path):
    from server.app import FederationError

    sites, schema = heart_sites
    chosen = {"Cleveland": sites["Cleveland"].iloc[:60], "Hungary": sites["Hungary"].iloc[:0],
              BAD: break_rows("label column missing", sites[BAD].iloc[:60], schema)}
    with pytest.raises(FederationError) as e:
        federate(tmp_path, chosen, schema, quorum=2)
    msg = str(e.value)
    assert "before round 1: 1 valid site(s), fewer than quorum = 2" in msg
    assert "'Hungary': " in msg and "no data rows" in msg and f"'{BAD}': " in msg and "'num' (task disease)" in msg
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # stopped before round 1
    # the same sites with quorum 1 (the default): Cleveland federates alone
    res = federate(tmp_path / "q1", chosen, schema)
    assert sorted(res.extra["excluded"]) == ["Hungary", BAD] and list(res.extra["profile"]) == ["Cleveland"]


def test_a_round_with_fewer_updates_than_the_quorum_stops_the_run(heart_sites, tmp_path):
    from clients.app import app as client_app
    from server.app import FederationError

    sites, schema = heart_sites
    chosen = {n: sites[n].iloc[:40].reset_index(drop=True) for n in (*GOOD, BAD)}

    def one_site_fails_training(msg, ctx):
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 2:
            raise RuntimeError("disk full")
        return client_app(msg, ctx)

    res = federate(tmp_path / "q2", chosen, schema, client=one_site_fails_training, quorum=2)  # 2 of 3: goes on
    assert [f["site"] for f in res.extra["failures"]] == [BAD]
    with pytest.raises(FederationError, match=r"round 1: 2 site\(s\) returned an update, fewer than quorum = 3; "
                                              r"failures: \{'VA Long Beach': 'RuntimeError: disk full'\}"):
        federate(tmp_path / "q3", chosen, schema, client=one_site_fails_training, quorum=3)


# ---- the coordinator crashes mid-run on the deployment engine; `deploy-local` again resumes ----------------------

@pytest.mark.slow
def test_deploy_local_killed_after_a_round_resumes_from_its_checkpoint(tmp_path):
    """The coordinator's machine dies (SIGKILL to `deploy-local`: the SuperLink, ServerApp and SuperNodes go with
    it) once round 1's checkpoint is written; the same command again resumes after round 1 and finishes."""
    import json

    tag = f"MMN_FED_FAULT_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(REPO), tag.split("=")[0]: tag.split("=")[1]}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmn_fed.cli", "deploy-local", "--sites", "2", "--rounds", "2", "--insecure",
           "--tasks", "disease", "--patience-rounds", "0", "--out", str(out)]
    first = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ckpt = out / "run" / "checkpoint.pt"
        assert wait_for(lambda: ckpt.exists() or first.poll() is not None, 400, 1.0) and first.poll() is None, \
            (first.stdout.read().decode()[-3000:] if first.poll() is not None else "no checkpoint")
        first.kill()
        first.wait(timeout=20)
        assert wait_for(lambda: not tagged(tag), 20) is True, f"left running: {tagged(tag)}"
        assert not (out / "run" / "model.pt").exists()  # killed mid-run
        again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        history = json.loads((out / "run" / "history.json").read_text())
        assert [e["round"] for e in history] == [1, 2]
        log = (out / "logs" / "flwr_run.log").read_text()
        assert "resuming" in log and "after round 1" in log
    finally:
        for pid in tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if first.poll() is None:
            first.kill()
        first.wait()
