"""The paper's inherent interpretability (Exp. 3), which its public code does not have.

IMC (individual modality contribution, global): for every sample holding modality m, apply
encoder m alone to the initial state and take prediction(s_m) - prediction(s_0); average over the
population. CP (cumulative prediction, local): one patient's prediction after every step.
Both need MultiModN's decomposable state; P-Fusion cannot give them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import TensorData
from .evaluation import predict_trajectory, to_prediction


def _require_mmn(model: nn.Module) -> None:
    if not hasattr(model, "init_state"):
        raise TypeError("IMC and CP need a MultiModN model: P-Fusion cannot decompose its prediction by modality")


def _outputs(kind: str, pred: np.ndarray, classes: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Name each scalar output of a task: p(1) for binary, p(<class>) per class, value for regression."""
    if kind == "binary":
        return {"p(1)": pred}
    if kind == "multiclass":
        return {f"p({c})": pred[:, j] for j, c in enumerate(classes)}
    return {"value": pred}


@torch.no_grad()
def imc(model: nn.Module, data: TensorData, targets: Mapping) -> pd.DataFrame:
    """Rows (task, output, modality, mean_delta, mean_abs_delta, n): encoder alone vs the prior."""
    _require_mmn(model)
    model.eval()
    prior_logits = model.decode(model.initial(1))
    rows = []
    for m in model.modalities:
        mask = data.present[m]
        n = int(mask.sum())
        if n == 0:
            continue
        x = data.x[m][mask]
        state = model.encoders[m](model.initial(n), x)
        logits = model.decode(state)
        for t in model.tasks:
            st = targets[t]
            kind = st["kind"]
            after = _outputs(kind, to_prediction(kind, logits[t], st), st.get("classes"))
            before = _outputs(kind, to_prediction(kind, prior_logits[t], st), st.get("classes"))
            for name, v in after.items():
                d = v - before[name][0]
                rows.append({"task": t, "output": name, "modality": m, "mean_delta": float(d.mean()),
                             "mean_abs_delta": float(np.abs(d).mean()), "n": n})
    return pd.DataFrame(rows)


def cp(model: nn.Module, data: TensorData, targets: Mapping, row: int = 0) -> pd.DataFrame:
    """One patient's prediction after each step: rows (step, state, applied, task, output, prediction)."""
    _require_mmn(model)
    one = data.subset([row])
    preds, applied = predict_trajectory(model, one, targets)
    names = ["prior"] + list(model.modalities)
    out = []
    for i, (p, a) in enumerate(zip(preds, applied)):
        for t in model.tasks:
            st = targets[t]
            for name, v in _outputs(st["kind"], p[t], st.get("classes")).items():
                out.append({"step": i, "state": names[i], "applied": bool(a[0]), "task": t, "output": name,
                            "prediction": float(v[0])})
    return pd.DataFrame(out)


def _heatmap(matrix: pd.DataFrame, title: str, path: Path, cmap: str, vmin=None, vmax=None, center=None) -> Path:
    from matplotlib.colors import TwoSlopeNorm

    from .figures import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 1.1 * matrix.shape[1]), 1.0 + 0.5 * matrix.shape[0]))
    norm = None
    if center is not None:
        lim = max(float(np.nanmax(np.abs(matrix.values))), 1e-6)
        norm = TwoSlopeNorm(vcenter=center, vmin=center - lim, vmax=center + lim)
    im = ax.imshow(matrix.values, cmap=cmap, aspect="auto", vmin=None if norm else vmin, vmax=None if norm else vmax,
                   norm=norm)
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=35, ha="right")
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix.values[i, j]:+.2f}" if center is not None else f"{matrix.values[i, j]:.2f}",
                    ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path, dpi=110)


def plot_imc(table: pd.DataFrame, path: str | Path, value: str = "mean_delta", title: str | None = None) -> Path:
    """Heatmap modality x task output. value='mean_delta' (signed shift from the prior, the paper's
    importance score) or 'mean_abs_delta' (magnitude, which does not cancel across patients)."""
    t = table.assign(col=table["task"] + " " + table["output"])
    m = t.pivot(index="modality", columns="col", values=value)
    m = m.loc[list(dict.fromkeys(table["modality"])), list(dict.fromkeys(t["col"]))]
    if title is None:
        title = ("Importance score (IMC): encoder alone minus prior" if value == "mean_delta"
                 else "Importance score (IMC): mean |encoder alone - prior|")
    return _heatmap(m, title, Path(path), "RdBu_r" if value == "mean_delta" else "Reds",
                    center=0.0 if value == "mean_delta" else None, vmin=0 if value != "mean_delta" else None)


def plot_cp(table: pd.DataFrame, path: str | Path, title: str = "Cumulative prediction (CP), one patient") -> Path:
    t = table.assign(row=table["task"] + " " + table["output"],
                     col=table["step"].astype(str) + ":" + table["state"] + np.where(table["applied"], "", " (missing)"))
    m = t.pivot(index="row", columns="col", values="prediction")
    m = m.loc[list(dict.fromkeys(t["row"])), sorted(m.columns, key=lambda c: int(c.split(":")[0]))]
    return _heatmap(m, title, Path(path), "RdBu_r", vmin=0, vmax=1)
