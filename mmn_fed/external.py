"""External validation, the clinic's first question: how does this model do on *our* patients?

- :func:`predict_csv`: one output row per input row for either model kind (MultiModN or P-Fusion), torch-side
  (an edge bundle exists only for MultiModN); rows with bad values are reported with their CSV line.
- :func:`evaluate_site`: tidy metric records with percentile-bootstrap intervals over patients, a reliability
  diagram, per-modality-combination and per-subgroup metrics, and this site's missingness audit next to
  the training sites' (stored in the model file at training time); :func:`write_report` renders them.
- :func:`recalibrate`: a logistic (Platt) map on the logit per binary task, fitted on this site's labelled
  rows, written into a new model file that every torch-side prediction applies
  (``mmn_fed.evaluation.to_prediction``).

Line numbers are the CSV's own: the header is line 1, the first data row line 2.
"""
from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from edge_runtime.bundle import Predictions
from edge_runtime.preprocessing import RowIssue
from edge_runtime.schema import Schema

from .audit import MIN_EFFECT, audit_frame
from .data import TensorData, check_columns, derive_labels, frame_to_columns, read_table
from .evaluation import combination_key, predict_final, write_metrics
from .metrics import bootstrap_ci, brier_multiclass, reliability, task_metrics
from .model_io import TrainedModel, load_model, model_id, save_model

RECALIBRATION_MIN_ROWS = 100  # below this (or 10 events) a recalibration is noisy: warn
RECALIBRATION_MIN_EVENTS = 10
MAX_CATEGORIES = 5  # a numeric subgroup column with at most this many values is read as categories


class ExternalError(ValueError):
    """Bad arguments or inputs to predict / evaluate (the message names the file, column or option)."""


# ---- reading a site's CSV ------------------------------------------------------------------------

def csv_lines(path: str | Path) -> np.ndarray:
    """The CSV line number of every data record (the header is line 1; blank lines skipped, as pandas does)."""
    lines = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header_seen = False
        start = 1
        for row in reader:
            if row and any(v.strip() for v in row):
                if header_seen:
                    lines.append(start)
                header_seen = True
            start = reader.line_num + 1
    return np.asarray(lines, dtype=np.int64)


