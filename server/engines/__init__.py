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
from mmn_fed.settings import RunSettings, SettingsError

from ..processes import APP_DIR
from .inprocess import run_inprocess
from .ray import run_ray
from .results import FederationResult, read_result, write_site_data

__all__ = ["APP_DIR", "FederationResult", "read_result", "run_federation", "write_site_data"]


def run_federation(
    sites: Mapping[str, pd.DataFrame],
    schema: Schema,
    model_kind: str | None = None,
    rounds: int | None = None,
    *,
    engine: str = "inprocess",
    test_sites: Mapping[str, pd.DataFrame] | None = None,
    client_app: ClientApp | None = None,
    ray_address: str | None = None,
    **settings: Any,
) -> FederationResult:
    """Federate MultiModN (or P-Fusion) over ``sites`` (name -> rows) and return the final model,
    the per-round history, tidy metric records (global model on ``test_sites`` per site and modality
    combination, plus the last round's federated evaluation), and the communication log.

    engine: ``inprocess`` (default; fast) or ``ray`` (Flower's simulation engine). ``settings``: any run
    setting by its snake_case name, with the defaults of ``mmn_fed.settings`` (docs/settings.md): e.g.
    ``local_epochs=2, lr=0.01, val_fraction=0.0, aggregation="median", secure_aggregation=True,
    dp_noise_multiplier=1.0``; an unknown name or a bad value raises ``SettingsError``; the server checks the
    cross-field rules before round 1. ``model_kind`` and ``rounds`` are short for ``model`` and
    ``num_server_rounds``; ``schema`` is the Schema itself (the ``schema`` setting, a TOML path, does not apply)
    and ``data_dir`` is written here (``run_dir/data``). Update validation is always on
    (rejections in each history entry's ``rejected`` and in ``run_dir/failures.json``).
    ``client_app``: the ClientApp every site runs (default: ``clients.app.app``; in-process engine only),
    e.g. one with a malicious site (``simulations.attacks``).
    ``ray_address``: engine ``ray`` on an existing Ray cluster, ``"HEAD:PORT"`` of its head (``ray start --head``);
    default: a Ray instance on this machine for this run alone (docs/federation.md, "Beyond one machine").
    Resumes from ``run_dir/checkpoint.pt`` when present with the same settings.
    """
    if engine not in ("inprocess", "ray"):
        raise ValueError(f"engine '{engine}' unknown; expected 'inprocess' or 'ray' (deployment: mmn-fed deploy-local)")
    if client_app is not None and engine != "inprocess":
        raise ValueError(f"client_app is supported by the in-process engine only, not engine '{engine}' (Ray loads "
                         "the ClientApp named in pyproject.toml)")
    if ray_address and engine != "ray":
        raise ValueError(f"ray_address is for engine 'ray', not engine '{engine}'")
    if not sites:
        raise ValueError("run_federation needs at least one site")
    for short, name in ((model_kind, "model"), (rounds, "num_server_rounds")):
        if short is not None:
            if name in settings:
                raise SettingsError(name.replace("_", "-"), f"given twice (as {name} and by its short name)")
            settings[name] = short
    if "data_dir" in settings:
        raise SettingsError("data-dir", "run_federation writes the sites' data itself (run_dir/data)")
    if "run_dir" in settings:
        settings["run_dir"] = str(settings["run_dir"])  # a Path is welcome here
    cfg = RunSettings.from_kwargs(**settings)
    run_dir = Path(cfg.run_dir).resolve()
    data_dir = write_site_data(run_dir / "data", sites, schema, test_sites)
    rc = {**cfg.to_run_config(), "data-dir": str(data_dir), "run-dir": str(run_dir)}
    t0 = time.perf_counter()
    if engine == "inprocess":
        run_inprocess(rc, len(sites), client_app=client_app)
    else:
        run_ray(rc, len(sites), run_dir / "ray", ray_address=ray_address)
    return read_result(run_dir, time.perf_counter() - t0)
