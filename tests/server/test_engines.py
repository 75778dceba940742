"""The same ServerApp/ClientApp on Flower's engines: Ray simulation and the deployment engine (slow)."""
import numpy as np
import pytest

from edge_runtime.schema import Schema
from mmn_fed import load_builtin
from server.engines import run_federation
from server.engines.deployment import run_deployment

FAST = {"local_epochs": 1, "state_size": 8, "hidden": 8, "val_fraction": 0.0, "keep_best": False, "patience_rounds": 0}


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_inprocess_and_ray_give_the_same_final_weights(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:60] for n, df in list(sites.items())[:3]}
    a = run_federation(small, schema, rounds=2, seed=3, run_dir=tmp_path / "inproc", **FAST)
    b = run_federation(small, schema, rounds=2, seed=3, run_dir=tmp_path / "ray", engine="ray", **FAST)
    assert max_diff(a.trained.model.state_dict(), b.trained.model.state_dict()) <= 1e-6
    assert [h["round"] for h in b.history] == [1, 2]


def _running(pid):
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
def test_deployment_engine_on_loopback_with_tls_and_node_auth(heart_sites, tmp_path):
    """Flower's deployment engine (SuperLink with TLS and SuperNode authentication, one SuperNode per site)
    ends at the in-process engine's model for the same sites and settings, and stops what it started."""
    sites, schema = heart_sites
    two = {n: sites[n].iloc[:80] for n in ("Cleveland", "Hungary")}
    rc = {"num-server-rounds": 2, "local-epochs": 1, "state-size": 8, "hidden": 8, "tasks": "disease",
          "dataset": "heart", "val-fraction": 0.2, "seed": 0, "run-dir": str(tmp_path / "run")}
    res = run_deployment(two, rc, tmp_path / "deploy", tls=True, auth=True)
    assert [h["round"] for h in res.history] == [1, 2]
    assert all({"train_loss/Cleveland", "train_loss/Hungary"} <= set(h["train"]) for h in res.history)
    assert {r["site"] for r in res.evaluations} == {"Cleveland", "Hungary"}
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"model.pt", "history.json", "metrics.json"}
    # the nodes authenticated with their own keys over TLS: the files the deployment made for that
    assert sorted(p.name for p in (tmp_path / "deploy" / "credentials" / "nodes").glob("*.pub")) == ["node0.pub",
                                                                                                    "node1.pub"]
    # the same settings as the deployment's run config (everything else at its default, keep-best included)
    inproc = run_federation(two, schema, rounds=2, seed=0, run_dir=tmp_path / "inproc", local_epochs=1, state_size=8,
                            hidden=8, val_fraction=0.2)
    assert max_diff(inproc.trained.model.state_dict(), res.trained.model.state_dict()) <= 1e-6
    assert [h["train"]["train_loss"] for h in res.history] == pytest.approx(
        [h["train"]["train_loss"] for h in inproc.history], abs=1e-6)
    # every process it started is gone
    started = res.extra["stopped_pids"]
    assert len(started) >= 3  # SuperLink and two SuperNodes, at least
    assert not [p for p in started if _running(p)]


@pytest.mark.slow
def test_unregistered_supernode_is_refused_and_the_superlink_speaks_tls(tmp_path):
    import json
    import socket
    import ssl

    from server.credentials import make_node_key
    from server.engines.deployment import CONNECTION, LocalDeployment

    with LocalDeployment(tmp_path / "deploy", []) as dep:
        node = dep.add_node({"site-name": "intruder"}, register=False, extra_args=["--max-retries", "2"])
        assert node.wait(timeout=120) != 0
        def nodes():
            listed = json.loads(dep.flwr(["supernode", "list", CONNECTION, "--format", "json"]).stdout)
            assert listed.get("success"), listed  # (the flwr CLI reaches the SuperLink only through its TLS)
            return listed["nodes"]

        assert nodes() == []  # the refused node was never admitted
        _, pub = make_node_key(tmp_path / "keys", "known")
        dep.flwr(["supernode", "register", str(pub), CONNECTION])
        assert [n["status"] for n in nodes()] == ["registered"]  # (the listing does show registered keys)
        # a client that trusts only the deployment's CA gets a verified TLS session for 127.0.0.1
        ctx = ssl.create_default_context(cafile=str(tmp_path / "deploy" / "credentials" / "tls" / "ca.pem"))
        ctx.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", dep.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]


# ---- time series (docs/timeseries.md, "Federation") on the Ray and deployment engines ------------------------

# tiny and deterministic: 2 rounds; 12 patients a site, 3 of them held out for validation (keep-best on: the
# final model is the best round's, chosen by the pooled Brier over validation steps, on every engine alike)
TS_SETTINGS = {"local_epochs": 1, "state_size": 4, "hidden": 4, "val_fraction": 0.25, "seed": 0}


@pytest.fixture(scope="module")
def pbcseq_two_sites():
    """Two sites of 12 pbcseq patients each (by patient); B never measures cholesterol."""
    df, schema = load_builtin("pbcseq")
    ids = sorted(df["id"].unique())
    a = df[df["id"].isin(ids[:12])].reset_index(drop=True)
    b = df[df["id"].isin(ids[12:24])].reset_index(drop=True).copy()
    b["chol"] = np.nan
    return {"A": a, "B": b}, schema


