"""Three ways to run the same ServerApp and ClientApp: in-process (a Grid that calls ClientApps
directly: fast, for tests and sweeps), Flower's simulation engine (Ray, via ``flwr run``), and Flower's
deployment engine on loopback (``server.deploy``). ``run_federation`` is the entry point.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from edge_runtime.schema import Schema
from mmn_fed.evaluation import read_metrics
from mmn_fed.model_io import TrainedModel, load_model

SERVER_NODE_ID = 0
APP_DIR = Path(__file__).resolve().parent.parent  # the Flower App: pyproject.toml's [tool.flwr.app]


class InProcessGrid(Grid):
    """A Grid that delivers each message straight to a ClientApp in this process and returns its reply.

    Nodes are simulated SuperNodes with ``partition-id``/``num-partitions`` (or any node config), so the
    ServerApp and ClientApp code paths are exactly those of Flower's engines, minus transport.
    """

    def __init__(self, client_app: ClientApp, node_configs: list[Mapping[str, Any]], run_config: Mapping[str, Any],
                 run_id: int = 1):
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.run_id = run_id
        self.run_config = dict(run_config)
        # node ids are arbitrary (as in Flower, where they are random); 1000 + i keeps logs readable
        self.contexts = {1000 + i: Context(run_id=run_id, node_id=1000 + i, node_config=dict(nc), state=RecordDict(),
                                           run_config=dict(run_config)) for i, nc in enumerate(node_configs)}
        for attr, value in (("run_id", run_id), ("node_id", SERVER_NODE_ID), ("task_id", 0)):
            setattr(TaskIdentity, attr, value)  # Message() reads the sender's identity from here

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            # the site gets its own copy, as over a wire
            delivered = Message(copy.deepcopy(msg.content), dst_node_id=msg.metadata.dst_node_id,
                                message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)
            delivered.metadata.__dict__.update({"_message_id": msg.metadata.message_id,
                                                "_src_node_id": msg.metadata.src_node_id})
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # a failing site is a failed reply, as in Flower's engines
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            replies.append(reply)
        return replies


def server_context(run_config: Mapping[str, Any], run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config))


def run_inprocess(run_config: Mapping[str, Any], num_sites: int, server_app: ServerApp | None = None,
                  client_app: ClientApp | None = None, grid_cls: type[InProcessGrid] = InProcessGrid) -> None:
    """Run the ServerApp's main against ``num_sites`` in-process ClientApps (simulation node configs)."""
    from clients.app import app as default_client
    from server.app import app as default_server

    grid = grid_cls(client_app or default_client,
                    [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)], run_config)
    (server_app or default_server)(grid, server_context(run_config))


# ---- Ray simulation through `flwr run` ------------------------------------------------------

def flwr_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                # the managed local SuperLink listens on these; our own ports avoid clashing with others'
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    return env


def run_ray(run_config: Mapping[str, Any], num_sites: int, workdir: Path, num_cpus: int = 2, timeout: float = 1800) -> float:
    """``flwr run <app> <local-simulation connection>`` with ``num_sites`` simulated SuperNodes on Ray.

    `flwr run` starts a detached local SuperLink for simulations; it is stopped here afterwards.
    Returns the wall time of the run (SuperLink start to finish)."""
    from server.deploy import _toml_value, free_port, stop_listener

    home = Path(workdir) / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "mmnfed-sim"\n\n[superlink.mmnfed-sim]\naddress = ":local:"\n'
        f"options.num-supernodes = {num_sites}\noptions.backend.client-resources.num-cpus = 1\n"
        f"options.backend.init-args.num-cpus = {num_cpus}\n")
    http_port, control_port = free_port(), free_port()
    env = flwr_env(home, http_port, control_port)
    cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    t0 = time.perf_counter()
    try:
        res = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), "mmnfed-sim", "--stream",
                              "--run-config", cfg], env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        stop_listener(http_port)
    (Path(workdir) / "flwr_run.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0 or "raised an exception" in res.stdout or "Exit Code:" in res.stdout:
        raise RuntimeError(f"flwr run (Ray simulation) failed; log in {Path(workdir) / 'flwr_run.log'}:\n{res.stdout[-2000:]}")
    return time.perf_counter() - t0


# ---- the entry point -------------------------------------------------------------------------

@dataclass
class FederationResult:
    """What a federation produced (all of it also on disk in ``run_dir``)."""

    trained: TrainedModel
    history: list[dict]
    records: list[dict]
    comm: list[dict]
    evaluations: list[dict]
    run_dir: Path
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # "failures" (failed sites, rejected updates), "secagg" (per round)


def write_site_data(data_dir: Path, sites: Mapping[str, pd.DataFrame], schema: Schema,
                    test_sites: Mapping[str, pd.DataFrame] | None = None) -> Path:
    """Site tables as CSVs + sites.json + schema.json: what simulated sites (any engine) read by partition id."""
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"sites": [], "test": []}
    for i, (name, df) in enumerate(sites.items()):
        df.to_csv(data_dir / f"site_{i}.csv", index=False)
        manifest["sites"].append({"name": str(name), "file": f"site_{i}.csv", "rows": len(df)})
    for i, (name, df) in enumerate((test_sites or {}).items()):
        df.to_csv(data_dir / f"test_{i}.csv", index=False)
        manifest["test"].append({"name": str(name), "file": f"test_{i}.csv", "rows": len(df)})
    (data_dir / "schema.json").write_text(json.dumps(schema.to_dict()))
    (data_dir / "sites.json").write_text(json.dumps(manifest, indent=1))
    return data_dir


