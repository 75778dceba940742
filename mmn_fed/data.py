"""Tables in, tensors out: labels, fitting preprocessing (from mergeable summaries), built-in data.

Feature semantics live in ``edge_runtime.preprocessing`` (torch-free, shared with the edge);
this module adds labels, which only training needs, and the torch tensors.
"""
from __future__ import annotations

import csv
import difflib
import gzip
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from edge_runtime.preprocessing import (
    DataError, Preprocessor, merge_summaries, parse_categorical, parse_numeric, summarize,
)
from edge_runtime.schema import Schema, SchemaError, canonical_category

BUILTIN = ("heart", "support2", "pbc", "pbcseq", "nycflights13_weather")
# Fewest rows a table (or a federation's pooled rows) needs to train: below it the validation and test splits
# hold a row or two, and clients/site.py keeps no validation split under 10 rows either.
MIN_TRAIN_ROWS = 10
ROW_INDEX = "data_row"  # the index name read_table gives a file's table: its values are the file's record numbers


def _last_visit(df: pd.DataFrame) -> pd.DataFrame:
    """pbcseq ships one row per visit; the static ``pbc`` table is each patient's last visit."""
    return df.sort_values(["id", "day"], kind="stable").groupby("id").tail(1).reset_index(drop=True)


WINDOW_HOURS, WINDOW_EVERY, AHEAD_HOURS = 72, 24, 24  # nycflights13_weather's subjects and target


