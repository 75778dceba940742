"""Metrics (numpy, equal to scikit-learn's), NaN where a metric is undefined (e.g. AUROC on one-class labels), and
percentile-bootstrap confidence intervals.

Two kinds of interval, both percentile bootstraps, so both stay inside the metric's range by construction
(every replicate is a value of the metric, or a mean of such values):

- :func:`bootstrap_ci` resamples *patients* (rows) of one test set: the uncertainty of one model's score on
  one site (``mmn-fed evaluate``).
- :func:`mean_ci` resamples *seeds*' values: the uncertainty of an across-seed mean (simulation reports,
  benchmarks). With 3 seeds it is necessarily coarse: it never extends beyond the seeds' own range.
"""
from __future__ import annotations

import warnings as _warnings
from typing import Callable, Sequence

import numpy as np

NAN = float("nan")


def _two_classes(y: np.ndarray) -> bool:
    return len(y) > 0 and np.unique(y).size >= 2


# The metrics a site computes every round are plain numpy (equal to scikit-learn's to ~1e-15, pinned by
# tests/mmn_fed/test_metrics.py): importing scikit-learn and SciPy costs ~1 s, and on the deployment engine
# every message starts a fresh ClientApp process (Flower 1.42; docs/federation.md, "Round time"). Calibration
# curves and bootstrap intervals, computed by the server and reports only, still use them.

def _midranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s``, ties sharing the mean of their ranks (``scipy.stats.rankdata``'s "average")."""
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    edges = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])  # where each run of ties starts; n
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat((edges[:-1] + edges[1:] + 1) / 2.0, np.diff(edges))
    return ranks


def _binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg) on mid-ranks: the area under the ROC curve, ties counting half."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    u = float(_midranks(score)[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN unless both classes occur."""
    y = np.asarray(y).astype(int)
    return _binary_auroc(y == 1, np.asarray(score, dtype=np.float64)) if _two_classes(y) else NAN


def auroc_ovr(y: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes that occur in ``y`` (a class absent from ``y`` has no ROC
    curve); NaN with fewer than two classes. Equals ``roc_auc_score(..., multi_class="ovr")`` when every
    class occurs."""
    y = np.asarray(y).astype(int)
    proba = np.asarray(proba, dtype=np.float64)
    present = np.unique(y)
    if present.size < 2:
        return NAN
    return float(np.mean([_binary_auroc(y == k, proba[:, k]) for k in present]))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (a predicted class absent from ``y`` does not count)."""
    y, pred = np.asarray(y), np.asarray(pred)
    if not len(y):
        return NAN
    return float(np.mean([np.mean(pred[y == k] == k) for k in np.unique(y)]))


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if len(y) else NAN


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared difference between p(1) and the 0/1 label (lower is better)."""
    if not len(y):
        return NAN
    return float(np.mean(((np.asarray(y).astype(int) == 1) - np.asarray(p, dtype=np.float64)) ** 2))


def brier_multiclass(y: np.ndarray, proba: np.ndarray) -> float:
    """Half the mean squared distance between the probability vector and the one-hot label: in [0, 1], and
    equal to ``brier`` for two classes (lower is better)."""
    proba = np.asarray(proba, dtype=np.float64)
    if not len(y):
        return NAN
    onehot = np.eye(proba.shape[1])[np.asarray(y).astype(int)]
    return float(0.5 * np.mean(np.sum((proba - onehot) ** 2, axis=1)))


def mse(y: np.ndarray, pred: np.ndarray) -> float:
    d = np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64)
    return float(np.mean(d ** 2)) if len(d) else NAN


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    d = np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64)
    return float(np.mean(np.abs(d))) if len(d) else NAN


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """The reliability diagram of binary p(1): per non-empty bin of equal width, the mean predicted
    probability, the observed share of positives and the row count."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    if not len(y):
        return {"predicted": [], "observed": [], "n": []}
    from sklearn.calibration import calibration_curve
    observed, predicted = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    # calibration_curve drops empty bins; count the rows per bin with its own binning to align them
    counts = np.bincount(np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], p), minlength=n_bins)
    return {"predicted": predicted.tolist(), "observed": observed.tolist(), "n": counts[counts > 0].tolist()}