def read_site(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A site's table as training reads a CSV (``mmn_fed.data.read_table``) and each row's CSV line."""
    path = Path(path)
    if path.is_dir():
        raise ExternalError(f"{path} is a directory; expected a CSV file")
    df = read_table(path)
    lines = csv_lines(path)
    if len(lines) != len(df):  # an unusual CSV (e.g. a quoted blank record): fall back to 1-based data rows + 1
        lines = np.arange(2, len(df) + 2)
    return df, lines


@dataclass
class Encoded:
    """A table encoded for a model: tensors, which rows are valid, and the issues by CSV line."""

    data: TensorData
    valid: np.ndarray
    reasons: list[str]  # per row: '' or why it was not predicted
    warnings: list[str]  # per row: non-fatal issues (unknown categories)


def _describe(issue: RowIssue, lines: np.ndarray) -> str:
    return f"line {int(lines[issue.row])}, column '{issue.column}': {issue.message} (value {issue.value!r})"


def encode_rows(trained: TrainedModel, df: pd.DataFrame, lines: np.ndarray) -> Encoded:
    """Encode every row; a row with a bad value is marked invalid with a reason naming its line and column,
    the other rows are unaffected. Raises SchemaError when a model input column is absent."""
    prep = trained.preprocessor
    check_columns(prep.schema, df, need_labels=False)
    enc = prep.encode(frame_to_columns(df, prep.schema.input_columns), on_error="collect")
    reasons, warns = [""] * len(df), [""] * len(df)
    for issue in enc.issues:
        target = reasons if issue.fatal else warns
        text = _describe(issue, lines)
        target[issue.row] = f"{target[issue.row]}; {text}" if target[issue.row] else text
    x = {m: torch.from_numpy(a) for m, a in enc.features.items()}
    present = {m: torch.from_numpy(p.copy()) for m, p in enc.present.items()}
    return Encoded(TensorData(x, present, {}, {}), enc.valid.copy(), reasons, warns)


# ---- predict ---------------------------------------------------------------------------------------

def predict_frame(trained: TrainedModel, df: pd.DataFrame, lines: np.ndarray | None = None,
                  keep: Sequence[str] = (), identity: str = "") -> pd.DataFrame:
    """One output row per input row, in input order: the ``keep`` columns, then per task (binary: p(1);
    multiclass: the class and ``<task>_p_<class>``; regression: the value, as ``mmn-edge predict`` writes),
    ``modalities`` (present), ``status`` ('ok' or 'not predicted'), ``reason``, ``warnings``, ``model_id``."""
    df = df.reset_index(drop=True)
    lines = np.arange(2, len(df) + 2) if lines is None else lines
    absent = [k for k in keep if k not in df.columns]
    if absent:
        raise ExternalError(f"--keep column(s) {absent} are not in the input; it has {list(df.columns)[:30]}")
    enc = encode_rows(trained, df, lines)
    prep, model = trained.preprocessor, trained.model
    preds = predict_final(model, enc.data, prep.targets) if len(df) else {t: np.zeros(0) for t in model.tasks}
    tasks = {t: dict(prep.targets[t]) for t in model.tasks}
    values = {t: np.where(enc.valid.reshape((-1,) + (1,) * (preds[t].ndim - 1)), preds[t], np.nan) for t in model.tasks}
    used = [m if ok else "" for m, ok in zip(combination_key(enc.data), enc.valid)]
    out = Predictions(tasks, values, enc.valid, enc.reasons, enc.warnings, list(used))
    table = pd.DataFrame(out.to_rows(), columns=out.columns())
    table.insert(len(tasks) + sum(len(s.get("classes", [])) for s in tasks.values() if s["kind"] == "multiclass") + 1,
                 "status", np.where(enc.valid, "ok", "not predicted"))
    table = table[[c for c in table.columns if c not in ("warnings", "reason")] + ["reason", "warnings"]]
    table["model_id"] = identity
    for i, k in enumerate(keep):
        table.insert(i, k, df[k].to_numpy())
    return table


def _check_output(output: Path, inputs: Sequence[Path]) -> None:
    if output.is_dir():
        raise ExternalError(f"--output {output} is a directory; name a CSV file")
    for p in inputs:
        if output.resolve() == p.resolve():
            raise ExternalError(f"--output {output} is the input file: refusing to overwrite the input")


def predict_csv(model_path: str | Path, input: str | Path, output: str | Path, keep: Sequence[str] = ()) -> dict[str, Any]:
    """``mmn-fed predict``: score a CSV with a model file, writing ``output`` atomically (a temporary file
    renamed into place; nothing is written when the input cannot be read at all)."""
    model_path, input, output = Path(model_path), Path(input), Path(output)
    _check_output(output, [input, model_path])
    trained = load_model(model_path)
    df, lines = read_site(input)
    table = predict_frame(trained, df, lines, keep, model_id(model_path))
    tmp = output.with_name(output.name + ".partial")
    try:
        table.to_csv(tmp, index=False)
        tmp.replace(output)
    finally:
        if tmp.exists():
            tmp.unlink()
    bad = table.loc[table["status"] != "ok", "reason"].tolist()
    return {"rows": len(table), "predicted": int((table["status"] == "ok").sum()), "problems": bad[:5],
            "model_id": model_id(model_path)}


# ---- evaluate --------------------------------------------------------------------------------------

@dataclass
class SiteEvaluation:
    """What ``mmn-fed evaluate`` measured; ``records`` is metrics.json."""

    site: str
    model_id: str
    records: list[dict[str, Any]]
    calibration: dict[str, dict[str, list[float]]]  # task -> reliability diagram
    audit_site: dict[str, Any]
    audit_training: dict[str, Any] | None
    shifts: list[dict[str, Any]]
    excluded: list[str]  # rows not scored (bad values), with their line
    notes: list[str] = field(default_factory=list)
    recalibration: dict[str, Any] | None = None


def _labels(trained: TrainedModel, df: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: labels in the model's encoding (binary 0/1, multiclass class index, regression units) and
    which rows hold one (a multiclass label the model does not know counts as unlabelled)."""
    out = {}
    for t, (v, p) in derive_labels(trained.schema, df).items():
        st = trained.preprocessor.targets[t]
        if st["kind"] == "multiclass":
            index = {c: i for i, c in enumerate(st["classes"])}
            idx = np.array([index.get(c, -1) if ok else -1 for c, ok in zip(v, p)])
            out[t] = (np.maximum(idx, 0), idx >= 0)
        else:
            out[t] = (np.nan_to_num(v.astype(np.float64)), p.astype(bool))
    return out


def subgroup_keys(df: pd.DataFrame, column: str, schema: Schema) -> np.ndarray:
    """Per row the subgroup of ``column``: its value when categorical (declared so in the schema, not
    numeric, or numeric with at most MAX_CATEGORIES values), else its quartile ('Q1 [lo, hi]', ...);
    'missing' where blank."""
    if column not in df.columns:
        raise ExternalError(f"--subgroup column '{column}' is not in the data; it has {list(df.columns)[:30]}")
    s = df[column]
    numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s) and column not in schema.categorical
    if not numeric or s.dropna().nunique() <= MAX_CATEGORIES:
        return np.array([f"{column}={v:g}" if isinstance(v, float) else f"{column}={v}" if v == v and v is not None
                         else f"{column}=missing" for v in s.to_numpy(dtype=object)], dtype=object)
    q = pd.qcut(s, 4, duplicates="drop")
    # name each quartile by the values it holds (qcut's left edges are nudged below the minimum)
    names = {iv: f"{column} Q{i + 1} [{s[q == iv].min():g}, {s[q == iv].max():g}]"
             for i, iv in enumerate(q.cat.categories)}
    return np.array([names[v] if v == v else f"{column}=missing" for v in q], dtype=object)


