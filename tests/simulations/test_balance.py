"""TrainConfig.balance_missingness (core change for MNAR robustness): within every presence pattern the
weighted label prevalence equals the overall one; unbalanceable patterns are left out."""
import numpy as np
import torch

from mmn_fed import ModelConfig, make_synthetic
from mmn_fed.data import encode, fit_preprocessor
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.training import TrainConfig, missingness_balance_weights, model_loss, train_epochs
from simulations.missingness import MissingnessRule, apply_rules


def mnar_data(fraction=0.8, natural=0.15):
    df, schema = make_synthetic(n=3000, modalities={"a": 2, "b": 2}, missing_rate=natural, seed=0)
    schema = schema.subset(tasks=["outcome"])
    df = apply_rules(df, schema, [MissingnessRule("b", "mnar", fraction, task="outcome", label=1)],
                     np.array(["s"] * len(df)), 0, "train")
    prep = fit_preprocessor(schema, df)
    return schema, prep, encode(prep, df)


def test_weighted_prevalence_is_equal_in_every_pattern():
    schema, prep, data = mnar_data()
    for kind, step in (("multimodn", 2), ("pfusion", 0)):
        model = build_from_preprocessor(prep, ModelConfig(kind=kind))
        w = missingness_balance_weights(model, schema, data)["outcome"].numpy()
        y = data.y["outcome"].numpy()
        has_a, has_b = data.present["a"].numpy(), data.present["b"].numpy()
        overall = y.mean()
        for pattern in (True, False):
            rows = (has_b == pattern) & has_a
            weighted = (w[step, rows] * y[rows]).sum() / w[step, rows].sum()
            assert abs(weighted - overall) < 1e-5
            assert abs(y[rows].mean() - overall) > 0.1  # unweighted, the pattern does tell the label
    model = build_from_preprocessor(prep, ModelConfig(kind="multimodn"))
    w = missingness_balance_weights(model, schema, data)["outcome"].numpy()
    assert (w[0] == 1).all() and np.abs(w[1] - 1).max() < 0.1  # prior, +a: a is MCAR, nothing to correct


def test_unbalanceable_pattern_is_left_out_and_training_runs():
    schema, prep, data = mnar_data(fraction=1.0, natural=0.0)  # 'b missing' <=> label 1: cannot be balanced
    model = build_from_preprocessor(prep, ModelConfig(kind="multimodn"))
    w = missingness_balance_weights(model, schema, data)["outcome"].numpy()
    assert (w[2, ~data.present["b"].numpy()] == 0).all()
    tc = TrainConfig(balance_missingness=True, batch_size=256)
    stats = train_epochs(model, schema, data, tc, 1, torch.Generator().manual_seed(0))
    assert np.isfinite(stats["loss"]) and stats["steps"] > 0
    loss, cells = model_loss(model, schema, data.subset(range(64)))
    assert torch.isfinite(loss) and cells > 0
