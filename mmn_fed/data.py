"""Tables in, tensors out: labels, fitting preprocessing (from mergeable summaries), built-in data.

Feature semantics live in ``edge_runtime.preprocessing`` (torch-free, shared with the edge);
this module adds labels, which only training needs, and the torch tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from edge_runtime.preprocessing import (
    DataError, Preprocessor, merge_summaries, parse_categorical, parse_numeric, summarize,
)
from edge_runtime.schema import Schema, SchemaError, canonical_category

BUILTIN = ("heart", "support2", "pbc")


def _last_visit(df: pd.DataFrame) -> pd.DataFrame:
    """pbcseq ships one row per visit; the static ``pbc`` table is each patient's last visit."""
    return df.sort_values(["id", "day"], kind="stable").groupby("id").tail(1).reset_index(drop=True)


_DERIVE = {"pbc": _last_visit}  # built-ins whose table is derived from the shipped file


# ---- tables -----------------------------------------------------------------------------

def frame_to_columns(df: pd.DataFrame, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    cols = df.columns if columns is None else [c for c in columns if c in df.columns]
    out = {}
    for c in cols:
        s = df[c]
        out[c] = s.to_numpy(dtype=np.float64) if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s) \
            else s.to_numpy(dtype=object)
    return out


def read_table(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    return pd.read_csv(path, keep_default_na=True, low_memory=False)


def check_columns(schema: Schema, df: pd.DataFrame, need_labels: bool = True) -> None:
    """Every schema column must be in the data; raise naming the missing ones and their role."""
    missing = [f"'{c}' (modality {schema.modality_of(c)})" for c in schema.input_columns if c not in df.columns]
    if need_labels:
        missing += [f"'{t.column}' (task {t.name})" for t in schema.tasks.values() if t.column not in df.columns]
    if missing:
        raise SchemaError(f"column(s) {', '.join(missing)} not in the data; data has {list(df.columns)[:30]}")


# ---- labels -----------------------------------------------------------------------------

def derive_labels(schema: Schema, df: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw labels per task: (values, present). Binary -> 0/1, multiclass -> raw class strings in an
    object array, regression -> float. Values where present is False are meaningless."""
    out = {}
    for name, task in schema.tasks.items():
        if task.column not in df.columns:
            raise SchemaError(f"task '{name}': column '{task.column}' is not in the data")
        col = df[task.column]
        if task.kind == "binary":
            if task.expression is not None:
                try:
                    val = df.eval(task.expression)
                except Exception as e:  # pandas raises many kinds here
                    raise SchemaError(f"task '{name}': cannot evaluate expression {task.expression!r}: {e}") from None
                present = col.notna().to_numpy()
                out[name] = (np.asarray(val, dtype=bool).astype(np.float64), present)
            elif task.positive is not None:
                cats = parse_categorical(col.to_numpy(dtype=object))
                present = np.array([c is not None for c in cats])
                pos = set(task.positive)
                out[name] = (np.array([1.0 if c in pos else 0.0 for c in cats]), present)
            else:
                x, issues = parse_numeric(_numeric_values(col), task.column)
                if issues:
                    raise DataError(f"task '{name}': " + "; ".join(str(i) for i in issues[:3]), issues)
                thr = 0.0 if task.threshold is None else task.threshold
                out[name] = ((x > thr).astype(np.float64), ~np.isnan(x))
        elif task.kind == "multiclass":
            cats = parse_categorical(col.to_numpy(dtype=object))
            out[name] = (np.array(cats, dtype=object), np.array([c is not None for c in cats]))
        else:
            x, issues = parse_numeric(_numeric_values(col), task.column)
            if issues:
                raise DataError(f"regression task '{name}': " + "; ".join(str(i) for i in issues[:3]), issues)
            out[name] = (x, ~np.isnan(x))
    return out


def _numeric_values(col: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=np.float64)
    return col.to_numpy(dtype=object)


def target_summary(schema: Schema, labels: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    out = {}
    for name, (v, p) in labels.items():
        kind = schema.tasks[name].kind
        if kind == "regression":
            x = v[p].astype(np.float64)
            out[name] = {"kind": "numeric", "count": int(x.size), "sum": float(x.sum()), "sumsq": float((x * x).sum())}
        else:
            vals = v[p] if kind == "multiclass" else np.array([canonical_category(int(a)) for a in v[p]], dtype=object)
            keys, counts = np.unique(vals.astype(str), return_counts=True) if len(vals) else ([], [])
            out[name] = {"kind": "categorical", "counts": {str(k): int(c) for k, c in zip(keys, counts)}}
    return out


def site_summary(schema: Schema, df: pd.DataFrame) -> dict[str, Any]:
    """Mergeable summary of one site's rows: features and targets, never rows."""
    check_columns(schema, df)
    s = summarize(schema, frame_to_columns(df, schema.input_columns))
    s["targets"] = target_summary(schema, derive_labels(schema, df))
    return s


def fit_preprocessor(schema: Schema, frames: pd.DataFrame | Sequence[pd.DataFrame]) -> Preprocessor:
    """Fit statistics from one table, or from several sites' tables via merged summaries."""
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    return Preprocessor.from_summary(schema, merge_summaries([site_summary(schema, f) for f in frames]))


# ---- tensors ----------------------------------------------------------------------------

@dataclass
class TensorData:
    """Encoded inputs and labels. y: binary float 0/1, multiclass long index, regression standardized."""

    x: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    y_present: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.present.values())).shape[0]

    def subset(self, idx) -> "TensorData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
        return TensorData(pick(self.x), pick(self.present), pick(self.y), pick(self.y_present))

    @property
    def modalities(self) -> list[str]:
        return list(self.present)


