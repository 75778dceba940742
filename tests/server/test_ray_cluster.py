"""The Ray engine on an existing multi-node Ray cluster (docs/federation.md, "Beyond one machine"): a head and a
worker started with `ray start`, as two nodes of this machine, as a researcher starts them on two machines."""
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from mmn_fed.processes import MARK, flower_bin, free_port, marked, stop_tree, terminate
from server.engines import run_federation

FAST = {"local_epochs": 1, "state_size": 8, "hidden": 8, "val_fraction": 0.0, "keep_best": False, "patience_rounds": 0}


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"`ray start` did not start (exit {proc.poll()}); log {path}:\n{path.read_text()[-3000:]}")


@pytest.fixture
def two_node_ray_cluster():
    """(address, head temp dir, worker temp dir): a Ray head and a Ray worker node started with `ray start`,
    1 CPU each, on our own ports and temp dirs (never /tmp/ray, so no other Ray user on this machine joins
    it). Stopped afterwards, also when the test fails: every process carrying this cluster's mark (Ray's GCS,
    raylets, agents and workers inherit the environment of `ray start`), never `ray stop` (which stops every
    Ray instance on the machine)."""
    mark = f"raycluster-{uuid.uuid4().hex[:12]}"
    # short: Ray's unix sockets live under the temp dir and must fit in 107 characters
    root = Path(tempfile.mkdtemp(prefix="mmnray-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({MARK: mark, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    try:
        head_log = root / "head.log"
        with open(head_log, "w") as log:
            procs.append(subprocess.Popen(
                [flower_bin("ray"), "start", "--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
                 "--include-dashboard", "false", "--temp-dir", str(root / "head"), *common],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_for(head_log, "Ray runtime started", procs[0])
        worker_log = root / "worker.log"
        with open(worker_log, "w") as log:
            procs.append(subprocess.Popen(
                [flower_bin("ray"), "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(root / "worker"), *common],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait_for(worker_log, "Ray runtime started", procs[1])
        yield f"127.0.0.1:{port}", root / "head", root / "worker"
    finally:
        # SIGTERM to `ray start --block` stops its node's processes; then whatever still carries the mark
        stop_tree([p.pid for p in procs], timeout=15)
        terminate(marked(mark), timeout=10)
        left = marked(mark)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes of the test cluster still running: {left}"


def _ray_status(address: str, nodes: int, timeout: float = 120) -> str:
    """`ray status` once it lists ``nodes`` active nodes (a node that has just started takes a few seconds to
    show there)."""
    end = time.monotonic() + timeout
    while True:
        res = subprocess.run([flower_bin("ray"), "status", "--address", address], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        active = res.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        if len(re.findall(r"node_[0-9a-f]+", active)) == nodes or time.monotonic() > end:
            return res.stdout
        time.sleep(2)


def _actor_pids(temp_dir: Path) -> set[int]:
    """Pids of the ClientApp actors (Flower's ``ClientAppActor``) that ran on the node of ``temp_dir``: Ray
    names each worker's log after its pid, in the logs folder of the node that started the worker."""
    pids = set()
    for log in temp_dir.glob("session_*/logs/worker-*.out"):
        if "ClientAppActor" in log.read_text(errors="replace"):
            pids.add(int(re.search(r"-(\d+)\.out$", log.name).group(1)))
    return pids


def test_ray_address_is_for_the_ray_engine_only(heart_sites, tmp_path):
    sites, schema = heart_sites
    with pytest.raises(ValueError, match="ray_address is for engine 'ray'"):
        run_federation(sites, schema, rounds=1, run_dir=tmp_path, ray_address="127.0.0.1:6379")
    assert not (tmp_path / "data").exists()  # refused before anything was written


@pytest.mark.slow
def test_ray_engine_on_a_two_node_ray_cluster_gives_the_inprocess_model(two_node_ray_cluster, heart_sites, tmp_path):
    address, head_dir, worker_dir = two_node_ray_cluster
    status = _ray_status(address, nodes=2)
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    assert len(re.findall(r"node_[0-9a-f]+", active)) == 2, status  # the head and the worker node are alive
    assert "0.0/2.0 CPU" in status, status
    sites, schema = heart_sites
    two = {n: sites[n].iloc[:60] for n in ("Cleveland", "Hungary")}
    a = run_federation(two, schema, rounds=2, seed=3, run_dir=tmp_path / "inproc", **FAST)
    b = run_federation(two, schema, rounds=2, seed=3, run_dir=tmp_path / "ray", engine="ray", ray_address=address,
                       **FAST)
    assert [h["round"] for h in b.history] == [1, 2]
    sa, sb = a.trained.model.state_dict(), b.trained.model.state_dict()
    assert sa.keys() == sb.keys() and all(bool((sa[k] == sb[k]).all()) for k in sa)  # bit-identical
    # 1 CPU a node and 1 CPU a site: one ClientApp actor on each node; both ran there
    head_actors, worker_actors = _actor_pids(head_dir), _actor_pids(worker_dir)
    assert head_actors and worker_actors, (head_actors, worker_actors)
    assert not head_actors & worker_actors
