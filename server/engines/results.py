"""What every engine leaves behind: the site data it hands to simulated sites and the run directory it
reads the result from (``model.pt``, ``history.json``, ``metrics.json``, ...)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import pandas as pd

from edge_runtime.schema import Schema
from mmn_fed.evaluation import read_metrics
from mmn_fed.model_io import TrainedModel, load_model


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
    # "failures" (failed sites, rejected updates), "secagg" (per round), "selection" (rounds run, early stop,
    # the round the final model is: server/app.py), "profile" (site -> module -> the count it is weighted by),
    # "excluded" (site -> why its data could not be used: it took no part)
    extra: dict = field(default_factory=dict)


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


def read_result(run_dir: Path, seconds: float = 0.0) -> FederationResult:
    run_dir = Path(run_dir)
    load = lambda name: json.loads((run_dir / name).read_text())  # noqa: E731
    extra = {name: load(f"{name}.json") for name in ("failures", "secagg", "selection", "profile", "excluded") if (run_dir / f"{name}.json").exists()}
    return FederationResult(load_model(run_dir / "model.pt"), load("history.json"), read_metrics(run_dir / "metrics.json"),
                            load("comm.json"), load("evaluation.json"), run_dir, seconds, extra)