def run_federation(
    sites: Mapping[str, pd.DataFrame],
    schema: Schema,
    model_kind: str = "multimodn",
    rounds: int = 20,
    seed: int = 0,
    run_dir: str | Path = "runs/federated",
    engine: str = "inprocess",
    local_epochs: int = 1,
    lr: float = 3e-3,
    mu: float = 0.0,
    test_sites: Mapping[str, pd.DataFrame] | None = None,
    val_fraction: float = 0.0,
    aggregation: str = "mean",
    trim: float = 0.25,
    secure_aggregation: bool = False,
    **run_config: Any,
) -> FederationResult:
    """Federate MultiModN (or P-Fusion) over ``sites`` (name -> rows) and return the final model,
    the per-round history, tidy metric records (global model on ``test_sites`` per site and modality
    combination, plus the last round's federated evaluation), and the communication log.

    engine: ``inprocess`` (default; fast) or ``ray`` (Flower's simulation engine). Extra keyword
    arguments are run-config keys with ``_`` for ``-`` (e.g. ``server_optimizer="fedadam"``,
    ``dp_noise_multiplier=1.0, dp_clip=0.5``). Update validation is always on (rejections in each history
    entry's ``rejected`` and in ``run_dir/failures.json``). ``aggregation``: ``mean`` | ``trimmed-mean``
    (with ``trim``) | ``median``. ``secure_aggregation=True``: the server learns only per-module sums
    (``mean`` only; per-round protocol records in ``run_dir/secagg.json`` and history ``secagg``).
    Resumes from ``run_dir/checkpoint.pt`` when present with the same settings.
    """
    if engine not in ("inprocess", "ray"):
        raise ValueError(f"engine '{engine}' unknown; expected 'inprocess' or 'ray' (deployment: mmn-fed deploy-local)")
    if not sites:
        raise ValueError("run_federation needs at least one site")
    run_dir = Path(run_dir).resolve()
    data_dir = write_site_data(run_dir / "data", sites, schema, test_sites)
    rc = {"num-server-rounds": rounds, "local-epochs": local_epochs, "lr": lr, "mu": mu, "seed": seed,
          "model": model_kind, "data-dir": str(data_dir), "run-dir": str(run_dir), "val-fraction": val_fraction,
          "aggregation": aggregation, "trim": trim, "secure-aggregation": secure_aggregation,
          **{k.replace("_", "-"): v for k, v in run_config.items()}}
    t0 = time.perf_counter()
    if engine == "inprocess":
        run_inprocess(rc, len(sites))
    else:
        run_ray(rc, len(sites), run_dir / "ray")
    return read_result(run_dir, time.perf_counter() - t0)


def read_result(run_dir: Path, seconds: float = 0.0) -> FederationResult:
    run_dir = Path(run_dir)
    load = lambda name: json.loads((run_dir / name).read_text())  # noqa: E731
    extra = {name: load(f"{name}.json") for name in ("failures", "secagg") if (run_dir / f"{name}.json").exists()}
    return FederationResult(load_model(run_dir / "model.pt"), load("history.json"), read_metrics(run_dir / "metrics.json"),
                            load("comm.json"), load("evaluation.json"), run_dir, seconds, extra)
