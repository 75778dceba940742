"""High-level training entry points used by the CLI, the benchmarks and the simulations."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from edge_runtime.preprocessing import Preprocessor
from edge_runtime.schema import Schema

from .audit import AuditResult, audit_frame
from .correction import describe, resolve
from .data import check_holdout, check_table, derive_labels, encode, fit_preprocessor
from .evaluation import evaluate
from .model import ModelConfig
from .model_io import TrainedModel, build_from_preprocessor, save_model
from .training import TrainConfig, default_monitor, fit, split_indices


@dataclass
class TrainResult:
    trained: TrainedModel
    fit_info: dict
    records: list[dict[str, Any]] = field(default_factory=list)


def stratify_key(schema: Schema, df: pd.DataFrame) -> np.ndarray:
    """Stratum per row for splits: the first task's label (and the site, if the schema names one)."""
    task = next(iter(schema.tasks))
    v, p = derive_labels(schema, df)[task]
    p = np.asarray(p, dtype=bool)
    if schema.tasks[task].kind == "regression":
        codes, names = np.where(p, 0, 1), np.array(["x", "missing"])
    else:  # spelled once per distinct label (as ``v.astype(str)`` spells it), not once per row
        codes, uniques = pd.factorize(v, use_na_sentinel=False)
        names = np.append(np.asarray(uniques).astype(str), "missing")
        codes = np.where(p, codes, len(names) - 1)
    if schema.site_column and schema.site_column in df.columns:
        site = df[schema.site_column].astype(str).to_numpy()
        if pd.api.types.infer_dtype(site, skipna=False) != "string":  # e.g. a blank site (pandas keeps NaN)
            return np.asarray(names, dtype=object)[codes] + "|" + site  # as before, row by row (it may raise)
        site_codes, sites = pd.factorize(site)
        names = np.array([f"{a}|{b}" for a in names for b in sites], dtype=object)
        codes = codes * len(sites) + site_codes
    return np.asarray(names, dtype=object)[codes]


def train_centralized(
    df: pd.DataFrame,
    schema: Schema,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    prep: Preprocessor | None = None,
    progress: Callable[[dict], None] | None = None,
    provenance: Mapping | None = None,
    sites: Sequence[str] | np.ndarray | None = None,
) -> TrainResult:
    """Fit preprocessing (unless given), audit missingness, split off a stratified validation set, train,
    return the model. The audit (per site: ``sites`` names each row's site, else the schema's site column,
    else the table is one site) decides with ``train_config.missingness`` which modalities are balanced
    against the label during training (``mmn_fed.correction``); both are kept in the model's provenance."""
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    check_table(schema, df)  # refuse what cannot train (one class, no labels, too few rows), naming the file's rows
    df = df.reset_index(drop=True)
    prep = prep or fit_preprocessor(schema, df)
    found = audit_frame(schema, df, sites=sites, min_cell=train_config.audit_min_cell)
    correct = resolve(train_config.missingness, found, schema)
    keep, val_idx = split_indices(len(df), train_config.val_fraction, train_config.seed, stratify_key(schema, df))
    check_validation_split(schema, df.iloc[val_idx], train_config)
    data = encode(prep, df)
    torch.manual_seed(train_config.seed)  # seeded initialization
    model = build_from_preprocessor(prep, model_config)
    info = fit(model, schema, prep.targets, data.subset(keep), data.subset(val_idx) if len(val_idx) else None,
               train_config, progress, correct=correct)
    info["missingness"] = missingness_record(train_config.missingness, correct, found)
    meta = {"model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
            "provenance": {**dict(provenance or {}), "missingness": info["missingness"]}}
    return TrainResult(TrainedModel(model, prep, model_config, meta), info)


def missingness_record(mode: str, correct: Mapping[str, str], found: AuditResult | None) -> dict[str, Any]:
    """What a run did about label-dependent missingness: kept with the model, written as audit.json."""
    return {"mode": mode, "corrected": dict(correct), "summary": describe(mode, correct),
            "audit": found.to_dict() if found is not None else None}


def check_validation_split(schema: Schema, val: pd.DataFrame, config: TrainConfig) -> None:
    """Early stopping monitors one task's metric on the validation split: refuse a split where it is undefined
    (no row, or one class of that task) instead of stopping at ``patience`` on a score that never moves."""
    if config.val_fraction <= 0 or config.monitor == "loss":
        return
    task = (default_monitor(schema) if config.monitor == "auto" else config.monitor).split(":", 1)[0]
    check_holdout(schema, val, f"validation split (val-fraction {config.val_fraction:g})",
                  "give more rows or a larger val-fraction (or val-fraction 0: no early stopping, every epoch is trained)",
                  tasks=[task])


def evaluate_frame(trained: TrainedModel, df: pd.DataFrame, context: Mapping[str, Any], **kw) -> list[dict[str, Any]]:
    """Tidy records for a labelled table (per site too when the schema names a site column)."""
    schema = trained.schema
    data = encode(trained.preprocessor, df.reset_index(drop=True))
    sites = None
    if schema.site_column and schema.site_column in df.columns:
        sites = df[schema.site_column].astype(str).to_numpy()
    return evaluate(trained.model, schema, trained.preprocessor.targets, data, context, sites=sites, **kw)


def save_trained(path: str | Path, trained: TrainedModel) -> Path:
    return save_model(path, trained.model, trained.preprocessor, trained.config,
                      trained.metadata.get("train_config"), trained.metadata.get("provenance"),
                      extra=trained.metadata)  # e.g. a time-series model's timeseries_schema