def encode(prep: Preprocessor, df: pd.DataFrame, with_labels: bool = True) -> TensorData:
    """Encode a table with fitted statistics. Raises DataError naming bad values."""
    check_columns(prep.schema, df, need_labels=with_labels)
    enc = prep.encode(frame_to_columns(df, prep.schema.input_columns), on_error="raise")
    x = {m: torch.from_numpy(a) for m, a in enc.features.items()}
    present = {m: torch.from_numpy(p.copy()) for m, p in enc.present.items()}
    y, yp = {}, {}
    if with_labels:
        for name, (v, p) in derive_labels(prep.schema, df).items():
            kind = prep.schema.tasks[name].kind
            if kind == "multiclass":
                index = {c: i for i, c in enumerate(prep.targets[name]["classes"])}
                idx = np.array([index.get(c, -1) if ok else -1 for c, ok in zip(v, p)])
                y[name] = torch.from_numpy(np.maximum(idx, 0)).long()
                yp[name] = torch.from_numpy(idx >= 0)
            elif kind == "regression":
                st = prep.targets[name]
                y[name] = torch.from_numpy(np.nan_to_num((v - st["mean"]) / st["std"])).float()
                yp[name] = torch.from_numpy(p.copy())
            else:
                y[name] = torch.from_numpy(np.nan_to_num(v)).float()
                yp[name] = torch.from_numpy(p.copy())
    return TensorData(x, present, y, yp)


# ---- built-in datasets ------------------------------------------------------------------

def builtin_path(name: str) -> Path:
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in dataset '{name}'; built-in: {list(BUILTIN)}")
    return Path(str(resources.files("mmn_fed") / "builtin" / name))


def load_builtin(name: str) -> tuple[pd.DataFrame, Schema]:
    """The shipped table and schema of a built-in dataset (see mmn_fed/builtin/ATTRIBUTION.md)."""
    base = builtin_path(name)
    csv = next(p for p in sorted(base.iterdir()) if p.name.endswith((".csv", ".csv.gz")))
    df = pd.read_csv(csv, low_memory=False)
    return _DERIVE.get(name, lambda d: d)(df), Schema.from_toml(base / "schema.toml")


def load_dataset(dataset: str, schema: str | Path | None = None) -> tuple[pd.DataFrame, Schema]:
    """A built-in name, or a CSV path with a schema TOML."""
    if dataset in BUILTIN:
        df, sch = load_builtin(dataset)
        return df, (Schema.from_toml(schema) if schema else sch)
    if schema is None:
        raise SchemaError(f"'{dataset}' is not a built-in dataset ({list(BUILTIN)}): pass --schema SCHEMA.toml with a CSV")
    return read_table(dataset), Schema.from_toml(schema)


def make_synthetic(
    n: int = 1000,
    modalities: Mapping[str, int] | None = None,
    informativeness: Mapping[str, float] | None = None,
    missing_rate: float = 0.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, Schema]:
    """Synthetic multimodal cohort for scale tests.

    A latent risk z ~ N(0, 1) drives a binary task ``outcome`` (z + noise > 0) and a regression task
    ``score``. Modality m has ``modalities[m]`` numeric columns equal to informativeness[m] * z * w + noise,
    so informativeness 0 means pure noise. Each modality is missing (MCAR) with ``missing_rate``.
    """
    modalities = dict(modalities or {"a": 4, "b": 4, "c": 4})
    informativeness = dict(informativeness or {})
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)
    cols: dict[str, np.ndarray] = {}
    schema_mods: dict[str, list[str]] = {}
    for m, d in modalities.items():
        if d < 1:
            raise ValueError(f"modality '{m}' needs at least one dimension")
        w = rng.standard_normal(d)
        block = informativeness.get(m, 1.0) * z[:, None] * w[None, :] + rng.standard_normal((n, d))
        drop = rng.random(n) < missing_rate
        block[drop] = np.nan
        names = [f"{m}_{j}" for j in range(d)]
        schema_mods[m] = names
        for j, c in enumerate(names):
            cols[c] = block[:, j]
    cols["outcome"] = (z + 0.5 * rng.standard_normal(n) > 0).astype(np.int64)
    cols["score"] = z + 0.3 * rng.standard_normal(n)
    schema = Schema.from_dict({
        "modalities": schema_mods,
        "tasks": {"outcome": {"column": "outcome", "kind": "binary", "threshold": 0},
                  "score": {"column": "score", "kind": "regression"}},
    })
    return pd.DataFrame(cols), schema
