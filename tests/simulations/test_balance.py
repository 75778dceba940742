"""TrainConfig.balance_missingness (core change for MNAR robustness): within every presence pattern the
weighted label prevalence equals the overall one; unbalanceable patterns are left out."""
import numpy as np
import torch

from mmn_fed import ModelConfig, make_synthetic
from mmn_fed.data import TensorData, encode, fit_preprocessor
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.training import missingness_balance_weights, model_loss
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


def test_unbalanceable_pattern_is_left_out_of_the_loss_at_that_state():
    """'b missing' <=> label 1: after encoder b both patterns determine the label, so every state-2 cell
    weighs 0 and encoder b (which only shapes state 2) gets no gradient; earlier states still train."""
    schema, prep, data = mnar_data(fraction=1.0, natural=0.0)
    model = build_from_preprocessor(prep, ModelConfig(kind="multimodn", dropout=0.0))
    w = missingness_balance_weights(model, schema, data)["outcome"].numpy()
    assert (w[2] == 0).all() and (w[:2] > 0).all()
    params = dict(model.named_parameters())
    grads = {}
    for balanced in (True, False):
        batch = TensorData(data.x, data.present, data.y, data.y_present,
                           missingness_balance_weights(model, schema, data) if balanced else None).subset(range(256))
        loss, _ = model_loss(model, schema, batch)
        grads[balanced] = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    for name, g in grads[True].items():
        if name.startswith("encoders.b."):
            assert g is None or not g.any(), name
        else:
            assert g is not None and g.abs().sum() > 0, name
    assert any(grads[False][n].abs().sum() > 0 for n in params if n.startswith("encoders.b."))
