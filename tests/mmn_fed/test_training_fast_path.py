"""The fast training path (masked encoders skipped when all or none of a batch hold the modality, decoders run only
on states with a loss cell, dropout masks drawn in one call, fused Adam, one-device gradient clipping, batches
sliced from one shuffle per epoch) gives what the straightforward path gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmn_fed import make_synthetic
from mmn_fed.data import TensorData, encode, fit_preprocessor
from mmn_fed.model import ModelConfig, build_model, keep_masks, run_mlp
from mmn_fed.training import (
    TrainConfig, clip_grad_norm, iterate_batches, make_optimizer, model_loss, per_sample_loss, shuffled_batches,
    train_epochs,
)
from edge_runtime.schema import Schema


def cohort(n: int = 64, seed: int = 0):
    """Three modalities (one held by every row, one by none of the first rows), a binary, a regression and a
    multiclass task, each with unlabelled rows."""
    df, schema = make_synthetic(n, {"a": 3, "b": 2, "c": 2}, seed=seed, missing_rate=0.3)
    rng = np.random.default_rng(seed)
    df[["a_0", "a_1", "a_2"]] = df[["a_0", "a_1", "a_2"]].fillna(0.5)  # modality a: always present
    df.loc[: n // 2, ["c_0", "c_1"]] = np.nan  # modality c: absent from the first half
    df["grade"] = np.array(["x", "y", "z"], dtype=object)[rng.integers(0, 3, n)]
    df.loc[rng.random(n) < 0.2, "outcome"] = np.nan
    df.loc[rng.random(n) < 0.2, "score"] = np.nan
    df.loc[rng.random(n) < 0.2, "grade"] = None
    d = schema.to_dict()
    d["tasks"].append({"name": "grade", "column": "grade", "kind": "multiclass", "weight": 0.5})
    schema = Schema.from_dict(d)
    prep = fit_preprocessor(schema, df)
    return schema, prep, encode(prep, df)


def reference_loss(model, schema, batch: TensorData) -> torch.Tensor:
    """The straightforward MultiModN loss: every encoder masked with torch.where, every state decoded by the
    decoder modules themselves, the missing cells masked out of the sum."""
    b = len(batch)
    state = model.init_state.unsqueeze(0).expand(b, -1)
    states, applied = [state], [torch.ones(b, dtype=torch.bool)]
    for m in model.modalities:
        mask = batch.present[m]
        new = state + model.encoders[m].net(torch.cat([state, batch.x[m]], dim=-1))
        state = torch.where(mask.unsqueeze(-1), new, state)
        states.append(state)
        applied.append(mask)
    flat = torch.stack(states).reshape(-1, state.shape[-1])
    applied = torch.stack(applied)
    total, weight = torch.zeros(()), torch.zeros(())
    for t in model.tasks:
        mask = (applied & batch.y_present[t].unsqueeze(0)).reshape(-1).float()
        loss = per_sample_loss(schema.tasks[t].kind, model.decoders[t](flat), batch.y[t].repeat(len(states)))
        total = total + schema.tasks[t].weight * (loss * mask).sum()
        weight = weight + schema.tasks[t].weight * mask.sum()
    return total / weight.clamp(min=1.0)


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rows", [slice(0, 20), slice(0, 64), slice(40, 64)])
def test_fast_loss_and_gradients_equal_the_straightforward_path(rows):
    schema, prep, data = cohort()
    torch.manual_seed(0)
    model = build_model(prep.modality_dims, {t: prep.task_out_dim(t) for t in schema.tasks}, ModelConfig(dropout=0.0))
    model.train()
    batch = data.subset(torch.arange(64)[rows])
    assert bool(batch.present["a"].all())  # the unmasked path
    if rows.stop <= 20:
        assert not bool(batch.present["c"].any())  # the skipped encoder
    fast, cells = model_loss(model, schema, batch)
    ref = reference_loss(model, schema, batch)
    g_fast, g_ref = grads(model, fast), grads(model, ref)
    assert cells == int(sum(((torch.stack([torch.ones(len(batch), dtype=torch.bool)] + [batch.present[m] for m in
                                                                                     model.modalities]))
                              & batch.y_present[t]).sum() for t in model.tasks))
    assert abs(float(fast.detach()) - float(ref.detach())) < 1e-6
    for n in g_ref:
        assert torch.allclose(g_fast[n], g_ref[n], atol=1e-6, rtol=0), n


def test_eval_forward_is_the_modules_own_forward():
    schema, prep, data = cohort()
    model = build_model(prep.modality_dims, {t: prep.task_out_dim(t) for t in schema.tasks}, ModelConfig())
    model.eval()
    h = torch.randn(10, model.config.state_size)
    for t in model.tasks:
        assert torch.equal(run_mlp(model.decoders[t], h), model.decoders[t](h))
    logits, applied, states = model.forward_stacked(data.x, data.present)
    with torch.no_grad():
        assert abs(float(model_loss(model, schema, data)[0]) - float(reference_loss(model, schema, data))) < 1e-6


def test_dropout_masks_drop_at_the_rate_and_keep_the_expectation():
    torch.manual_seed(1)
    m = keep_masks(3, (200, 500), 0.1)
    dropped = float((m == 0).float().mean())
    assert abs(dropped - 26 / 256) < 0.003  # ceil(0.1 * 256) / 256
    assert abs(float(m.mean()) - 1.0) < 0.005
    assert torch.unique(m).tolist() == pytest.approx([0.0, 256 / (256 - 26)])
    per_slot = (m == 0).float().view(-1, 8).mean(0)  # every 8-bit draw of a 64-bit word drops alike
    assert torch.all((per_slot - 26 / 256).abs() < 0.006)
    torch.manual_seed(1)
    assert torch.equal(keep_masks(3, (200, 500), 0.1), m)  # seeded by torch.manual_seed


def test_batches_are_the_shuffled_rows_of_iterate_batches():
    schema, prep, data = cohort(70)
    fast = list(shuffled_batches(data, 16, torch.Generator().manual_seed(4)))
    slow = [data.subset(i) for i in iterate_batches(len(data), 16, torch.Generator().manual_seed(4))]
    assert len(fast) == len(slow) == 5
    for a, b in zip(fast, slow):
        for part in ("x", "present", "y", "y_present"):
            for k in getattr(b, part):
                assert torch.equal(getattr(a, part)[k], getattr(b, part)[k])


def test_clipping_and_fused_adam_match_torch_reference():
    torch.manual_seed(2)
    nets = [nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    config = TrainConfig()
    opts = [make_optimizer(nets[0].parameters(), config),
            torch.optim.Adam(nets[1].parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)]
    x = torch.randn(32, 7)
    for _ in range(5):
        for net, opt, clip in zip(nets, opts, (clip_grad_norm, nn.utils.clip_grad_norm_)):
            opt.zero_grad()
            (net(x) ** 2).sum().mul(10).backward()  # large gradients: clipping acts
            total = clip(list(net.parameters()), 1.0)
            assert float(total) > 1.0
            opt.step()
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=0)
            assert torch.allclose(p, q, atol=1e-6, rtol=0)


def test_training_is_deterministic():
    schema, prep, data = cohort(96)

    def run():
        torch.manual_seed(5)
        model = build_model(prep.modality_dims, {t: prep.task_out_dim(t) for t in schema.tasks}, ModelConfig())
        train_epochs(model, schema, data, TrainConfig(batch_size=16), 2, torch.Generator().manual_seed(5))
        return model.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_dropout_applies_each_drawn_mask_once_after_its_layer():
    schema, prep, data = cohort()
    model = build_model(prep.modality_dims, {t: prep.task_out_dim(t) for t in schema.tasks}, ModelConfig(dropout=0.3))
    model.train()
    batch = data.subset(torch.arange(20))
    torch.manual_seed(3)
    fast, _ = model.encode_states(batch.x, batch.present)
    torch.manual_seed(3)
    run = [m for m in model.modalities if bool(batch.present[m].any())]
    masks = keep_masks(2 * len(run), (len(batch), model.config.hidden), 0.3).view(len(run), 2, len(batch), -1)
    state = model.init_state.unsqueeze(0).expand(len(batch), -1)
    ref = [state]
    for j, m in enumerate(run):
        net = model.encoders[m].net
        h = torch.relu(net[0](torch.cat([state, batch.x[m]], -1))) * masks[j, 0]
        new = state + net[6](torch.relu(net[3](h)) * masks[j, 1])
        state = torch.where(batch.present[m].unsqueeze(-1), new, state)
        ref.append(state)
    assert len(run) == len(model.modalities) - 1  # modality c is absent from these rows: skipped
    assert torch.allclose(fast[[0] + [1 + model.modalities.index(m) for m in run]], torch.stack(ref), atol=1e-6)
