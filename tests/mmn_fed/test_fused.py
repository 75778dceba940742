"""The hand-differentiated training step (mmn_fed/fused.py) against autograd on the same model, batch and random
stream: the same loss, cells, gradients (to float rounding), the same modules updated and the same Adam state."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from mmn_fed import fit_preprocessor, load_builtin, make_synthetic
from mmn_fed.data import encode
from mmn_fed.fused import FusedStep, supported
from mmn_fed.model import ModelConfig, _LEVELS, keep_masks, keep_masks_in_sequence
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.modules import module_of
from mmn_fed.training import TrainConfig, make_optimizer, model_loss, train_epochs


def cohort(name: str, config: ModelConfig = ModelConfig()):
    if name == "heart":  # a binary and a multiclass task, many partly missing modalities
        df, schema = load_builtin("heart")
    else:  # a binary and a regression task, 40% of each modality missing
        df, schema = make_synthetic(700, {"a": 3, "b": 5, "c": 2}, missing_rate=0.4, seed=1)
    prep = fit_preprocessor(schema, df)
    torch.manual_seed(0)
    return build_from_preprocessor(prep, config), prep.schema, encode(prep, df)


def autograd_gradients(model, schema, batch, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, cells = model_loss(model, schema, batch)
    loss.backward()
    return float(loss.detach()), cells, {n: p.grad for n, p in model.named_parameters()}


def fused_gradients(model, schema, batch, seed, params=None):
    step = FusedStep(model, schema, params or list(model.named_parameters()),
                     make_optimizer(model.parameters(), TrainConfig()), 1.0)
    torch.manual_seed(seed)
    loss, cells, modules = step.gradients(batch)
    return loss, cells, modules, step.grad


def batches(data):
    """A full batch, a partial one, one where modality 'b'/'rest' is absent from every row, one without labels of
    the second task."""
    b = data.rows(0, 256)
    yield "first 256 rows", b
    yield "last 37 rows", data.rows(len(data) - 37, len(data))
    gone = copy.copy(b)
    m = data.modalities[1]
    gone.present = {**b.present, m: torch.zeros_like(b.present[m])}
    yield f"no {m} at all", gone
    unlabelled = copy.copy(b)
    t = list(b.y_present)[-1]
    unlabelled.y_present = {**b.y_present, t: torch.zeros_like(b.y_present[t])}
    yield f"no {t} labels", unlabelled


@pytest.mark.parametrize("name", ["heart", "synthetic"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_fused_gradients_are_autograds(name, mode):
    model, schema, data = cohort(name)
    getattr(model, mode)()
    for label, batch in batches(data):
        loss, cells, grads = autograd_gradients(model, schema, batch, seed=7)
        f_loss, f_cells, modules, f_grads = fused_gradients(model, schema, batch, seed=7)
        assert f_cells == cells and f_loss == pytest.approx(loss, rel=1e-6, abs=1e-7), label
        # the modules autograd gives a gradient are exactly those the fused step updates
        assert set(modules) == {module_of(n) for n, g in grads.items() if g is not None}, label
        for n, g in grads.items():
            if g is not None:
                scale = max(float(g.abs().max()), 1e-3)
                assert float((f_grads[n] - g).abs().max()) <= 2e-6 * scale, (label, n)
        # both consumed the same random numbers
        torch.manual_seed(7)
        model_loss(model, schema, batch)
        after_autograd = torch.rand(4)
        fused_gradients(model, schema, batch, seed=7)
        assert torch.equal(torch.rand(4), after_autograd), label


def test_training_with_the_fused_step_ends_where_autograd_ends():
    """3 epochs of heart, FedProx on and only some modules trainable (a site's round): the same weights to
    float rounding, the same Adam step counts, the same loss."""
    model, schema, data = cohort("heart")
    twin = copy.deepcopy(model)
    trainable = lambda n: module_of(n) in {"init_state", "encoders.symptoms", "encoders.rest",  # noqa: E731
                                           "decoders.disease", "decoders.severity"}
    stats, opts = {}, {}
    for fused, m in ((True, model), (False, twin)):
        params = [p for n, p in m.named_parameters() if trainable(n)]
        opts[fused] = make_optimizer(params, TrainConfig(batch_size=64))
        torch.manual_seed(3)
        stats[fused] = train_epochs(m, schema, data, TrainConfig(batch_size=64), 3, torch.Generator().manual_seed(1),
                                    optimizer=opts[fused], prox_mu=0.1, trainable=trainable, fused=fused)
    assert stats[True]["steps"] == stats[False]["steps"] == 3 * math.ceil(len(data) / 64)
    assert stats[True]["loss"] == pytest.approx(stats[False]["loss"], rel=1e-6)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert float((p.detach() - q.detach()).abs().max()) < 1e-5, n
        if not trainable(n):
            assert torch.equal(p, q)  # untouched
    for p, q in zip(opts[True].param_groups[0]["params"], opts[False].param_groups[0]["params"]):
        a, b = opts[True].state[p], opts[False].state[q]
        assert float(a["step"]) == float(b["step"]) and float((a["exp_avg_sq"] - b["exp_avg_sq"]).abs().max()) < 1e-7


def test_a_module_without_a_gradient_is_not_stepped_as_with_autograd():
    """A batch with no row holding a modality: Adam leaves that encoder (and its step count) alone."""
    model, schema, data = cohort("synthetic", ModelConfig(state_size=8, hidden=8))
    twin = copy.deepcopy(model)
    m = data.modalities[0]
    data.present[m][:] = False
    for fused, mdl in ((True, model), (False, twin)):
        opt = make_optimizer(mdl.parameters(), TrainConfig())
        torch.manual_seed(0)
        train_epochs(mdl, schema, data, TrainConfig(batch_size=128), 1, torch.Generator().manual_seed(0),
                     optimizer=opt, fused=fused)
        enc = [p for n, p in mdl.named_parameters() if module_of(n) == f"encoders.{m}"]
        assert all(not opt.state[p] for p in enc)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert float((p.detach() - q.detach()).abs().max()) < 1e-6


def test_the_fused_step_is_taken_only_for_the_model_it_differentiates():
    model, schema, _ = cohort("synthetic")
    opt = make_optimizer(model.parameters(), TrainConfig())
    assert supported(model, schema, opt)
    assert not supported(model, schema, opt, state_change_penalty=0.1)  # a state-change penalty: autograd
    assert not supported(model, schema, opt, shuffle_order=True)  # a shuffled encoder order
    assert not supported(model, schema, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not supported(model, schema, torch.optim.Adam(model.parameters(), foreach=True))
    # the optimizer holds more than the trainable parameters: autograd would step those too
    some = [(n, p) for n, p in model.named_parameters() if module_of(n) != "encoders.a"]
    assert not supported(model, schema, opt, some)
    assert supported(model, schema, make_optimizer([p for _, p in some], TrainConfig()), some)
    model.encoders["a"].net[0].weight.requires_grad_(False)  # frozen: autograd gives it no gradient
    assert not supported(model, schema, None)
    model.encoders["a"].net[0].weight.requires_grad_(True)
    model.decoders["outcome"][2].p = 0.3  # a decoder's own dropout, which autograd's path reads
    assert not supported(model, schema, None)
    gru, schema, _ = cohort("synthetic", ModelConfig(encoder="gru"))
    assert not supported(gru, schema)
    pf, schema, _ = cohort("synthetic", ModelConfig(kind="pfusion"))
    assert not supported(pf, schema)


def test_a_batch_without_a_loss_cell_draws_the_encoders_masks_as_autograd_does():
    """15 of 700 rows labelled, batch 32: most batches have no loss cell; autograd's path still runs the encoders
    (drawing their dropout masks) before skipping them, so the later batches see the same masks."""
    model, schema, data = cohort("synthetic", ModelConfig(state_size=8, hidden=8))
    for t in data.y_present:
        data.y_present[t][15:] = False
    twin = copy.deepcopy(model)
    stats = {}
    for fused, mdl in ((True, model), (False, twin)):
        torch.manual_seed(0)
        stats[fused] = train_epochs(mdl, schema, data, TrainConfig(batch_size=32), 2, torch.Generator().manual_seed(0),
                                    fused=fused)
    assert stats[True]["steps"] == stats[False]["steps"] < 2 * math.ceil(700 / 32)
    assert stats[True]["loss"] == pytest.approx(stats[False]["loss"], rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert float((p.detach() - q.detach()).abs().max()) < 1e-6


def test_masks_drawn_at_once_are_the_masks_drawn_one_call_at_a_time():
    for sizes in ([10 * 256 * 32, 1400 * 32, 1400 * 32], [15, 7, 4], [16, 8], [8]):
        torch.manual_seed(0)
        one_by_one = [keep_masks(1, (n,), 0.1)[0] for n in sizes]
        after = torch.rand(3)
        torch.manual_seed(0)
        at_once = keep_masks_in_sequence(sizes, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(one_by_one, at_once)) and torch.equal(torch.rand(3), after)


@pytest.mark.parametrize("p", [0.0001, 0.1, 0.25, 0.5, 0.9])
def test_keep_masks_keep_a_unit_when_its_8_bits_reach_the_drop_count(p):
    torch.manual_seed(1)
    masks = keep_masks(3, (64, 8), p)
    torch.manual_seed(1)
    n, drop = 3 * 64 * 8, math.ceil(p * _LEVELS)
    bits = torch.empty(n // 8, dtype=torch.int64).random_(-2 ** 63, None).view(torch.uint8)
    assert torch.equal(masks.reshape(-1), (bits >= drop).to(torch.float32) * (_LEVELS / (_LEVELS - drop)))
    # the drop rate is ceil(p * 256) / 256 and the mean is 1 (inverted dropout)
    big = keep_masks(1, (200_000,), p)
    assert float((big == 0).float().mean()) == pytest.approx(drop / _LEVELS, abs=0.004)
    assert float(big.mean()) == pytest.approx(1.0, abs=0.01)


def test_under_fedprox_a_module_the_batch_did_not_reach_is_stepped_by_the_term_alone():
    """A modality held by 5 of 700 rows: most batches do not reach its encoder, whose gradient is then the
    FedProx term's alone (autograd gives every trainable parameter the term's gradient)."""
    model, schema, data = cohort("synthetic", ModelConfig(state_size=8, hidden=8))
    twin = copy.deepcopy(model)
    m = data.modalities[0]
    data.present[m][5:] = False
    for fused, mdl in ((True, model), (False, twin)):
        torch.manual_seed(0)
        train_epochs(mdl, schema, data, TrainConfig(batch_size=32), 2, torch.Generator().manual_seed(0),
                     prox_mu=1.0, fused=fused)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert float((p.detach() - q.detach()).abs().max()) < 1e-5, n


def test_a_hooked_model_keeps_the_autograd_path():
    model, schema, _ = cohort("synthetic")
    assert supported(model, schema)
    h = model.encoders["a"].register_forward_hook(lambda *a: None)
    assert not supported(model, schema)
    h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not supported(model, schema)
    finally:
        h.remove()
    h = model.init_state.register_post_accumulate_grad_hook(lambda p: None)
    assert not supported(model, schema)
    h.remove()
    opt = make_optimizer(model.parameters(), TrainConfig())
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    h = register_optimizer_step_pre_hook(lambda *a: None)
    try:
        assert not supported(model, schema, opt)
    finally:
        h.remove()
    assert supported(model, schema, opt)
