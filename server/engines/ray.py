"""Flower's simulation engine (Ray) through ``flwr run``: the same ServerApp and ClientApp, each site a
simulated SuperNode; on a Ray instance of its own (one machine) or on an existing Ray cluster
(``ray_address``: machines joined with ``ray start``, docs/federation.md "Beyond one machine")."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from ..processes import APP_DIR, flower_bin, flower_env, free_port, stop_listener, toml_config


def run_ray(run_config: Mapping[str, Any], num_sites: int, workdir: Path, num_cpus: int = 2, timeout: float = 1800,
            ray_address: str | None = None) -> float:
    """``flwr run <app> <local-simulation connection>`` with ``num_sites`` simulated SuperNodes on Ray.

    `flwr run` starts a detached local SuperLink for simulations; it is stopped here afterwards.
    ``ray_address``: None starts a Ray instance of ``num_cpus`` CPUs for this run alone; ``"HOST:PORT"`` (the
    head's GCS address, ``ray start --head --port PORT``) runs the sites' ClientApps as actors on that existing
    cluster, across all its nodes (``num_cpus`` is then the cluster's own business). Each site takes 1 CPU.
    Returns the wall time of the run (SuperLink start to finish)."""
    home = Path(workdir) / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    config = ('[superlink]\ndefault = "mmnfed-sim"\n\n[superlink.mmnfed-sim]\naddress = ":local:"\n'
              f"options.num-supernodes = {num_sites}\noptions.backend.client-resources.num-cpus = 1\n")
    ray_env: dict[str, str] = {}
    if ray_address:
        # Flower's Ray backend calls ray.init(**init-args), but `flwr run` keeps only num-cpus / num-gpus /
        # logging-level / log-to-driver of the connection's init-args (flwr/cli/flower_config.py), so the
        # address travels as Ray's own RAY_ADDRESS, inherited by the SuperLink, SuperExec and simulation
        # processes. ray.init refuses num_cpus when it joins a cluster: no init-args then.
        ray_env["RAY_ADDRESS"] = ray_address
    else:
        config += f"options.backend.init-args.num-cpus = {num_cpus}\n"
        # "local": a fresh instance, even when the caller's RAY_ADDRESS or a `ray start` on this machine
        # (/tmp/ray/ray_current_cluster) names a cluster, which ray.init would otherwise join (and refuse,
        # num_cpus being set)
        ray_env["RAY_ADDRESS"] = "local"
    (home / "config.toml").write_text(config)
    http_port, control_port = free_port(), free_port()
    # the managed local SuperLink listens on these; our own ports avoid clashing with others'
    env = flower_env(home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
                     FLWR_LOCAL_CONTROL_API_PORT=str(control_port), RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0", **ray_env)
    cfg = toml_config(run_config)
    t0 = time.perf_counter()
    try:
        res = subprocess.run([flower_bin("flwr"), "run", str(APP_DIR), "mmnfed-sim", "--stream",
                              "--run-config", cfg], env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        stop_listener(http_port)
    (Path(workdir) / "flwr_run.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0 or "raised an exception" in res.stdout or "Exit Code:" in res.stdout:
        raise RuntimeError(f"flwr run (Ray simulation) failed; log in {Path(workdir) / 'flwr_run.log'}:\n{res.stdout[-2000:]}")
    return time.perf_counter() - t0
