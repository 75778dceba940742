"""The per-round metrics are numpy (no scikit-learn import in a site's process): they equal scikit-learn's."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mmn_fed import metrics as M


@pytest.mark.parametrize("seed", range(6))
def test_binary_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = rng.random(n)
    if seed % 2:  # many ties, as a small model's rounded outputs give
        p = np.round(p, 1)
    hard = (p >= 0.5).astype(int)
    assert M.auroc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    assert M.accuracy(y, hard) == pytest.approx(skm.accuracy_score(y, hard), abs=1e-12)
    assert M.balanced_accuracy(y, hard) == pytest.approx(skm.balanced_accuracy_score(y, hard), abs=1e-12)
    assert M.mse(y, p) == pytest.approx(skm.mean_squared_error(y, p), abs=1e-12)
    assert M.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(100 + seed)
    k, n = 4, 300
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    proba = rng.dirichlet(np.ones(k), n)
    if seed % 2:  # ties (scikit-learn wants rows summing to 1: renormalized after rounding)
        proba = np.round(proba, 1) + 1e-3
        proba /= proba.sum(axis=1, keepdims=True)
    assert M.auroc_ovr(y, proba) == pytest.approx(
        skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=np.arange(k)), abs=1e-12)
    hard = proba.argmax(axis=1)
    assert M.balanced_accuracy(y, hard) == pytest.approx(skm.balanced_accuracy_score(y, hard), abs=1e-12)
    # a class absent from the labels: the macro average over the classes that occur
    seen = y != 2
    indicator = (y[seen][:, None] == np.array([0, 1, 3])[None, :]).astype(int)
    assert M.auroc_ovr(y[seen], proba[seen]) == pytest.approx(
        skm.roc_auc_score(indicator, proba[seen][:, [0, 1, 3]], average="macro"), abs=1e-12)


def test_undefined_metrics_are_nan_and_extra_predicted_classes_do_not_count():
    assert math.isnan(M.auroc(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.9])))
    assert math.isnan(M.auroc_ovr(np.array([2, 2]), np.full((2, 3), 1 / 3)))
    assert all(math.isnan(f(np.array([]), np.array([]))) for f in (M.accuracy, M.brier, M.mse, M.mae, M.balanced_accuracy))
    # recall of class 0 = 1/2, of class 1 = 1; the predicted class 2 occurs in no label
    assert M.balanced_accuracy(np.array([0, 0, 1]), np.array([0, 2, 1])) == pytest.approx(0.75)
    assert M.auroc(np.array([0, 1, 0, 1]), np.array([0.2, 0.2, 0.2, 0.9])) == pytest.approx(0.75)  # a tie counts half
