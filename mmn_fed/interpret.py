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
from .figures import pyplot, save_figure


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


def _heatmap(matrix: pd.DataFrame, title: str, cmap: str, vmin=None, vmax=None, center=None, fmt: str = "{:.2f}"):
    """A heatmap of ``matrix`` (rows x columns, labelled by its index and columns), each cell annotated."""
    from matplotlib.colors import TwoSlopeNorm

    fig, ax = pyplot().subplots(figsize=(max(4.0, 1.2 + 1.1 * matrix.shape[1]), 1.0 + 0.5 * matrix.shape[0]))
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
            ax.text(j, i, fmt.format(matrix.values[i, j]), ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def imc_matrix(table: pd.DataFrame, value: str = "mean_delta") -> pd.DataFrame:
    """What the IMC heatmap draws: ``value`` per modality (rows, encoder order) and task output (columns)."""
    t = table.assign(col=table["task"] + " " + table["output"])
    m = t.pivot(index="modality", columns="col", values=value)
    return m.loc[list(dict.fromkeys(table["modality"])), list(dict.fromkeys(t["col"]))]


def imc_figure(table: pd.DataFrame, value: str = "mean_delta", title: str | None = None):
    """Heatmap modality x task output. value='mean_delta' (signed shift from the prior, the paper's
    importance score) or 'mean_abs_delta' (magnitude, which does not cancel across patients)."""
    if title is None:
        title = ("Importance score (IMC): encoder alone minus prior" if value == "mean_delta"
                 else "Importance score (IMC): mean |encoder alone - prior|")
    signed = value == "mean_delta"
    return _heatmap(imc_matrix(table, value), title, "RdBu_r" if signed else "Reds", center=0.0 if signed else None,
                    vmin=None if signed else 0, fmt="{:+.2f}" if signed else "{:.2f}")


def plot_imc(table: pd.DataFrame, path: str | Path, value: str = "mean_delta", title: str | None = None) -> Path:
    """``imc_figure`` written as a PNG to ``path``."""
    return save_figure(imc_figure(table, value, title), path, dpi=110)


def cp_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """What the CP heatmap draws: the prediction per task output (rows) after each step (columns
    '<step>:<state>', ' (missing)' when the patient lacks that modality)."""
    t = table.assign(row=table["task"] + " " + table["output"],
                     col=table["step"].astype(str) + ":" + table["state"] + np.where(table["applied"], "", " (missing)"))
    m = t.pivot(index="row", columns="col", values="prediction")
    return m.loc[list(dict.fromkeys(t["row"])), sorted(m.columns, key=lambda c: int(c.split(":")[0]))]


def cp_figure(table: pd.DataFrame, title: str = "Cumulative prediction (CP), one patient"):
    return _heatmap(cp_matrix(table), title, "RdBu_r", vmin=0, vmax=1)


def plot_cp(table: pd.DataFrame, path: str | Path, title: str = "Cumulative prediction (CP), one patient") -> Path:
    """``cp_figure`` written as a PNG to ``path``."""
    return save_figure(cp_figure(table, title), path, dpi=110)


def explained_row(data: TensorData) -> int:
    """The row CP shows: the first one holding every modality (row 0 when none does)."""
    full = np.stack([p.numpy() for p in data.present.values()]).all(axis=0)
    return int(np.flatnonzero(full)[0]) if full.any() else 0


def plot_explanations(t_imc: pd.DataFrame, t_cp: pd.DataFrame, figures_dir: str | Path) -> dict[str, Path]:
    """The IMC heatmaps (signed and magnitude) and the CP heatmap: imc.png, imc_abs.png, cp.png."""
    figures_dir = Path(figures_dir)
    return {"imc.png": plot_imc(t_imc, figures_dir / "imc.png"),
            "imc_abs.png": plot_imc(t_imc, figures_dir / "imc_abs.png", value="mean_abs_delta"),
            "cp.png": plot_cp(t_cp, figures_dir / "cp.png")}


def write_explanations(model: nn.Module, data: TensorData, targets: Mapping, out_dir: str | Path,
                       figures_dir: str | Path | None = None) -> dict[str, Path]:
    """IMC over ``data``'s rows and CP of ``explained_row(data)``, as ``out_dir``/imc.csv and cp.csv;
    with ``figures_dir``, also their heatmaps (``plot_explanations``). Returns file name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_imc = imc(model, data, targets)
    t_cp = cp(model, data, targets, row=explained_row(data))
    paths = {"imc.csv": out_dir / "imc.csv", "cp.csv": out_dir / "cp.csv"}
    t_imc.to_csv(paths["imc.csv"], index=False)
    t_cp.to_csv(paths["cp.csv"], index=False)
    if figures_dir is not None:
        paths.update(plot_explanations(t_imc, t_cp, figures_dir))
    return paths
