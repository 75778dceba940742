"""The same ServerApp/ClientApp on Flower's engines: Ray simulation and the deployment engine (slow)."""
import pytest

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
    sites, schema = heart_sites
    two = {n: sites[n].iloc[:80] for n in ("Cleveland", "Hungary")}
    rc = {"num-server-rounds": 2, "local-epochs": 1, "state-size": 8, "hidden": 8, "tasks": "disease",
          "dataset": "heart", "run-dir": str(tmp_path / "run")}
    res = run_deployment(two, rc, tmp_path / "deploy", tls=True, auth=True)
    assert [h["round"] for h in res.history] == [1, 2]
    assert {r["site"] for r in res.evaluations} == {"Cleveland", "Hungary"}
    assert any(r["metric"] == "auroc" for r in res.records)
    log = (tmp_path / "deploy" / "logs" / "superlink.log").read_text()
    assert "running on https://127.0.0.1" in log  # TLS
    assert log.count("[ControlServicer.RegisterNode] Created node_id") == 2  # both nodes registered by key
    # the global model changed from its seeded initialization
    import torch
    from mmn_fed.model_io import build_from_preprocessor

    torch.manual_seed(0)
    init = build_from_preprocessor(res.trained.preprocessor, res.trained.config).state_dict()
    assert max_diff(init, res.trained.model.state_dict()) > 1e-3
    # every process it started is gone
    started = res.extra["stopped_pids"]
    assert len(started) >= 3  # SuperLink and two SuperNodes, at least
    assert not [p for p in started if _running(p)]


@pytest.mark.slow
def test_unregistered_supernode_is_refused(tmp_path):
    from server.engines.deployment import LocalDeployment

    with LocalDeployment(tmp_path / "deploy", []) as dep:
        node = dep.add_node({"site-name": "intruder"}, register=False, extra_args=["--max-retries", "2"])
        assert node.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "deploy" / "logs" / "supernode0.log").read_text()
