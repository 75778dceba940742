"""Time series: a subject's observations over time, encoded step by step (the paper's section 3, "Extension to
time series"; docs/timeseries.md).

A time-series schema (``[timeseries]``) reads a table with one row per (subject, time) observation. It becomes a
**step table**: one row per (subject, step), the rows of one step combined (``combine``), sorted by subject and
time, with each per-step target derived into a column of its own. The step table is an ordinary table for the
rest of the library (``row_schema`` is a plain schema over it), so preprocessing summaries stay mergeable and the
encoding is the one of static data; an ``index`` (subjects x steps -> step-table row) says which rows form each
subject's sequence. The model (``MultiModN.forward_sequence``) encodes the static modalities once from a subject's
first step, then at every step the time-series modalities observed at that step, and decodes after every step.
"""
from __future__ import annotations

import copy
import time as _time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from edge_runtime.preprocessing import DataError, Preprocessor, RowIssue
from edge_runtime.schema import ELAPSED, Schema, SchemaError, Task

from .data import ROW_INDEX, TensorData, encode, file_rows, fit_preprocessor
from .metrics import task_metrics
from .training import TrainConfig, optimizer_step, per_sample_loss

STEP_TIME = "step_time"  # the step table's time column (the step's start for a fixed width, the visit's time)
STEP_ROW = "source_row"  # the step table's column holding the table row each step was read from (the last one)


def label_column(task: Task) -> str:
    """The step table's column holding a per-step task's derived target."""
    return f"{task.name}__target"


def row_schema(schema: Schema) -> Schema:
    """The plain schema of the step table: per-step tasks read their derived column (binary: 0/1 > 0.5). With
    ``[timeseries] elapsed = true``, the derived numeric column ``elapsed`` is a modality of its own, placed first
    so that at every step it is encoded before the step's observations (docs/timeseries.md)."""
    if schema.timeseries is not None and schema.timeseries.elapsed:
        schema = replace(schema, modalities={ELAPSED: (ELAPSED,), **schema.modalities},
                         numeric=schema.numeric + (ELAPSED,))
    tasks = {}
    for name, t in schema.tasks.items():
        if t.event_time is not None:
            t = Task(name, label_column(t), "binary", threshold=0.5, weight=t.weight)
        elif t.ahead is not None:
            t = Task(name, label_column(t), "regression", weight=t.weight)
        tasks[name] = t
    return replace(schema, tasks=tasks, timeseries=None)


def _numbers(df: pd.DataFrame, column: str, what: str) -> np.ndarray:
    """A column as floats; a value that is not a number (or is blank) is a DataError naming its rows."""
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        issues = [RowIssue(int(i), column, df[column].iloc[i], f"{what} must be a number", True) for i in bad]
        raise DataError(f"{len(bad)} row(s) without a usable {what}: {{issues}}", issues)
    return values


