"""The engines: three ways to run the same ServerApp and ClientApp, and the one place allowed to wire
``server`` to ``clients`` (tests/test_layout.py holds the rest of ``server`` to that).

- ``inprocess``: a Grid that calls ClientApps directly (fast, for tests and sweeps);
- ``ray``: Flower's simulation engine, via ``flwr run``;
- ``deployment``: Flower's deployment engine on loopback (``mmn-fed deploy-local``).

``run_federation`` is the entry point for the first two.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from flwr.clientapp import ClientApp

from edge_runtime.schema import Schema

from ..processes import APP_DIR
from .inprocess import run_inprocess
from .ray import run_ray
from .results import FederationResult, read_result, write_site_data

__all__ = ["APP_DIR", "FederationResult", "read_result", "run_federation", "write_site_data"]


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
    client_app: ClientApp | None = None,
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
    ``client_app``: the ClientApp every site runs (default: ``clients.app.app``; in-process engine only),
    e.g. one with a malicious site (``simulations.attacks``).
    Resumes from ``run_dir/checkpoint.pt`` when present with the same settings.
    """
    if engine not in ("inprocess", "ray"):
        raise ValueError(f"engine '{engine}' unknown; expected 'inprocess' or 'ray' (deployment: mmn-fed deploy-local)")
    if client_app is not None and engine != "inprocess":
        raise ValueError(f"client_app is supported by the in-process engine only, not engine '{engine}' (Ray loads "
                         "the ClientApp named in pyproject.toml)")
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
        run_inprocess(rc, len(sites), client_app=client_app)
    else:
        run_ray(rc, len(sites), run_dir / "ray")
    return read_result(run_dir, time.perf_counter() - t0)