def _observed_steps(schema, rows, val_fraction, seed):
    """What a site must weight its modules by (counted here from its visit table, not by the site's code):
    observed steps of its training patients, patients for the initial state and static encoders."""
    from mmn_fed.sequences import build_sequences

    seqs = build_sequences(schema, rows)
    keep, _ = seqs.holdout(schema.timeseries, val_fraction, seed)
    steps = seqs.subjects(keep).steps
    counts = {"init_state": len(keep), "encoders.demographics": len(keep)}
    for m in schema.timeseries.modalities:
        counts[f"encoders.{m}"] = int(steps[list(schema.modalities[m])].notna().any(axis=1).sum())
    for t in schema.tasks:
        counts[f"decoders.{t}"] = int(steps[f"{t}__target"].notna().sum())
    return counts


def _check_timeseries_model(res, schema, sites):
    """A GRU model that keeps the time-series schema; every site weighted by observed steps."""
    assert res.trained.config.encoder == "gru"
    assert Schema.from_dict(res.trained.metadata["timeseries_schema"]) == schema
    profile = res.extra["profile"]
    for name, rows in sites.items():
        expected = _observed_steps(schema, rows, TS_SETTINGS["val_fraction"], TS_SETTINGS["seed"])
        assert {m: c for m, c in profile[name].items() if c} == {m: c for m, c in expected.items() if c}, name
    assert profile["A"]["encoders.labs"] > profile["A"]["init_state"]  # steps, not patients
    assert not profile["B"].get("encoders.lipids")  # B never trains the cholesterol encoder


@pytest.mark.slow
def test_ray_engine_on_time_series_gives_the_inprocess_model(pbcseq_two_sites, tmp_path):
    sites, schema = pbcseq_two_sites
    a = run_federation(sites, schema, rounds=2, run_dir=tmp_path / "inproc", **TS_SETTINGS)
    b = run_federation(sites, schema, rounds=2, run_dir=tmp_path / "ray", engine="ray", **TS_SETTINGS)
    assert [h["round"] for h in b.history] == [1, 2]
    assert max_diff(a.trained.model.state_dict(), b.trained.model.state_dict()) <= 1e-6
    assert b.extra["selection"]["final_round"] == a.extra["selection"]["final_round"]
    _check_timeseries_model(b, schema, sites)
    assert b.extra["profile"] == a.extra["profile"]


@pytest.mark.slow
def test_deployment_engine_on_time_series_gives_the_inprocess_model(pbcseq_two_sites, tmp_path):
    """One SuperNode per site (TLS, SuperNode authentication) reading its own visit table; the time-series
    schema reaches the ServerApp through the data dir and the sites through the server's messages."""
    sites, schema = pbcseq_two_sites
    rc = {"num-server-rounds": 2, "local-epochs": 1, "state-size": 4, "hidden": 4, "val-fraction": 0.25,
          "seed": 0, "run-dir": str(tmp_path / "run")}
    res = run_deployment(sites, rc, tmp_path / "deploy", tls=True, auth=True, schema=schema)
    assert [h["round"] for h in res.history] == [1, 2]
    assert {r["site"] for r in res.evaluations} == {"A", "B"}
    _check_timeseries_model(res, schema, sites)
    inproc = run_federation(sites, schema, rounds=2, run_dir=tmp_path / "inproc", **TS_SETTINGS)
    assert max_diff(inproc.trained.model.state_dict(), res.trained.model.state_dict()) <= 1e-6
    assert res.extra["profile"] == inproc.extra["profile"]
    assert not [p for p in res.extra["stopped_pids"] if _running(p)]


def test_deployment_refuses_a_schema_given_twice(pbcseq_two_sites, tmp_path):
    sites, schema = pbcseq_two_sites
    with pytest.raises(ValueError, match="schema given twice"):
        run_deployment(sites, {"schema": "other.toml", "run-dir": str(tmp_path / "run")}, tmp_path, schema=schema)
    with pytest.raises(ValueError, match="test_sites need the schema"):
        run_deployment(sites, {"run-dir": str(tmp_path / "run")}, tmp_path, test_sites=sites)
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The OS may offer a port again before the SuperNode it was given to has bound it; two SuperNodes on one
    port left one dead and the run waiting 120 s for 4 nodes (found running deploy-local in a fresh venv)."""
    import mmn_fed.processes as procs

    offered = iter([45001, 45001, 45001, 45002])

    class OS:  # what bind(0) answers, as the kernel did: the same port again
        def __init__(self, *a):
            self.port = None

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def bind(self, addr):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(procs, "_GIVEN", set())
    monkeypatch.setattr(procs.socket, "socket", OS)
    assert [procs.free_port(), procs.free_port()] == [45001, 45002]


def test_a_supernode_that_dies_at_start_is_named(tmp_path):
    import subprocess
    import sys

    from mmn_fed.processes import free_port
    from server.engines.deployment import DeploymentError, LocalDeployment

    dep = LocalDeployment(tmp_path, [{"site-name": "Hungary"}])
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(DeploymentError, match=r"SuperNode 0 \(Hungary\) exited with code 3"):
        dep._wait_port(free_port(), "SuperNode 0 (Hungary)", proc=proc)
