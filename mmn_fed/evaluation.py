"""Predictions and tidy metric records: per state and task (the paper's (E+1) x T matrix), per
site, and per combination of modalities present at test.

``metrics.json`` is a list of records, one per measured value, with at least the keys
model, training, seed, condition, site, task, metric, value (see README, "metrics.json").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edge_runtime.schema import Schema

from .data import TensorData
from .metrics import task_metrics

def to_prediction(kind: str, logits: torch.Tensor, target_stats: Mapping | None) -> np.ndarray:
    """Logits -> what a user reads: p(positive), class probabilities, or a value in original units.
    A binary task recalibrated at a site (``mmn_fed.external.recalibrate``) carries ``calibration``
    {intercept, slope} in its target statistics: p = sigmoid(intercept + slope * logit)."""
    if kind == "binary":
        z = logits.squeeze(-1)
        cal = (target_stats or {}).get("calibration")
        if cal:
            z = cal["intercept"] + cal["slope"] * z
        return torch.sigmoid(z).numpy()
    if kind == "multiclass":
        return torch.softmax(logits, dim=-1).numpy()
    v = logits.squeeze(-1).numpy()
    if target_stats:
        v = v * target_stats["std"] + target_stats["mean"]
    return v


@torch.no_grad()
def predict_trajectory(model: nn.Module, data: TensorData, targets: Mapping, order: Sequence[str] | None = None,
                       batch_size: int = 4096) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Predictions at every state (list over states of task -> array) and which rows reached each."""
    model.eval()
    tasks = model.tasks
    kinds = {t: _kind(model, t, targets) for t in tasks}
    chunks = []
    for i in range(0, len(data), batch_size):
        b = data.subset(torch.arange(i, min(i + batch_size, len(data))))
        outputs, applied = model(b.x, b.present, order=order)
        chunks.append(([{t: to_prediction(kinds[t], o[t], targets.get(t)) for t in tasks} for o in outputs],
                       [a.numpy() for a in applied]))
    n_states = len(chunks[0][0])
    preds = [{t: np.concatenate([c[0][s][t] for c in chunks]) for t in tasks} for s in range(n_states)]
    applied = [np.concatenate([c[1][s] for c in chunks]) for s in range(n_states)]
    return preds, applied


def _kind(model: nn.Module, task: str, targets: Mapping) -> str:
    return targets[task]["kind"]


def predict_final(model: nn.Module, data: TensorData, targets: Mapping) -> dict[str, np.ndarray]:
    preds, _ = predict_trajectory(model, data, targets)
    return preds[-1]


def state_names(model: nn.Module, order: Sequence[str] | None = None) -> list[str]:
    if not hasattr(model, "init_state"):
        return ["fused"]
    return ["prior"] + [f"+{m}" for m in (order or model.modalities)]


def _labels(schema: Schema, data: TensorData, task: str, targets: Mapping) -> tuple[np.ndarray, np.ndarray]:
    mask = data.y_present[task].numpy()
    y = data.y[task].numpy()
    if schema.tasks[task].kind == "regression":
        st = targets[task]
        y = y * st["std"] + st["mean"]
    return y, mask


def combination_key(data: TensorData) -> np.ndarray:
    """Per row: the modalities present, joined with '+' ('none' if none)."""
    mods = data.modalities
    pres = np.stack([data.present[m].numpy() for m in mods], axis=1)
    return np.array(["+".join(m for m, p in zip(mods, row) if p) or "none" for row in pres], dtype=object)


def evaluate(
    model: nn.Module,
    schema: Schema,
    targets: Mapping,
    data: TensorData,
    context: Mapping[str, Any],
    sites: np.ndarray | None = None,
    per_state: bool = True,
    per_combination: bool = True,
    min_rows: int = 10,
) -> list[dict[str, Any]]:
    """Tidy records for ``data``. ``context`` supplies model, training, seed, condition (and any
    extra keys, e.g. sweep values). Every record has ``state`` ('final' or e.g. '2:+symptoms') and
    ``combination`` ('all' or the modalities present) and ``n`` (rows scored)."""
    base = {"model": context.get("model"), "training": context.get("training"), "seed": context.get("seed"),
            "condition": context.get("condition", "clean"), "site": context.get("site", "all")}
    base.update({k: v for k, v in context.items() if k not in base})
    preds, applied = predict_trajectory(model, data, targets)
    names = state_names(model)
    records: list[dict[str, Any]] = []
    groups: list[tuple[str, str, np.ndarray]] = [("all", "all", np.ones(len(data), dtype=bool))]
    if sites is not None:
        groups += [(str(s), "all", sites == s) for s in np.unique(sites)]
    if per_combination:
        combos = combination_key(data)
        groups += [(base["site"], c, combos == c) for c in np.unique(combos)]
    for t in model.tasks:
        kind = schema.tasks[t].kind
        y, ymask = _labels(schema, data, t, targets)
        for site, combo, rows in groups:
            sel = rows & ymask
            if combo != "all" and sel.sum() < min_rows:
                continue
            for metric, value in task_metrics(kind, y[sel], preds[-1][t][sel]).items():
                records.append({**base, "site": site if site != "all" else base["site"], "task": t, "metric": metric,
                                "value": value, "state": "final", "combination": combo, "n": int(sel.sum())})
        if per_state and len(preds) > 1:
            for i, (p, name) in enumerate(zip(preds, names)):
                sel = ymask
                for metric, value in task_metrics(kind, y[sel], p[t][sel]).items():
                    records.append({**base, "task": t, "metric": metric, "value": value, "state": f"{i}:{name}",
                                    "combination": "all", "n": int(sel.sum())})
    return records


def write_metrics(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write records as JSON (NaN -> null), atomically."""
    path = Path(path)
    clean = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in records]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(clean, indent=1))
    tmp.replace(path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())
