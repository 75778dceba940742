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