def weather_windows(df: pd.DataFrame) -> pd.DataFrame:
    """nycflights13_weather as windows: per airport, hours since 2013-01-01 00:00 UTC; the temperature 24 hours
    later; sin/cos of the hour of day and the day of year; then one subject per 72-hour window starting every 24
    hours (``window`` = "<origin>-<start hour>", ``window_hour`` = hours since the window's start, ``start`` = its
    first hour since the new year)."""
    t = pd.to_datetime(df["time_hour"], utc=True)
    df = df.assign(abs_hour=((t - pd.Timestamp("2013-01-01", tz="UTC")).dt.total_seconds() // 3600).astype(int))
    df = df.drop_duplicates(["origin", "abs_hour"], keep="last").sort_values(["origin", "abs_hour"], kind="stable")
    later = df[["origin", "abs_hour", "temp"]].assign(abs_hour=df["abs_hour"] - AHEAD_HOURS)
    df = df.merge(later.rename(columns={"temp": "temp_24h"}), on=["origin", "abs_hour"], how="left")
    local = pd.to_datetime(df["time_hour"], utc=True).dt.tz_convert("America/New_York")
    hour, doy = local.dt.hour.to_numpy(), local.dt.day_of_year.to_numpy()
    df["hour_sin"], df["hour_cos"] = np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24)
    df["doy_sin"], df["doy_cos"] = np.sin(2 * np.pi * doy / 365.25), np.cos(2 * np.pi * doy / 365.25)
    h = df["abs_hour"].to_numpy()
    last_start = (int(h.max()) - WINDOW_HOURS + 1) // WINDOW_EVERY  # the last window that fits in the year
    first = np.maximum(0, -(-(h - WINDOW_HOURS + 1) // WINDOW_EVERY))  # windows k with 24k <= h < 24k + 72
    count = np.maximum(0, np.minimum(h // WINDOW_EVERY, last_start) - first + 1)
    rows = np.repeat(np.arange(len(df)), count)
    k = np.repeat(first, count) + (np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count))
    out = df.iloc[rows].reset_index(drop=True)
    start = k * WINDOW_EVERY
    out["start"] = start
    out["window_hour"] = out["abs_hour"].to_numpy() - start
    out["window"] = out["origin"] + "-" + pd.Series(start).map("{:05d}".format)
    return out.sort_values(["window", "window_hour"], kind="stable").reset_index(drop=True)


_DERIVE = {"pbc": _last_visit, "nycflights13_weather": weather_windows}  # tables derived from the shipped file
_SHARED = {"pbcseq": "pbc"}  # built-ins whose table ships in another built-in's folder


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
    """A CSV file's table. Its index (named ``ROW_INDEX``) is each row's 0-based record number in the file and
    ``attrs["source"]`` the path: both survive ``iloc`` splits, so errors can name the file's row (``row_locator``)."""
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    df = pd.read_csv(path, keep_default_na=True, low_memory=False)
    df.index = pd.RangeIndex(len(df), name=ROW_INDEX)
    df.attrs["source"] = str(path)
    return df


# ---- rows as the user counts them ---------------------------------------------------------
# Convention (docs/schema.md): "line L of FILE (data row R)": R counts the data rows from 1 after the header,
# L is the line an editor shows (the header is line 1; L = R + 1 unless a quoted value spans lines or blank
# lines are skipped, which is why L is read from the file). A table not read by read_table, or whose index
# was reset, tells "data row R" of the table given.

def _record_lines(path: str) -> list[int]:
    """The line on which each data record of a CSV starts, as pandas reads it (blank lines skipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    starts: list[int] = []
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = False
        line = 1
        for rec in reader:
            if rec and header:
                starts.append(line)
            header = header or bool(rec)
            line = reader.line_num + 1
    return starts


def row_locator(df: pd.DataFrame) -> Callable[[int], str]:
    """position in ``df`` -> how the user counts that row (the convention above)."""
    source = df.attrs.get("source")
    if df.index.name != ROW_INDEX or not source:
        return lambda i: f"data row {i + 1}"
    records = df.index.to_numpy()
    lines: list[int] = []

    def where(i: int) -> str:
        r = int(records[i])
        if not lines:
            try:
                lines.extend(_record_lines(source))
            except OSError:
                pass
        line = lines[r] if r < len(lines) else r + 2
        return f"line {line} of {source} (data row {r + 1})"

    return where


@contextmanager
def file_rows(df: pd.DataFrame) -> Iterator[None]:
    """Re-raise a DataError raised while processing ``df`` with its rows told as the user counts them."""
    try:
        yield
    except DataError as e:
        if not e.issues:
            raise
        raise e.relocated(row_locator(df)) from None


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
    with file_rows(df):
        return _derive_labels(schema, df)


def _derive_labels(schema: Schema, df: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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
                    raise DataError(f"task '{name}': {len(issues)} bad label(s): {{issues}}", issues)
                thr = 0.0 if task.threshold is None else task.threshold
                out[name] = ((x > thr).astype(np.float64), ~np.isnan(x))
        elif task.kind == "multiclass":
            cats = parse_categorical(col.to_numpy(dtype=object))
            out[name] = (np.array(cats, dtype=object), np.array([c is not None for c in cats]))
        else:
            x, issues = parse_numeric(_numeric_values(col), task.column)
            if issues:
                raise DataError(f"regression task '{name}': {len(issues)} bad label(s): {{issues}}", issues)
            out[name] = (x, ~np.isnan(x))
    return out


def _numeric_values(col: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col.to_numpy(dtype=np.float64)
    return col.to_numpy(dtype=object)


def target_summary(schema: Schema, labels: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Mergeable per-task label summary: count, sum and sum of squares (regression) or the count of each
    class spelled as ``canonical_category`` spells it, keys in sorted order (classification)."""
    out = {}
    for name, (v, p) in labels.items():
        kind = schema.tasks[name].kind
        if kind == "regression":
            x = v[p].astype(np.float64)
            out[name] = {"kind": "numeric", "count": int(x.size), "sum": float(x.sum()), "sumsq": float((x * x).sum())}
        elif kind == "multiclass":
            vals = v[p]
            keys, counts = np.unique(vals.astype(str), return_counts=True) if len(vals) else ([], [])
            out[name] = {"kind": "categorical", "counts": {str(k): int(c) for k, c in zip(keys, counts)}}
        else:
            out[name] = {"kind": "categorical", "counts": _binary_counts(v[p])}
    return out


def _binary_counts(values: np.ndarray) -> dict[str, int]:
    """{canonical_category(int(a)): count} over ``values``, keys sorted as strings. Counted per distinct value
    (one Python call per class, not per row); values that are not finite numbers take the per-row path, which
    raises as ``int(a)`` does."""
    if values.dtype.kind in "fiub":
        finite = values.dtype.kind != "f" or bool(np.isfinite(values).all())
        if finite:
            distinct, n = np.unique(values, return_counts=True)
            counts: dict[str, int] = {}
            for a, c in zip(distinct.tolist(), n.tolist()):
                key = canonical_category(int(a))
                counts[key] = counts.get(key, 0) + int(c)  # 1.0 and 1.5 are both class "1"
            return {k: counts[k] for k in sorted(counts)}
    vals = np.array([canonical_category(int(a)) for a in values], dtype=object)
    keys, n = np.unique(vals.astype(str), return_counts=True) if len(vals) else ([], [])
    return {str(k): int(c) for k, c in zip(keys, n)}


def site_summary(schema: Schema, df: pd.DataFrame) -> dict[str, Any]:
    """Mergeable summary of one site's rows: features and targets, never rows."""
    check_columns(schema, df)
    with file_rows(df):
        s = summarize(schema, frame_to_columns(df, schema.input_columns))
    s["targets"] = target_summary(schema, derive_labels(schema, df))
    return s


def fit_preprocessor(schema: Schema, frames: pd.DataFrame | Sequence[pd.DataFrame]) -> Preprocessor:
    """Fit statistics from one table, or from several sites' tables via merged summaries."""
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    return Preprocessor.from_summary(schema, merge_summaries([site_summary(schema, f) for f in frames]))


# ---- honest training inputs ------------------------------------------------------------

class LabelError(DataError):
    """A task's labels cannot train it: none, one class only, or a rule (``positive``, ``classes``) matching none."""


def _rule(task) -> str:
    if task.positive is not None:
        return f"class 1 = {task.column} in {list(task.positive)}"
    if task.expression is not None:
        return f"class 1 = {task.expression}"
    return f"class 1 = {task.column} > {0.0 if task.threshold is None else task.threshold:g}"


def check_summary(schema: Schema, summary: Mapping[str, Any], where: str = "",
                  seen: Mapping[str, list[str]] | None = None) -> None:
    """Refuse a (merged) preprocessing summary that cannot train: fewer than MIN_TRAIN_ROWS rows, or a task with
    no label, a single class (classification) or a single value (regression). ``where`` says whose rows
    (" of cohort.csv", " pooled over 4 sites"); ``seen`` (task -> raw labels, centralized only) lets a
    ``positive`` list that matches no label say so. Raises DataError (rows) or LabelError naming the task."""
    n = int(summary["n_rows"])
    if n < MIN_TRAIN_ROWS:
        raise DataError(f"need at least {MIN_TRAIN_ROWS} rows to train, got {n} row(s){where}")
    for name, task in schema.tasks.items():
        ts = summary.get("targets", {}).get(name) or {}
        counts = {k: int(v) for k, v in ts.get("counts", {}).items() if v}
        labelled = int(ts["count"]) if task.kind == "regression" else sum(counts.values())
        if labelled == 0:
            raise LabelError(f"task '{name}': no row has a label (column '{task.column}' is blank in all {n} rows{where})")
        if task.kind == "binary" and task.positive is not None and seen and name in seen and "1" not in counts:
            raise LabelError(f"task '{name}': positive = {list(task.positive)} matches no label; "
                             f"labels seen: {seen[name]}")
        if task.kind == "multiclass" and task.classes is not None:
            inside = {k: c for k, c in counts.items() if k in task.classes}
            if not inside:
                raise LabelError(f"task '{name}': no label is one of classes = {list(task.classes)}; "
                                 f"labels seen: {sorted(counts)[:20]}")
            counts = inside
        if task.kind == "regression":
            mean = ts["sum"] / labelled
            if ts["sumsq"] / labelled - mean * mean <= 1e-12 * max(1.0, mean * mean):
                raise LabelError(f"task '{name}': every labelled row has the value {mean:g} ({labelled} rows{where}); "
                                 "a regression needs values that vary")
        elif len(counts) < 2:
            (c, k), = counts.items()
            rule = f", {_rule(task)}" if task.kind == "binary" else ""
            raise LabelError(f"task '{name}': every labelled row is class {c} ({k} rows{where}{rule}); "
                             "a classifier needs two classes")


def _raw_labels_seen(schema: Schema, df: pd.DataFrame) -> dict[str, list[str]]:
    """The distinct raw labels of each ``positive``-list task (at most 20, sorted): for check_summary's message."""
    out = {}
    for name, task in schema.tasks.items():
        if task.kind == "binary" and task.positive is not None and task.column in df.columns:
            cats = {c for c in parse_categorical(df[task.column].to_numpy(dtype=object)) if c is not None}
            out[name] = sorted(cats)[:20]
    return out


def check_site_column(schema: Schema, df: pd.DataFrame) -> None:
    """The schema's ``[sites] column`` must be in the data: refuse (SchemaError) rather than ignore it."""
    col = schema.site_column
    if not col or col in df.columns:
        return
    near = difflib.get_close_matches(col, [str(c) for c in df.columns], n=1, cutoff=0.6)
    near += [str(c) for c in df.columns if str(c).lower() == col.lower() and str(c) not in near]
    hint = f"; did you mean '{near[0]}'?" if near else ""
    data = df.attrs.get("source")
    raise SchemaError(f"[sites] column '{col}' of the schema{f' {schema.source}' if schema.source else ''} is not in "
                      f"the data{f' ({data})' if data else ''}; columns present: {[str(c) for c in df.columns][:40]}{hint}")


def check_table(schema: Schema, df: pd.DataFrame) -> dict[str, Any]:
    """Validate a table for training, once, at the boundary and before any split (so rows are the file's):
    schema columns and ``[sites] column`` present, every value parses, enough rows, and every task's labels
    can train it. Returns the table's preprocessing summary."""
    check_columns(schema, df)
    check_site_column(schema, df)
    summary = site_summary(schema, df)
    source = df.attrs.get("source")
    check_summary(schema, summary, f" of {source}" if source else "", _raw_labels_seen(schema, df))
    return summary


def check_holdout(schema: Schema, part: pd.DataFrame, name: str, advice: str, tasks: Sequence[str] | None = None) -> None:
    """A held-out split (``name``, e.g. "test split (--test-fraction 0.2)") must hold at least two classes of
    every classification task in ``tasks`` (default all): else its AUROC is undefined and early stopping or the
    reported metrics would silently mean nothing. Raises LabelError ending with ``advice``."""
    labels = derive_labels(schema, part)
    for t in tasks if tasks is not None else schema.tasks:
        task = schema.tasks[t]
        if task.kind == "regression":
            continue
        counts = target_summary(schema, {t: labels[t]})[t]["counts"]
        if len(counts) < 2:
            held = "no labelled row" if not counts else f"only class {next(iter(counts))} ({sum(counts.values())} rows)"
            raise LabelError(f"the {name} holds {len(part)} rows and {held} of task '{t}'; {advice}")


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
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        pick = lambda d: {k: v.index_select(0, idx) for k, v in d.items()}  # noqa: E731  (v[idx], ~5x faster)
        return TensorData(pick(self.x), pick(self.present), pick(self.y), pick(self.y_present))

    def rows(self, start: int, stop: int) -> "TensorData":
        """Rows ``start:stop`` as views (no copy): batches of a table shuffled once per epoch."""
        pick = lambda d: {k: v[start:stop] for k, v in d.items()}  # noqa: E731
        return TensorData(pick(self.x), pick(self.present), pick(self.y), pick(self.y_present))

    @property
    def modalities(self) -> list[str]:
        return list(self.present)


def encode(prep: Preprocessor, df: pd.DataFrame, with_labels: bool = True) -> TensorData:
    """Encode a table with fitted statistics. Raises DataError naming bad values."""
    check_columns(prep.schema, df, need_labels=with_labels)
    with file_rows(df):
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
    folder = builtin_path(_SHARED.get(name, name))
    csv = next(p for p in sorted(folder.iterdir()) if p.name.endswith((".csv", ".csv.gz")))
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
