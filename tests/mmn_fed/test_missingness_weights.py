"""TrainConfig.balance_missingness on a table small enough to weight by hand: each (state, row) loss cell
is weighted by p(y) / p(y | pattern of encoders applied up to that state) (docs/simulations.md, "MNAR
robustness"), and a cell of weight w counts w times in the loss and its gradient."""
import numpy as np
import pytest
import torch

from edge_runtime.schema import Schema
from mmn_fed.data import TensorData
from mmn_fed.model import ModelConfig, build_model
from mmn_fed.training import TrainConfig, missingness_balance_weights, model_loss, train_epochs

SCHEMA = Schema.from_dict({"modalities": {"a": ["a"], "b": ["b"]},
                           "tasks": {"y": {"column": "y", "kind": "binary", "threshold": 0}}})
#                 0  1  2  3  4  5  6  7  8  9 10 11 12 (12: unlabelled)
HAS_A = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1], dtype=bool)
HAS_B = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1], dtype=bool)
Y = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0], dtype=np.float32)
LABELLED = np.arange(13) < 12
# p(y=1) = 6/12 overall.
# After a:   a held (rows 0-6): p(1) = 4/7 -> w(1) = .5/(4/7) = 7/8, w(0) = .5/(3/7) = 7/6
#            a missing (7-11):  p(1) = 2/5 -> w(1) = 5/4, w(0) = 5/6
# After b:   (a, b) = (1, 1) rows 0-3: p(1) = 3/4 -> 2/3, 2;  (1, 0) rows 4-6: p(1) = 1/3 -> 3/2, 3/4
#            (0, 1) rows 8-9: p(1) = 1/2 -> 1, 1;             (0, 0) rows 7, 10, 11: p(1) = 1/3 -> 3/2, 3/4
BY_HAND = np.array([
    [1] * 13,
    [7 / 8, 7 / 8, 7 / 8, 7 / 6, 7 / 8, 7 / 6, 7 / 6, 5 / 6, 5 / 4, 5 / 6, 5 / 6, 5 / 4, 1],
    [2 / 3, 2 / 3, 2 / 3, 2, 3 / 2, 3 / 4, 3 / 4, 3 / 4, 1, 1, 3 / 4, 3 / 2, 1],
], dtype=np.float32)


def tiny(cell_weight=None) -> TensorData:
    rng = np.random.default_rng(0)
    x = {m: torch.from_numpy(rng.standard_normal((13, 1)).astype(np.float32)) for m in "ab"}
    return TensorData(x, {"a": torch.from_numpy(HAS_A), "b": torch.from_numpy(HAS_B)}, {"y": torch.from_numpy(Y)},
                      {"y": torch.from_numpy(LABELLED)}, cell_weight)


def model(kind="multimodn"):
    torch.manual_seed(0)
    return build_model({"a": 1, "b": 1}, {"y": 1}, ModelConfig(kind=kind, state_size=4, hidden=4, dropout=0.0))


def test_weights_are_the_hand_computed_propensity_ratios():
    w = missingness_balance_weights(model(), SCHEMA, tiny())["y"].numpy()
    assert w.shape == (3, 13)
    np.testing.assert_allclose(w, BY_HAND, rtol=1e-6)
    # within every pattern, the weighted labels have the overall prevalence
    for state, key in ((1, HAS_A.astype(int)), (2, HAS_A * 2 + HAS_B)):
        for pattern in np.unique(key[LABELLED]):
            rows = (key == pattern) & LABELLED
            assert (w[state, rows] * Y[rows]).sum() / w[state, rows].sum() == pytest.approx(0.5)
    # P-Fusion has one (fused) state: the pattern is every modality it holds
    np.testing.assert_allclose(missingness_balance_weights(model("pfusion"), SCHEMA, tiny())["y"].numpy(),
                               BY_HAND[2:], rtol=1e-6)


def grads(net, loss):
    return [g for g in torch.autograd.grad(loss, [p for p in net.parameters()], allow_unused=True)]


def test_the_weighted_loss_is_the_hand_weighted_mean_of_cell_losses_and_so_is_its_gradient():
    net = model()
    w = torch.from_numpy(BY_HAND)
    loss, cells = model_loss(net, SCHEMA, tiny({"y": w}))
    # by hand: binary cross-entropy of every (state, row) cell that exists, weighted, over the weights' sum
    outputs, applied = net(tiny().x, tiny().present)
    y = torch.from_numpy(Y)
    total, weights = torch.zeros(()), torch.zeros(())
    for s, (out, a) in enumerate(zip(outputs, applied)):
        p = torch.sigmoid(out["y"].squeeze(-1))
        for r in range(13):
            if a[r] and LABELLED[r]:
                cell = -(y[r] * torch.log(p[r]) + (1 - y[r]) * torch.log(1 - p[r]))
                total, weights = total + w[s, r] * cell, weights + w[s, r]
    by_hand = total / weights
    assert cells == 12 + int((HAS_A & LABELLED).sum()) + int((HAS_B & LABELLED).sum())
    assert float(loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-5)
    for g, h in zip(grads(net, loss), grads(net, by_hand)):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)
    unweighted, _ = model_loss(net, SCHEMA, tiny())
    assert abs(float(unweighted.detach()) - float(loss.detach())) > 1e-3  # the weights do change the loss


def test_a_cell_of_weight_w_counts_as_w_copies_of_it():
    """Weight 2 on every cell of row 4 (and 0 on row 7) gives the gradient of the batch in which row 4
    appears twice and row 7 not at all."""
    net = model()
    w = torch.ones(3, 13)
    w[:, 4], w[:, 7] = 2.0, 0.0
    weighted, _ = model_loss(net, SCHEMA, tiny({"y": w}))
    copies = tiny().subset([i for i in range(13) if i != 7] + [4])
    plain, _ = model_loss(net, SCHEMA, copies)
    assert float(weighted.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    for g, h in zip(grads(net, weighted), grads(net, plain)):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-8)


def test_balance_missingness_trains_on_exactly_these_weights():
    balanced, explicit = model(), model()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    train_epochs(balanced, SCHEMA, tiny(), TrainConfig(balance_missingness=True, batch_size=13), 2, gen())
    train_epochs(explicit, SCHEMA, tiny({"y": torch.from_numpy(BY_HAND)}), TrainConfig(batch_size=13), 2, gen())
    plain = model()
    train_epochs(plain, SCHEMA, tiny(), TrainConfig(batch_size=13), 2, gen())
    for (k, a), b, c in zip(balanced.state_dict().items(), explicit.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.allclose(a, c) for a, c in zip(balanced.state_dict().values(), plain.state_dict().values()))