def _ci_metric(kind: str, metric: str):  # -> a bootstrap_ci metric name or function
    """What bootstrap_ci computes for a metric of a task kind (None: no interval, e.g. balanced accuracy)."""
    if kind == "multiclass":
        return {"auroc": "auroc_ovr", "brier": brier_multiclass}.get(metric)
    return metric if metric in ("auroc", "brier", "accuracy", "mse", "mae") else None


def _group_records(kind: str, y: np.ndarray, pred: np.ndarray, base: Mapping[str, Any], n_boot: int, seed: int,
                   ) -> list[dict[str, Any]]:
    """Records of one group, with a bootstrap interval for every metric that has one."""
    out = []
    for metric, value in task_metrics(kind, y, pred).items():
        lo = hi = float("nan")
        m = _ci_metric(kind, metric)
        if m is not None and n_boot > 0:
            lo, hi = bootstrap_ci(y, pred, m, n_boot=n_boot, seed=seed)
        out.append({**base, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "n": int(len(y))})
    return out


def audit_shifts(site: Mapping[str, Any], training: Mapping[str, Any] | None,
                 min_effect: float = MIN_EFFECT) -> list[dict[str, Any]]:
    """Per (modality, task): this site's presence rate per label against the training sites' pooled rate,
    and whether the presence depends on the label here / in training. ``flag`` is set when a rate differs by
    at least ``min_effect`` for some label, or the dependence is flagged on one side only."""
    if not training:
        return []

    def pooled(audit: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        acc: dict[tuple[str, str], dict[str, Any]] = {}
        for f in audit.get("findings", []):
            if f["kind"] != "modality":
                continue
            e = acc.setdefault((f["name"], f["task"]), {"n": {}, "present": {}, "flagged": False, "suppressed": 0})
            e["flagged"] |= bool(f.get("flagged"))
            if f.get("suppressed"):
                e["suppressed"] += 1
                continue
            for lab, n, k in zip(f["labels"], f["n"], f["present"]):
                e["n"][lab] = e["n"].get(lab, 0) + n
                e["present"][lab] = e["present"].get(lab, 0) + k
        return acc

    here, train = pooled(site), pooled(training)
    rows = []
    for key in sorted(set(here) | set(train)):
        h, t = here.get(key), train.get(key)
        if h is None or t is None:
            continue
        labels = sorted(set(h["n"]) & set(t["n"]))
        if not labels and t["suppressed"]:
            rows.append({"modality": key[0], "task": key[1], "labels": [], "rate_site": [], "rate_training": [],
                         "dependent_site": h["flagged"], "dependent_training": t["flagged"], "flag": False,
                         "meaning": "not compared: the training sites' counts were suppressed (a cell below the "
                                    "minimum count never leaves a site)"})
            continue
        rate = lambda e, lab: e["present"][lab] / e["n"][lab] if e["n"].get(lab) else float("nan")  # noqa: E731
        diffs = {lab: rate(h, lab) - rate(t, lab) for lab in labels}
        big = {lab: d for lab, d in diffs.items() if d == d and abs(d) >= min_effect}
        reasons = []
        m, task = key
        if big:
            here_s = " and ".join(f"{rate(h, lab):.0%} of {task} = {lab}" for lab in big)
            train_s = " and ".join(f"{rate(t, lab):.0%}" for lab in big)
            reasons.append(f"{m} is present for {here_s} patients here vs {train_s} at the training sites: the model "
                           "meets a presence pattern it did not learn from, so predictions for these patients may shift.")
        if h["flagged"] and not t["flagged"]:
            reasons.append(f"{m}'s presence depends on {task} here but did not at the training sites: missingness "
                           "carries outcome information at this site that the model never saw.")
        if t["flagged"] and not h["flagged"]:
            reasons.append(f"{m}'s presence depended on {task} at the training sites but does not here: a model that "
                           "learned 'absent means this label' is wrong here (training with the missingness "
                           "correction removes that reliance).")
        rows.append({"modality": m, "task": task, "labels": labels,
                     "rate_site": [rate(h, lab) for lab in labels], "rate_training": [rate(t, lab) for lab in labels],
                     "dependent_site": h["flagged"], "dependent_training": t["flagged"],
                     "flag": bool(reasons), "meaning": " ".join(reasons)})
    return rows


def training_audit_of(trained: TrainedModel) -> dict[str, Any] | None:
    """The training sites' missingness audit kept in the model file (``provenance.missingness.audit``,
    written by centralized and federated training), or None for a model trained without one."""
    return ((trained.metadata.get("provenance") or {}).get("missingness") or {}).get("audit")


def evaluate_site(trained: TrainedModel, df: pd.DataFrame, lines: np.ndarray | None = None, site: str = "external",
                  identity: str = "", subgroups: Sequence[str] = (), n_boot: int = 1000, seed: int = 0,
                  min_rows: int = 10) -> SiteEvaluation:
    """Score a labelled site table: tidy records (``metrics.json``: the README's keys plus ``ci_low``/``ci_high``,
    a percentile bootstrap over patients, ``subgroup`` and ``model_id``) for all rows, each modality combination
    and each subgroup (groups under ``min_rows`` labelled rows are left out), and the audit comparison."""
    df = df.reset_index(drop=True)
    lines = np.arange(2, len(df) + 2) if lines is None else lines
    schema = trained.schema
    check_columns(schema, df)
    enc = encode_rows(trained, df, lines)
    preds = predict_final(trained.model, enc.data, trained.preprocessor.targets)
    labels = _labels(trained, df)
    prov = trained.metadata.get("provenance", {})
    cal = "platt" if any(st.get("calibration") for st in trained.preprocessor.targets.values()) else "none"
    base = {"model": trained.config.kind, "training": prov.get("training", "centralized"), "seed": prov.get("seed"),
            "condition": "external", "site": site, "state": "final", "model_id": identity, "calibration": cal}
    groups: list[tuple[str, str, np.ndarray]] = [("all", "all", np.ones(len(df), dtype=bool))]
    combos = combination_key(enc.data)
    groups += [("all", c, combos == c) for c in np.unique(combos[enc.valid])] if len(df) else []
    for col in subgroups:
        keys = subgroup_keys(df, col, schema)
        groups += [(g, "all", keys == g) for g in dict.fromkeys(sorted(keys))]
    records, calibration = [], {}
    for t in trained.model.tasks:
        kind = schema.tasks[t].kind
        y, has = labels[t]
        for sub, combo, rows in groups:
            sel = rows & has & enc.valid
            full = sub == "all" and combo == "all"
            if not full and sel.sum() < min_rows:
                continue
            records += _group_records(kind, y[sel], preds[t][sel],
                                      {**base, "task": t, "combination": combo, "subgroup": sub}, n_boot, seed)
        if kind == "binary":
            sel = has & enc.valid
            calibration[t] = reliability(y[sel], preds[t][sel])
    site_audit = audit_frame(schema, df[enc.valid].reset_index(drop=True), sites=[site] * int(enc.valid.sum()),
                             min_cell=1).to_dict()
    training_audit = training_audit_of(trained)
    notes = [] if training_audit else ["the model file holds no training audit (trained before audits were stored): "
                                       "only this site's audit is shown"]
    excluded = [r for r in enc.reasons if r]
    return SiteEvaluation(site, identity, records, calibration, site_audit, training_audit,
                          audit_shifts(site_audit, training_audit), excluded, notes)


# ---- recalibration ---------------------------------------------------------------------------------

def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _fit_platt(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the logistic regression of y on z (unpenalized: a two-parameter map)."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e6, max_iter=1000).fit(z[:, None], y.astype(int))
    return float(lr.intercept_[0]), float(lr.coef_[0, 0])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def recalibrate(trained: TrainedModel, df: pd.DataFrame, lines: np.ndarray | None = None, site: str = "external",
                folds: int = 5, seed: int = 0) -> tuple[TrainedModel, dict[str, Any]]:
    """Fit p = sigmoid(a + b * logit) per binary task on the site's labelled rows (on the logit of the
    model as trained: an earlier recalibration is replaced, not stacked). Returns the recalibrated model and a
    summary per task: a, b, rows, events, warnings, and Brier / reliability before and after, where "after"
    is cross-fitted (each row scored by a map fitted on the other ``folds`` - 1 folds), so it is not an
    in-sample figure. The model file written from it applies the map wherever it predicts."""
    from .metrics import brier

    df = df.reset_index(drop=True)
    lines = np.arange(2, len(df) + 2) if lines is None else lines
    enc = encode_rows(trained, df, lines)
    raw_targets = {t: {k: v for k, v in st.items() if k != "calibration"} for t, st in trained.preprocessor.targets.items()}
    raw = predict_final(trained.model, enc.data, raw_targets)
    current = predict_final(trained.model, enc.data, trained.preprocessor.targets)
    labels = _labels(trained, df)
    targets = {t: dict(st) for t, st in trained.preprocessor.targets.items()}
    summary: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for t in trained.model.tasks:
        if trained.schema.tasks[t].kind != "binary":
            continue
        y, has = labels[t]
        sel = has & enc.valid
        yy, z = y[sel].astype(int), _logit(raw[t][sel])
        n, events = int(sel.sum()), int(min(yy.sum(), len(yy) - yy.sum()))
        warns = []
        if n < RECALIBRATION_MIN_ROWS or events < RECALIBRATION_MIN_EVENTS:
            warns.append(f"only {n} labelled rows and {events} of the rarer class (want >= {RECALIBRATION_MIN_ROWS} "
                         f"and >= {RECALIBRATION_MIN_EVENTS}): the recalibration is noisy")
        if events < 2:
            summary[t] = {"skipped": f"task '{t}': {n} labelled rows with {events} of the rarer class: nothing to fit",
                          "warnings": warns}
            continue
        a, b = _fit_platt(z, yy)
        fold = rng.permutation(n) % max(2, min(folds, events))
        after = np.empty(n)
        for k in np.unique(fold):
            tr = fold != k
            if len(np.unique(yy[tr])) < 2:
                after[~tr] = _sigmoid(a + b * z[~tr])
                continue
            ak, bk = _fit_platt(z[tr], yy[tr])
            after[~tr] = _sigmoid(ak + bk * z[~tr])
        before = current[t][sel]
        targets[t]["calibration"] = {"intercept": a, "slope": b}
        summary[t] = {"intercept": a, "slope": b, "rows": n, "events": events, "warnings": warns,
                      "brier_before": brier(yy, before), "brier_after": brier(yy, after),
                      "reliability_before": reliability(yy, before), "reliability_after": reliability(yy, after)}
    prep = type(trained.preprocessor)(trained.preprocessor.schema, trained.preprocessor.columns, targets)
    meta = {**trained.metadata, "recalibration": {"site": site, "tasks": {t: {k: s[k] for k in ("intercept", "slope",
                                                  "rows", "events")} for t, s in summary.items() if "slope" in s}}}
    return TrainedModel(trained.model, prep, trained.config, meta), summary


def save_recalibrated(path: str | Path, trained: TrainedModel, source_id: str) -> Path:
    meta = dict(trained.metadata)
    meta["recalibration"] = {**meta.get("recalibration", {}), "source_model_id": source_id}
    return save_model(path, trained.model, trained.preprocessor, trained.config, meta.get("train_config"),
                      meta.get("provenance"), meta)


# ---- the report ------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<') else _fmt(c)}</td>" for c in r)
                + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _interval(r: Mapping[str, Any]) -> str:
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if lo is None or lo != lo:
        return "–"
    return f"[{lo:.3f}, {hi:.3f}]"


def plot_reliability(curves: Mapping[str, Mapping[str, list[float]]], path: Path, title: str) -> Path:
    """Reliability diagrams (one line per curve): observed share of positives vs mean predicted probability."""
    from .figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ls=":", color="#888888", lw=1, label="perfect calibration")
    for (name, c), color in zip(curves.items(), ["#c0392b", "#2e86c1", "#555555"]):
        ax.plot(c["predicted"], c["observed"], marker="o", ms=4, color=color, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed share of positives")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(ev: SiteEvaluation, out: Path, model_path: str | Path, data_path: str | Path) -> Path:
    """A self-contained report.html (figures embedded as base64 PNGs) from a SiteEvaluation; every number
    shown is a value of ``ev.records`` (metrics.json) or of the audits."""
    from .figures import img_html

    out = Path(out)
    figs = out / "figures"
    parts = [f"<h1>External validation: {html.escape(ev.site)}</h1>",
             f"<p>Model <code>{html.escape(str(model_path))}</code> (model id <code>{html.escape(ev.model_id)}</code>) "
             f"on <code>{html.escape(str(data_path))}</code>. Intervals: 95% percentile bootstrap over this site's "
             "patients (rows resampled with replacement), so they stay inside the metric's range.</p>"]
    for note in ev.notes:
        parts.append(f"<p class='warn'>{html.escape(note)}</p>")
    if ev.excluded:
        items = "".join(f"<li>{html.escape(r)}</li>" for r in ev.excluded[:20])
        parts.append(f"<p class='warn'>{len(ev.excluded)} row(s) not scored (bad values):</p><ul>{items}</ul>")
    overall = [r for r in ev.records if r["combination"] == "all" and r["subgroup"] == "all"]
    parts.append("<h2>Performance (all labelled rows)</h2>" + _table(
        ["task", "metric", "value", "95% CI", "n"],
        [[r["task"], r["metric"], r["value"], _interval(r), r["n"]] for r in overall], "overall"))
    for t, curve in ev.calibration.items():
        curves = {"model": curve}
        if ev.recalibration and "reliability_after" in ev.recalibration.get(t, {}):
            curves = {"before recalibration": ev.recalibration[t]["reliability_before"],
                      "after (cross-fitted)": ev.recalibration[t]["reliability_after"]}
        p = plot_reliability(curves, figs / f"calibration_{t}.png", f"{t}: reliability diagram")
        parts.append(f"<h3>Calibration, {html.escape(t)}</h3>" + img_html(
            p, f"{t}: observed share of positives per bin of predicted probability (10 equal-width bins; "
               "on the diagonal = calibrated)"))
    if ev.recalibration:
        rows = []
        for t, s in ev.recalibration.items():
            if "slope" in s:
                rows.append([t, s["intercept"], s["slope"], s["rows"], s["events"], s["brier_before"], s["brier_after"],
                             "; ".join(s["warnings"]) or "–"])
            else:
                rows.append([t, None, None, None, None, None, None, s["skipped"]])
        parts.append("<h2>Recalibration (Platt: p = sigmoid(a + b &middot; logit))</h2>"
                     "<p>Fitted on this site's labelled rows; 'Brier after' is cross-fitted (each row scored by a map "
                     "fitted on the other folds), not in-sample.</p>"
                     + _table(["task", "a", "b", "rows", "rarer class", "Brier before", "Brier after", "warnings"],
                              rows, "recalibration"))
    combos = [r for r in ev.records if r["combination"] != "all" and r["metric"] in ("auroc", "mse")]
    parts.append("<h2>Per combination of modalities present</h2><p>Groups with fewer than 10 labelled rows are "
                 "left out.</p>" + _table(["task", "modalities present", "metric", "value", "95% CI", "n"],
                                          [[r["task"], r["combination"], r["metric"], r["value"], _interval(r), r["n"]]
                                           for r in combos], "combinations"))
    subs = [r for r in ev.records if r["subgroup"] != "all" and r["metric"] in ("auroc", "brier", "mse")]
    if subs:
        parts.append("<h2>Performance by subgroup</h2><p>Numeric columns in quartiles (Q1 lowest); groups with fewer "
                     "than 10 labelled rows are left out.</p>"
                     + _table(["task", "subgroup", "metric", "value", "95% CI", "n"],
                              [[r["task"], r["subgroup"], r["metric"], r["value"], _interval(r), r["n"]] for r in subs],
                              "subgroups"))
    parts.append("<h2>Missingness: this site vs the training sites</h2>"
                 "<p>Presence rate of each modality per label, here and pooled over the training sites. "
                 f"<b>Flagged</b> when a rate differs by at least {MIN_EFFECT:.2f} for some label, or when presence "
                 "depends on the label (audit: chi-squared / Fisher test, FDR-controlled) on one side only: the "
                 "model's behaviour for patients without that modality was learned under another pattern.</p>")
    if ev.shifts:
        rows = [["<b class='warn'>yes</b>" if s["flag"] else "no", s["modality"], s["task"],
                 ", ".join(f"{lab}: {a:.0%}" for lab, a in zip(s["labels"], s["rate_site"])),
                 ", ".join(f"{lab}: {b:.0%}" for lab, b in zip(s["labels"], s["rate_training"])),
                 "yes" if s["dependent_site"] else "no", "yes" if s["dependent_training"] else "no",
                 s["meaning"] or "–"] for s in ev.shifts]
        parts.append(_table(["flag", "modality", "task", "present here", "present in training", "label-dependent here",
                             "label-dependent in training", "what it means"], rows, "audit"))
    site_lines = [f"{f['name']} x {f['task']}: " + ", ".join(f"{r:.0%} of {lab}" for lab, r in zip(f['labels'], f['rates'])
                  if r is not None) for f in ev.audit_site["findings"] if f["kind"] == "modality" and not f["suppressed"]]
    parts.append("<details><summary>This site's audit</summary><ul>" + "".join(
        f"<li>{html.escape(s)}</li>" for s in site_lines) + "</ul></details>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:24px auto;padding:0 16px;color:#222}"
             "table{border-collapse:collapse;margin:8px 0 18px;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left;vertical-align:top}th{background:#f2f2f2}figure{margin:12px 0}img{max-width:100%;"
             "border:1px solid #eee}figcaption{font-size:12px;color:#555}.warn{color:#a04000}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>mmn-fed evaluate: {html.escape(ev.site)}</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    path.write_text(doc)
    return path


def evaluate_csv(model_path: str | Path, data: str | Path, out: str | Path, subgroups: Sequence[str] = (),
                 recalibrate_model: bool = False, n_boot: int = 1000, seed: int = 0, site: str | None = None
                 ) -> dict[str, Any]:
    """``mmn-fed evaluate``: metrics.json and report.html in ``out`` (and model-recalibrated.pt with
    ``recalibrate_model``)."""
    model_path, data, out = Path(model_path), Path(data), Path(out)
    if out.exists() and not out.is_dir():
        raise ExternalError(f"--out {out} is a file; name a directory")
    trained = load_model(model_path)
    df, lines = read_site(data)
    site = site or data.stem
    ident = model_id(model_path)
    ev = evaluate_site(trained, df, lines, site, ident, subgroups, n_boot, seed)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"metrics": str(out / "metrics.json"), "model_id": ident}
    if recalibrate_model:
        new, summary = recalibrate(trained, df, lines, site, seed=seed)
        ev.recalibration = summary
        path = save_recalibrated(out / "model-recalibrated.pt", new, ident)
        result["recalibrated_model"] = str(path)
        result["recalibration_warnings"] = [w for s in summary.values() for w in s.get("warnings", [])]
        (out / "recalibration.json").write_text(json.dumps(summary, indent=1))
    write_metrics(out / "metrics.json", ev.records)
    result["report"] = str(write_report(ev, out, model_path, data))
    result["flagged_modalities"] = sorted({s["modality"] for s in ev.shifts if s["flag"]})
    result["summary"] = {f"{r['task']}:{r['metric']}": round(r["value"], 4) for r in ev.records
                         if r["combination"] == "all" and r["subgroup"] == "all" and r["value"] == r["value"]}
    return result