@dataclass
class Sequences:
    """A step table and its subjects. ``index[i, t]`` is the step-table row of subject ``ids[i]``'s step t (-1
    after its last step); ``steps[STEP_ROW]`` the input table's row each step came from. ``skipped``: input rows
    that are in no step, each with its reason (a long table's variable the schema does not use, a subject
    without observations)."""

    steps: pd.DataFrame
    index: np.ndarray
    ids: np.ndarray
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def lengths(self) -> np.ndarray:
        return (self.index >= 0).sum(axis=1)

    @property
    def first_times(self) -> np.ndarray:
        """Each subject's first step time (orders the subjects of one stream cut in time)."""
        return self.steps[STEP_TIME].to_numpy(dtype=float)[self.index[:, 0]]

    def holdout(self, ts, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(kept, held out) subject positions by the schema's ``split``: random subjects, or by time the subjects
        whose first step is latest."""
        return split_subjects(len(self.ids), fraction, seed, self.first_times if ts.split == "time" else None)

    def subjects(self, which: np.ndarray) -> "Sequences":
        """The sequences of some subjects (positions in ``ids``), with their step rows renumbered."""
        idx = self.index[which]
        rows = idx[idx >= 0]
        new = np.full(len(self.steps), -1)
        new[rows] = np.arange(len(rows))
        index = np.where(idx >= 0, new[np.maximum(idx, 0)], -1)
        index = index[:, : max(1, int((index >= 0).sum(axis=1).max(initial=1)))]
        return Sequences(self.steps.iloc[rows].reset_index(drop=True), index, self.ids[which])


def _ids_and_times(df: pd.DataFrame, ts) -> np.ndarray:
    """The time column as floats; a blank id or a time that is not a number is a DataError naming its rows."""
    blank = np.flatnonzero(df[ts.id].isna().to_numpy())
    if len(blank):
        raise DataError(f"{len(blank)} row(s) without a subject id: {{issues}}",
                        [RowIssue(int(i), ts.id, None, "the subject id is blank", True) for i in blank])
    return _numbers(df, ts.time, "time")


def long_to_visits(schema: Schema, long: pd.DataFrame, subjects: pd.DataFrame | None) -> tuple[pd.DataFrame, list]:
    """A long table (id, time, variable, value) as visit rows: each observation becomes a row holding its one
    variable (the step's rows are combined later), joined with the subject table's columns (static inputs,
    labels) by id. Returns (rows, skipped). Raises naming the file's row for an id the subject table does not
    have, or a numeric variable's value that is not a number."""
    ts = schema.timeseries
    missing = [c for c in (ts.id, ts.time, ts.variable, ts.value) if c not in long.columns]
    if missing:
        raise SchemaError(f"long table: column(s) {missing} named by [timeseries] are not in it; it has "
                          f"{list(long.columns)[:30]}")
    dynamic = [c for m in ts.modalities for c in schema.modalities[m]]
    needed = [c for c in schema.input_columns if c not in dynamic]
    needed += [c for t in schema.tasks.values() for c in (t.column, t.event_time) if c and c not in dynamic]
    needed = list(dict.fromkeys(needed))
    if needed and subjects is None:
        raise SchemaError(f"a long table holds only time-series variables; columns {needed} (static inputs, labels) "
                          "come from a subject table with one row per id: pass it as subjects")
    skipped = []
    with file_rows(long):
        _ids_and_times(long, ts)  # checked here, where the rows are the file's
        variable = long[ts.variable].astype(str).to_numpy()
        used = np.isin(variable, dynamic)
        for v, n in zip(*np.unique(variable[~used], return_counts=True)):
            skipped.append({"rows": int(n), "reason": f"variable '{v}' is in no time-series modality of the schema"})
        work = long[used]
        rows = (long.index.to_numpy() if long.index.name == ROW_INDEX else np.arange(len(long)))[used]
        if subjects is not None:
            if ts.id not in subjects.columns:
                raise SchemaError(f"the subject table has no id column '{ts.id}'")
            known = set(subjects[ts.id].tolist())
            unknown = np.flatnonzero(~work[ts.id].isin(known).to_numpy())
            if len(unknown):
                raise DataError(f"{len(unknown)} observation(s) of a subject the subject table does not have: {{issues}}",
                                [RowIssue(int(np.flatnonzero(used)[i]), ts.id, work[ts.id].iloc[i],
                                          "unknown subject id", True) for i in unknown])
        wide = pd.DataFrame({ts.id: work[ts.id].to_numpy(), ts.time: work[ts.time].to_numpy()})
        var = work[ts.variable].astype(str).to_numpy()
        val = work[ts.value]
        for c in dynamic:
            sel = var == c
            col = pd.Series(np.nan, index=range(len(work)), dtype=object if c in schema.categorical else float)
            if c in schema.categorical:
                col[sel] = val.to_numpy()[sel]
            else:
                num = pd.to_numeric(val.where(sel), errors="coerce").to_numpy(dtype=float)
                bad = np.flatnonzero(sel & np.isnan(num) & val.notna().to_numpy())
                if len(bad):
                    raise DataError(f"{len(bad)} value(s) of a numeric variable that are not numbers: {{issues}}",
                                    [RowIssue(int(np.flatnonzero(used)[i]), ts.value, val.iloc[i],
                                              f"variable '{c}' is numeric", True) for i in bad])
                col = pd.Series(num)
            wide[c] = col.to_numpy()
    wide.index = pd.RangeIndex(len(wide))
    wide["__file_row"] = rows
    if subjects is not None:
        static = subjects[[ts.id] + [c for c in needed if c in subjects.columns]].drop_duplicates(ts.id, keep="last")
        absent = [c for c in needed if c not in subjects.columns]
        if absent:
            raise SchemaError(f"the subject table lacks column(s) {absent}")
        seen = set(wide[ts.id].tolist())
        lonely = [i for i in static[ts.id].tolist() if i not in seen]
        if lonely:
            skipped.append({"rows": len(lonely), "reason": "subject(s) without any observation in the long table",
                            "ids": lonely[:20]})
        wide = wide.merge(static, on=ts.id, how="left")
    return wide, skipped


def build_sequences(schema: Schema, df: pd.DataFrame, subjects: pd.DataFrame | None = None) -> Sequences:
    """The step table of a time-series table (``df`` as ``mmn_fed.data.read_table`` gives it, so errors name the
    file's rows): a visit table, or a long table (``[timeseries] variable/value``) with its ``subjects`` table.
    Raises SchemaError for missing columns, DataError for a blank id or a time that is not a number."""
    ts = schema.timeseries
    if ts is None:
        raise SchemaError("this schema has no [timeseries] section: its table is one row per subject")
    skipped: list = []
    if ts.variable is not None:
        df, skipped = long_to_visits(schema, df, subjects)
    need = [ts.id, ts.time] + [t.event_time for t in schema.tasks.values() if t.event_time]
    missing = [c for c in dict.fromkeys(need) if c not in df.columns]
    if missing:
        raise SchemaError(f"column(s) {missing} named by [timeseries] / the tasks are not in the data; data has "
                          f"{list(df.columns)[:30]}")
    with file_rows(df):
        times = _ids_and_times(df, ts)
        for t in schema.tasks.values():
            if t.event_time:
                _numbers(df, t.event_time, f"event time (task {t.name})")
    work = df.copy()
    work.index = pd.RangeIndex(len(work))
    if "__file_row" in work:  # a long table's rows
        work[STEP_ROW] = work.pop("__file_row").to_numpy() + 1
    else:
        work[STEP_ROW] = (df.index.to_numpy() if df.index.name == ROW_INDEX else np.arange(len(df))) + 1
    work[STEP_TIME] = ts.step_time(times)
    work["__order"] = np.arange(len(work))
    work = work.sort_values([ts.id, STEP_TIME, "__order"], kind="stable")
    steps = _combine(work, schema)
    if ts.elapsed:  # before max_steps: a kept first step still has a previous step
        previous = steps.groupby(ts.id, sort=False)[STEP_TIME].shift(1).to_numpy(dtype=float)
        steps[ELAPSED] = ts.elapsed_since(previous, steps[STEP_TIME].to_numpy(dtype=float))
    if ts.max_steps:
        steps = steps.groupby(ts.id, sort=False).tail(ts.max_steps)
    steps = steps.reset_index(drop=True)
    for t in schema.tasks.values():
        if t.per_step:
            steps[label_column(t)] = _per_step_target(steps, t, ts.id)
    codes, uniques = pd.factorize(steps[ts.id], sort=False)
    lengths = np.bincount(codes, minlength=len(uniques))
    position = steps.groupby(codes).cumcount().to_numpy()
    index = np.full((len(uniques), int(lengths.max(initial=1))), -1, dtype=np.int64)
    index[codes, position] = np.arange(len(steps))
    return Sequences(steps.drop(columns="__order"), index, np.asarray(uniques), skipped)


def _combine(work: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """One row per (id, step). ``last``: each column's last value observed in the step (a blank does not hide an
    earlier value of the same step); ``mean``/``min``/``max`` for numeric inputs, the last value otherwise."""
    ts = schema.timeseries
    keys = [ts.id, STEP_TIME]
    if not work.duplicated(keys).any():
        return work
    grouped = work.groupby(keys, sort=False)
    out = grouped.last()  # pandas' last() skips blanks per column
    if ts.combine != "last":
        numeric = [c for m in ts.modalities for c in schema.modalities[m] if c not in schema.categorical]
        numeric = [c for c in numeric if pd.api.types.is_numeric_dtype(work[c])]
        if numeric:
            out[numeric] = getattr(grouped[numeric], ts.combine)()
    return out.reset_index()


def _per_step_target(steps: pd.DataFrame, task: Task, id_column: str) -> np.ndarray:
    """Event within the horizon after each step (1/0; NaN when follow-up ends earlier without the event, or
    the step is after the event), or the value ``ahead`` steps later (NaN when that step does not exist)."""
    if task.ahead is not None:
        value = pd.to_numeric(steps[task.column], errors="coerce")
        return value.groupby(steps[id_column], sort=False).shift(-task.ahead).to_numpy(dtype=float)
    status = steps[task.column]
    if task.positive is not None:
        from edge_runtime.schema import canonical_category
        event = status.map(lambda v: v == v and v is not None and canonical_category(v) in task.positive).to_numpy()
    else:
        event = (pd.to_numeric(status, errors="coerce") > task.threshold).to_numpy()
    left = pd.to_numeric(steps[task.event_time], errors="coerce").to_numpy(dtype=float) - steps[STEP_TIME].to_numpy(float)
    y = np.full(len(steps), np.nan)
    y[left > task.horizon] = 0.0  # followed beyond the horizon: no event within it
    y[event & (left >= 0) & (left <= task.horizon)] = 1.0
    return y


# ---- encoding and training ----------------------------------------------------------------

@dataclass
class SequenceData:
    """Encoded step rows (``rows``: TensorData over the step table), the subjects' index (N, T) and each step
    row's time (``times``; balancing visit rates needs it, ``mmn_fed.correction.visit_keep_probabilities``)."""

    rows: TensorData
    index: Tensor
    dynamic: tuple[str, ...]
    times: np.ndarray | None = None

    def __len__(self) -> int:
        return self.index.shape[0]

    def batch(self, subjects: Tensor) -> tuple[Tensor, Tensor]:
        """(index of these subjects, trimmed to their longest sequence; the step rows it uses)."""
        idx = self.index[subjects]
        return idx[:, : int((idx >= 0).sum(1).max())], idx[idx >= 0]


def encode_sequences(prep: Preprocessor, seqs: Sequences, dynamic: tuple[str, ...]) -> SequenceData:
    return SequenceData(encode(prep, seqs.steps), torch.from_numpy(seqs.index), dynamic,
                        seqs.steps[STEP_TIME].to_numpy(dtype=float))


def sequence_loss(model, schema: Schema, data: SequenceData, subjects: Tensor,
                  every_encoder: bool = False) -> tuple[Tensor, int]:
    """Mean loss over the (subject, step, task) cells that exist (a step with a label for the task); task
    weights scale their cells. ``every_encoder``: the states after each encoder within a step count too."""
    idx, _ = data.batch(subjects)
    logits, rows = model.forward_sequence(data.rows.x, data.rows.present, idx, data.dynamic, every_encoder)
    total, weight, cells = torch.zeros(()), torch.zeros(()), 0
    for t, lg in logits.items():
        task = schema.tasks[t]
        mask = data.rows.y_present[t][rows]
        n = int(mask.sum())
        if not n:
            continue
        loss = per_sample_loss(task.kind, lg[mask], data.rows.y[t][rows][mask])
        total = total + task.weight * loss.sum()
        weight = weight + task.weight * n
        cells += n
    return total / weight.clamp(min=1.0), cells


@torch.no_grad()
def predict_steps(model, data: SequenceData, targets: Mapping[str, Any], schema: Schema) -> dict[str, np.ndarray]:
    """Per step row (the step table's order): binary p(1), multiclass probabilities, regression values."""
    model.eval()
    logits, rows = model.forward_sequence(data.rows.x, data.rows.present, data.index, data.dynamic)
    order = torch.argsort(rows)
    out = {}
    for t, lg in logits.items():
        lg = lg[order]
        kind = schema.tasks[t].kind
        if kind == "binary":
            out[t] = torch.sigmoid(lg.squeeze(-1)).numpy()
        elif kind == "multiclass":
            out[t] = torch.softmax(lg, -1).numpy()
        else:
            st = targets[t]
            out[t] = lg.squeeze(-1).numpy() * st["std"] + st["mean"]
    return out


def step_metrics(model, schema: Schema, data: SequenceData, targets: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Each task's metrics over the step rows that have its target."""
    preds = predict_steps(model, data, targets, schema)
    out = {}
    for t, p in preds.items():
        ok = data.rows.y_present[t].numpy()
        y = data.rows.y[t].numpy()[ok]
        if schema.tasks[t].kind == "regression":
            y = y * targets[t]["std"] + targets[t]["mean"]
        out[t] = task_metrics(schema.tasks[t].kind, y, p[ok])
    return out


BATCH_SUBJECTS = 32


def train_epochs_sequences(model, schema: Schema, data: SequenceData, config: TrainConfig, epochs: int,
                           generator: torch.Generator, optimizer: torch.optim.Optimizer | None = None,
                           prox_mu: float = 0.0, trainable=None, every_encoder: bool = True,
                           batch_subjects: int = BATCH_SUBJECTS, keep=None) -> dict[str, float]:
    """``epochs`` passes over the subjects in batches (as ``mmn_fed.training.train_epochs`` for rows):
    ``trainable(name)`` restricts which parameters move (a site trains the modules it was sent), ``prox_mu`` > 0
    adds FedProx's (mu/2)||w - w_global||^2. ``keep`` (``mmn_fed.correction.sequence_keep``): the MNAR
    correction, a new subset of the corrected modalities and visits hidden at every epoch."""
    from .correction import thin_sequences

    params = [(n, p) for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if optimizer is None:
        optimizer = torch.optim.Adam([p for _, p in params], lr=config.lr, weight_decay=config.weight_decay)
    anchor = {n: p.detach().clone() for n, p in params} if prox_mu > 0 else None
    model.train()
    losses, steps = [], 0
    whole = data
    for _ in range(epochs):
        if keep is not None:
            data = thin_sequences(whole, keep[0], keep[1], generator)
        for subjects in torch.randperm(len(data), generator=generator).split(batch_subjects):
            loss, cells = sequence_loss(model, schema, data, subjects, every_encoder)
            if not cells:
                continue
            losses.append(optimizer_step(loss, params, optimizer, config.grad_clip, anchor, prox_mu))
            steps += 1
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps}


def sequence_module_counts(model, data: SequenceData) -> dict[str, int]:
    """What each module is trained on, in observed steps: the initial state (if the model has one) and a static
    encoder per subject (with that modality), a time-series encoder per step that observed its modality, a decoder
    per labelled step (docs/timeseries.md)."""
    from .modules import INIT_STATE, decoder_module, encoder_module

    index = data.index
    first = index[:, 0]
    counts = {INIT_STATE: int(len(index))} if INIT_STATE in dict(model.named_parameters()) else {}
    for m, p in data.rows.present.items():
        counts[encoder_module(m)] = int(p.sum()) if m in data.dynamic else int(p[first].sum())
    for t, p in data.rows.y_present.items():
        counts[decoder_module(t)] = int(p.sum())
    return counts


def fit_sequences(model, schema: Schema, targets: Mapping[str, Any], train: SequenceData, val: SequenceData | None,
                  config: TrainConfig, batch_subjects: int = BATCH_SUBJECTS, every_encoder: bool = False,
                  correct: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Adam over batches of subjects; early stopping on the validation subjects' first-task metric (AUROC, or
    -MSE for regression) over their steps; restores the best weights. Seeded. ``correct``: the MNAR correction
    (``mmn_fed.correction``; modality -> task, and ``VISITS``): a new subset hidden at every epoch, one fixed
    subset of the validation subjects' steps."""
    from .correction import sequence_keep, thin_sequences

    keep = sequence_keep(train, correct) if correct else None
    if keep is not None and val is not None and len(val):
        val = thin_sequences(val, *sequence_keep(val, correct), torch.Generator().manual_seed(config.seed + 1))
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    first = next(iter(schema.tasks.values()))
    best, best_state, best_epoch, history = -float("inf"), None, 0, []
    t0 = _time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        stats = train_epochs_sequences(model, schema, train, config, 1, gen, opt, every_encoder=every_encoder,
                                       batch_subjects=batch_subjects, keep=keep)
        rec = {"epoch": epoch, "train_loss": stats["loss"]}
        if val is not None and len(val):
            m = step_metrics(model, schema, val, targets)[first.name]
            score = -m.get("mse", float("nan")) if first.kind == "regression" else m.get("auroc", float("nan"))
            rec["val_score"] = score
            if score == score and score > best + 1e-6:
                best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
            if epoch - best_epoch >= config.patience:
                history.append(rec)
                break
        history.append(rec)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"history": history, "best_epoch": best_epoch, "best_val": best, "seconds": _time.perf_counter() - t0}


# ---- the user path: train on a time-series table ------------------------------------------

def split_subjects(n: int, fraction: float, seed: int, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) subject positions: a seeded random ``fraction`` of the subjects held out (by subject:
    all of a subject's steps are on one side); with ``order`` (a time per subject), the latest ``fraction``."""
    k = int(round(fraction * n)) if fraction > 0 else 0
    perm = np.random.default_rng(seed).permutation(n) if order is None else np.argsort(-np.asarray(order), kind="stable")
    return np.sort(perm[k:]), np.sort(perm[:k])


TS_ENCODER = "gru"  # time series: a GRU cell keeps the state bounded over long histories (docs/timeseries.md)


def train_sequences(seqs: Sequences, schema: Schema, model_config=None, train_config: TrainConfig | None = None,
                    provenance: Mapping[str, Any] | None = None, encoder: str | None = TS_ENCODER,
                    every_encoder: bool = True):
    """Fit preprocessing on the step rows, hold out ``val_fraction`` of the subjects for early stopping, train
    MultiModN step by step, or (``model_config.kind = "pfusion"``) P-Fusion over a window of steps
    (``mmn_fed.pfusion_window``, window ``model_config.pfusion_window``). Returns ``mmn_fed.api.TrainResult``; the
    model's metadata keeps the time-series schema (``extra["timeseries_schema"]``) next to the step-table
    preprocessing.
    MultiModN's time-series defaults (docs/timeseries.md, measured with benchmarks/explore_timeseries.py and
    bench_streaming.py): ``encoder`` replaces the model config's (None: keep it) because the residual MLP
    state diverges over hundreds of steps; ``every_encoder``: the loss also at the state after each encoder
    within a step, as the static model decodes after every encoder. Neither applies to P-Fusion."""
    from .api import TrainResult, missingness_record
    from .audit import audit_frame
    from .correction import resolve_sequences
    from .model import ModelConfig
    from .model_io import TrainedModel, build_from_preprocessor

    model_config = model_config or ModelConfig()
    if encoder is not None and model_config.kind == "multimodn":
        model_config = replace(model_config, encoder=encoder)
    train_config = train_config or TrainConfig()
    rs = row_schema(schema)
    keep, val = seqs.holdout(schema.timeseries, train_config.val_fraction, train_config.seed)
    fit_part = seqs.subjects(keep)
    prep = fit_preprocessor(rs, fit_part.steps)
    dyn = schema.timeseries.step_modalities
    found = audit_frame(rs, fit_part.steps, min_cell=train_config.audit_min_cell)  # presence per step vs labels
    correct = resolve_sequences(train_config.missingness, found, rs)
    torch.manual_seed(train_config.seed)
    model = build_from_preprocessor(prep, model_config, schema)
    val_data = encode_sequences(prep, seqs.subjects(val), dyn) if len(val) else None
    info = fit_sequences(model, rs, prep.targets, encode_sequences(prep, fit_part, dyn), val_data, train_config,
                         every_encoder=every_encoder, correct=correct)
    info["subjects"] = {"train": int(len(keep)), "validation": int(len(val))}
    info["missingness"] = missingness_record(train_config.missingness, correct, found)
    meta = {"model_config": model_config.to_dict(), "train_config": train_config.to_dict(),
            "provenance": {**dict(provenance or {}), "missingness": info["missingness"]},
            "timeseries_schema": schema.to_dict()}
    return TrainResult(TrainedModel(model, prep, model_config, meta), info)


def sequence_records(trained, schema: Schema, seqs: Sequences, context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tidy metric records (README format) of a trained sequence model on some subjects' steps: per task, over
    the steps that have its target (``n`` = steps)."""
    data = encode_sequences(trained.preprocessor, seqs, schema.timeseries.step_modalities)
    return data_records(trained.model, trained.preprocessor, data, context)


def data_records(model, prep: Preprocessor, data: SequenceData, context: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``sequence_records`` on encoded sequences (``prep.schema`` is the step table's schema)."""
    out = []
    for t, metrics in step_metrics(model, prep.schema, data, prep.targets).items():
        n = int(data.rows.y_present[t].sum())
        for metric, value in metrics.items():
            out.append({**context, "site": "all", "task": t, "metric": metric, "value": float(value), "n": n,
                        "state": "final", "combination": "all", "unit": "step"})
    return out


# ---- baselines in the same harness (docs/timeseries.md, "Baselines") ---------------------------------------

class RecurrentBaseline(torch.nn.Module):
    """A GRU over steps with masks: at each step the features of every time-series modality (zeros when absent)
    and their presence flags, concatenated, go through one GRU cell; the static modalities set the first hidden
    state. The same ``forward_sequence`` interface as MultiModN (``every_encoder`` is ignored: one update per
    step), so ``fit_sequences`` trains it. Not modular: it is a peer for benchmarks, not a federated model."""

    def __init__(self, modality_dims: Mapping[str, int], task_dims: Mapping[str, int], dynamic: tuple[str, ...],
                 hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.dynamic = tuple(m for m in modality_dims if m in dynamic)
        self.static = tuple(m for m in modality_dims if m not in dynamic)
        self.tasks = list(task_dims)
        d_dyn = sum(modality_dims[m] + 1 for m in self.dynamic)
        d_static = sum(modality_dims[m] + 1 for m in self.static)
        self.h0 = torch.nn.Linear(max(d_static, 1), hidden)
        self.cell = torch.nn.GRUCell(d_dyn, hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(hidden, k) for t, k in task_dims.items()})

    @staticmethod
    def _inputs(x, present, rows, mods):
        parts = []
        for m in mods:
            p = present[m][rows].unsqueeze(-1).to(x[m].dtype)
            parts += [x[m][rows] * p, p]
        return torch.cat(parts, dim=-1) if parts else torch.zeros(len(rows), 1)

    def forward_sequence(self, x, present, index, dynamic, every_encoder: bool = False):
        valid = index >= 0
        rows = index.clamp(min=0)
        h = torch.tanh(self.h0(self._inputs(x, present, rows[:, 0], self.static)))
        states = []
        for t in range(index.shape[1]):
            new = self.cell(self._inputs(x, present, rows[:, t], self.dynamic), h)
            h = torch.where(valid[:, t].unsqueeze(-1), new, h)
            states.append(h)
        stacked = self.drop(torch.stack(states, dim=1)[valid])
        return {t: self.heads[t](stacked) for t in self.tasks}, index[valid]


def make_synthetic_sequences(n_subjects: int = 200, steps: int = 50, seed: int = 0,
                             missing_rate: float = 0.3) -> tuple[pd.DataFrame, Schema]:
    """A visit table of ``n_subjects`` x ``steps`` for scale tests and benchmarks: a static modality (age), two
    time-series modalities (a drifting latent risk seen through two noisy labs; a vital sign), each observed with
    probability 1 - ``missing_rate`` per step, and a per-step binary target (the risk above 0 at that step)."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_subjects), steps)
    t = np.tile(np.arange(steps, dtype=float), n_subjects)
    risk = np.cumsum(rng.normal(0, 0.3, (n_subjects, steps)), axis=1).ravel() + np.repeat(rng.normal(0, 1, n_subjects), steps)
    n = len(ids)

    def seen(v):
        return np.where(rng.random(n) < missing_rate, np.nan, v)

    df = pd.DataFrame({"id": ids, "t": t, "age": np.repeat(rng.integers(20, 90, n_subjects), steps).astype(float),
                       "lab_a": seen(risk + rng.normal(0, 0.5, n)), "lab_b": seen(-risk + rng.normal(0, 0.8, n)),
                       "vital": seen(rng.normal(0, 1, n) + 0.3 * risk), "high_risk": (risk > 0).astype(int)})
    schema = Schema.from_dict({
        "modalities": {"static": ["age"], "labs": ["lab_a", "lab_b"], "vitals": ["vital"]},
        "tasks": {"high_risk": {"column": "high_risk", "kind": "binary", "threshold": 0.5}},
        "timeseries": {"id": "id", "time": "t", "modalities": ["labs", "vitals"]},
    })
    return df, schema
