"""The same ServerApp/ClientApp on Flower's engines: Ray simulation and the deployment engine (slow)."""
import pytest

from server.deploy import run_deployment
from server.engine import run_federation

FAST = {"local_epochs": 1, "state_size": 8, "hidden": 8}


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


def _flower_processes():
    from pathlib import Path

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "flower-super" in cmd or "flwr-clientapp" in cmd or "flwr-serverapp" in cmd:
                out.append((int(d.name), cmd))
    return out


@pytest.mark.slow
def test_deployment_engine_on_loopback_with_tls_and_node_auth(heart_sites, tmp_path):
    sites, schema = heart_sites
    two = {n: sites[n].iloc[:80] for n in ("Cleveland", "Hungary")}
    before = {pid for pid, _ in _flower_processes()}
    rc = {"num-server-rounds": 2, "local-epochs": 1, "state-size": 8, "hidden": 8, "tasks": "disease",
          "dataset": "heart", "run-dir": str(tmp_path / "run")}
    res = run_deployment(two, rc, tmp_path / "deploy", tls=True, auth=True)
    assert [h["round"] for h in res.history] == [1, 2]
    assert {r["site"] for r in res.evaluations} == {"Cleveland", "Hungary"}
    assert any(r["metric"] == "auroc" for r in res.records)
    log = (tmp_path / "deploy" / "logs" / "superlink.log").read_text()
    assert "--insecure" not in log
    # the global model changed from its seeded initialization
    import torch
    from mmn_fed.model_io import build_from_preprocessor

    torch.manual_seed(0)
    init = build_from_preprocessor(res.trained.preprocessor, res.trained.config).state_dict()
    assert max_diff(init, res.trained.model.state_dict()) > 1e-3
    # every process it started is gone
    leftover = [(p, c) for p, c in _flower_processes() if p not in before]
    assert not leftover, leftover
