"""Plain numpy metrics (no scikit-learn at run time). NaN where a metric is undefined."""
from __future__ import annotations

import math

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(score)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ovr(y: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes present in y (and absent from nowhere)."""
    vals = [auroc(y == k, proba[:, k]) for k in range(proba.shape[1])]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = np.asarray(y), np.asarray(pred)
    recalls = [float((pred[y == k] == k).mean()) for k in np.unique(y)]
    return float(np.mean(recalls)) if recalls else float("nan")


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float((np.asarray(y) == np.asarray(pred)).mean()) if len(y) else float("nan")


def mse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean((np.asarray(y) - np.asarray(pred)) ** 2)) if len(y) else float("nan")


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y) - np.asarray(pred)))) if len(y) else float("nan")


def task_metrics(kind: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics for one task. pred: binary p(1) (n,); multiclass probabilities (n, k); regression values."""
    if len(y) == 0:
        return {}
    if kind == "binary":
        hard = (pred >= 0.5).astype(int)
        y = y.astype(int)
        return {"auroc": auroc(y, pred), "balanced_accuracy": balanced_accuracy(y, hard), "accuracy": accuracy(y, hard)}
    if kind == "multiclass":
        hard = pred.argmax(axis=1)
        y = y.astype(int)
        return {"auroc": auroc_ovr(y, pred), "balanced_accuracy": balanced_accuracy(y, hard), "accuracy": accuracy(y, hard)}
    return {"mse": mse(y, pred), "mae": mae(y, pred)}


def mean_ci95(values) -> tuple[float, float, float]:
    """Mean and a t-based 95% confidence interval over seeds (NaNs dropped)."""
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(v.size, 1.96)
    h = t * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - h, m + h