def task_metrics(kind: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics for one task. pred: binary p(1) (n,); multiclass probabilities (n, k); regression values."""
    if len(y) == 0:
        return {}
    if kind == "binary":
        hard = (pred >= 0.5).astype(int)
        y = y.astype(int)
        return {"auroc": auroc(y, pred), "balanced_accuracy": balanced_accuracy(y, hard), "accuracy": accuracy(y, hard),
                "brier": brier(y, pred)}
    if kind == "multiclass":
        hard = pred.argmax(axis=1)
        y = y.astype(int)
        return {"auroc": auroc_ovr(y, pred), "balanced_accuracy": balanced_accuracy(y, hard), "accuracy": accuracy(y, hard),
                "brier": brier_multiclass(y, pred)}
    return {"mse": mse(y, pred), "mae": mae(y, pred)}


# ---- bootstrap ----------------------------------------------------------------------------------

def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row of (B, n) label / score matrices at once (Mann-Whitney U on mid-ranks, as
    ``roc_auc_score``); NaN for a row holding one class."""
    from scipy.stats import rankdata
    ranks = rankdata(s, axis=1)
    n_pos = y.sum(axis=1)
    n_neg = y.shape[1] - n_pos
    u = (ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def _auroc_ovr_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUROC per resample: (B, n) class indices, (B, n, k) probabilities -> (B,), over the
    classes present in each resample (as :func:`auroc_ovr`)."""
    per_class = np.stack([_auroc_rows((y == k).astype(int), s[..., k]) for k in range(s.shape[-1])], axis=1)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", RuntimeWarning)  # a resample holding one class: NaN, dropped later
        return np.nanmean(per_class, axis=1)


# Replicates of the common metrics computed for all resamples at once: (B, n) labels, (B, n) scores -> (B,)
_VECTORIZED: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "auroc": lambda y, s: _auroc_rows(y.astype(int), s),
    "auroc_ovr": _auroc_ovr_rows,
    "brier": lambda y, s: ((s - y) ** 2).mean(axis=1),
    "accuracy": lambda y, s: ((s >= 0.5) == (y == 1)).mean(axis=1),
    "mse": lambda y, s: ((s - y) ** 2).mean(axis=1),
    "mae": lambda y, s: np.abs(s - y).mean(axis=1),
}
# The same metrics on one sample, for metric names given to bootstrap_ci
_SCALAR: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc, "brier": brier, "accuracy": lambda y, s: accuracy(np.asarray(y).astype(int), (s >= 0.5).astype(int)),
    "mse": mse, "mae": mae, "auroc_ovr": auroc_ovr,
}


def bootstrap_ci(y: np.ndarray, score: np.ndarray, metric: str | Callable[[np.ndarray, np.ndarray], float],
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval over patients (rows): resample rows with replacement ``n_boot`` times,
    compute ``metric`` on each resample and take the (1 - level) / 2 and (1 + level) / 2 quantiles.
    ``metric``: 'auroc', 'brier', 'accuracy' (binary p(1) scores), 'auroc_ovr' ((n, k) class probabilities),
    'mse', 'mae' (all vectorized over resamples) or any ``f(y, score) -> float`` (e.g. :func:`auroc_ovr` with (n, k) scores). Resamples where the metric
    is undefined (one class) are dropped; (NaN, NaN) when none is left or there are no rows."""
    y = np.asarray(y)
    score = np.asarray(score, dtype=np.float64)
    n = len(y)
    if n == 0 or n_boot < 1:
        return NAN, NAN
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    if isinstance(metric, str):
        if metric not in _VECTORIZED:
            raise ValueError(f"unknown metric '{metric}' for bootstrap_ci; known: {sorted(_VECTORIZED)} or a callable")
        reps = _VECTORIZED[metric](y.astype(np.float64)[idx], score[idx])
    else:
        reps = np.array([metric(y[i], score[i]) for i in idx], dtype=np.float64)
    reps = reps[~np.isnan(reps)]
    if not reps.size:
        return NAN, NAN
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def metric_value(metric: str, y: np.ndarray, score: np.ndarray) -> float:
    """The point estimate of a metric named as in :func:`bootstrap_ci`."""
    return _SCALAR[metric](y, score)


def mean_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds and a percentile-bootstrap interval of that mean (resampling the seeds' values; NaNs
    dropped). The interval lies within [min, max] of the values, so inside the metric's range; it is
    (m, m, m) for a single value."""
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    if v.size == 0:
        return NAN, NAN, NAN
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return m, float(lo), float(hi)
