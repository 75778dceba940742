"""The training loop shared by centralized, local and federated training."""
from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from edge_runtime.schema import Schema

from .correction import keep_probabilities, thin
from .data import TensorData
from .fused import FusedStep, clip_grads, supported
from .modules import decoder_module, encoder_module, INIT_STATE
from .settings import DEFAULTS


@dataclass
class TrainConfig:
    """Optimization hyperparameters. The fields shared with the run settings (lr, batch_size, weight_decay,
    grad_clip, val_fraction, missingness, audit_min_cell, seed) take their defaults and meaning from ``mmn_fed.settings``."""

    epochs: int = 150
    batch_size: int = DEFAULTS.batch_size  # 0 = auto: a power of two near n/50, between 32 and 256
    lr: float = DEFAULTS.lr
    weight_decay: float = DEFAULTS.weight_decay
    grad_clip: float = DEFAULTS.grad_clip
    patience: int = 20  # epochs without validation improvement before stopping
    val_fraction: float = DEFAULTS.val_fraction
    monitor: str = "auto"  # "loss", "<task>:auroc", "<task>:mse"... ; auto = first task's main metric
    shuffle_order: bool = False  # permute the encoder order per batch (order invariance)
    state_change_penalty: float = 0.0
    # auto | correct | off: which modalities are balanced against the label (mmn_fed.correction)
    missingness: str = DEFAULTS.missingness
    audit_min_cell: int = DEFAULTS.audit_min_cell
    seed: int = DEFAULTS.seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @classmethod
    def from_settings(cls, settings: object, **overrides) -> "TrainConfig":
        """The fields shared with ``settings`` (``RunSettings`` or ``SiteSettings``) taken from it, then ``overrides``."""
        shared = {k: getattr(settings, k) for k in cls.__dataclass_fields__ if hasattr(settings, k)}
        return cls(**{**shared, **overrides})


def per_sample_loss(kind: str, logits: Tensor, y: Tensor) -> Tensor:
    """Loss per row: logits (N, k), y (N,)."""
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y, reduction="none")
    if kind == "multiclass":
        return F.cross_entropy(logits, y, reduction="none")
    return F.mse_loss(logits.squeeze(-1), y, reduction="none")


def model_loss(model: nn.Module, schema: Schema, batch: TensorData, order=None,
               state_change_penalty: float = 0.0) -> tuple[Tensor, int]:
    """Loss at every decoded state, averaged over the (state, task, sample) cells that exist:
    a cell exists when the sample reached that state through an encoder (or it is the initial
    state) and has a label for that task. Task weights scale their cells. Returns (loss, cells).
    A model with ``encode_states`` (MultiModN) decodes only the states of existing cells."""
    if hasattr(model, "encode_states"):
        states, applied = model.encode_states(batch.x, batch.present, order)
        total, weight_sum, cells = _cell_loss(model, schema, batch, states, applied)
    else:
        logits, applied, states = model.forward_stacked(batch.x, batch.present, order)
        total, weight_sum, cells = _masked_loss(schema, batch, logits, applied)
    loss = total / weight_sum.clamp(min=1.0)
    n_states = applied.shape[0]
    if state_change_penalty > 0 and n_states > 1:
        step = ((states[1:] - states[:-1]) ** 2).sum(-1)  # (S-1, B)
        a = applied[1:].float()
        if a.sum() > 0:
            loss = loss + state_change_penalty * (step * a).sum() / a.sum()
    return loss, cells


def _masked_loss(schema: Schema, batch: TensorData, logits: Mapping[str, Tensor], applied: Tensor):
    """(weighted loss sum, weight sum, cells) with every state decoded and the missing cells masked out."""
    n_states = applied.shape[0]
    total = torch.zeros(())
    weight_sum = torch.zeros(())
    cells = 0
    for t, lg in logits.items():
        task = schema.tasks[t]
        mask = (applied & batch.y_present[t].unsqueeze(0)).reshape(-1).float()
        n = int(mask.sum())
        if n == 0:
            continue
        y = batch.y[t].repeat(n_states)
        loss = per_sample_loss(task.kind, lg.reshape(-1, lg.shape[-1]), y)
        total = total + task.weight * (loss * mask).sum()
        weight_sum = weight_sum + task.weight * mask.sum()
        cells += n
    return total, weight_sum, cells


def _cell_loss(model: nn.Module, schema: Schema, batch: TensorData, states: Tensor, applied: Tensor):
    """As ``_masked_loss``, decoding only the states (rows of ``states`` flattened to (S * B, D)) that have a
    cell of the task: the same sums, without the decoder work on the states no loss reads."""
    n_states = applied.shape[0]
    flat = states.reshape(-1, states.shape[-1])
    total = torch.zeros(())
    weight_sum = 0.0
    cells = 0
    for t in model.tasks:
        task = schema.tasks[t]
        mask = applied & batch.y_present[t].unsqueeze(0)
        n = int(mask.sum())
        if n == 0:
            continue
        y = batch.y[t].repeat(n_states)
        if n == mask.numel():
            rows = flat
        else:
            keep = mask.reshape(-1).nonzero().squeeze(1)
            rows, y = flat[keep], y[keep]
        loss = per_sample_loss(task.kind, model.decode(rows, [t])[t], y)
        total = total + task.weight * loss.sum()
        weight_sum += task.weight * n
        cells += n
    return total, torch.tensor(float(weight_sum)), cells


def module_counts(model: nn.Module, data: TensorData) -> dict[str, int]:
    """How many samples pass through each module: init_state all rows, an encoder the rows holding
    its modality, a decoder the rows labelled for its task."""
    counts = {}
    if INIT_STATE in dict(model.named_parameters()):
        counts[INIT_STATE] = len(data)
    for m, p in data.present.items():
        counts[encoder_module(m)] = int(p.sum())
    for t, p in data.y_present.items():
        counts[decoder_module(t)] = int(p.sum())
    return counts


def resolve_batch_size(batch_size: int, n: int) -> int:
    """The mini-batch size for ``n`` training rows: ``batch_size`` when > 0, else (auto) the power of two in
    [32, 256] with about 50 steps per epoch (n / b <= 50 while n <= 12,800). A federated site resolves it on its
    own rows, so more, smaller sites take more steps per round in total (up to 256 / 32 = 8x) but the same local
    steps per site; one fixed size for every site keeps the total but cuts each site's local steps: the trade, and
    why auto stays per site, in docs/federation.md ("Scale")."""
    if batch_size > 0:
        return batch_size
    b = 32
    while b < 256 and b * 50 < n:
        b *= 2
    return b


def iterate_batches(n: int, batch_size: int, generator: torch.Generator):
    batch_size = resolve_batch_size(batch_size, n)
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def shuffled_batches(data: TensorData, batch_size: int, generator: torch.Generator):
    """The batches of ``iterate_batches`` (same permutation, same generator draw), gathered once per epoch
    and then sliced as views: one gather per tensor per epoch instead of one per tensor per batch."""
    n = len(data)
    batch_size = resolve_batch_size(batch_size, n)
    shuffled = data.subset(torch.randperm(n, generator=generator))
    for i in range(0, n, batch_size):
        yield shuffled.rows(i, i + batch_size)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam at ``config``'s learning rate and weight decay, with torch's fused step (one kernel over all the
    parameters: the model's ~40 small tensors made the foreach step a sixth of an epoch); foreach where
    the fused step is not available."""
    params = list(params)
    kw = dict(lr=config.lr, weight_decay=config.weight_decay)
    if params and all(p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64) for p in params):
        try:
            return torch.optim.Adam(params, fused=True, **kw)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.Adam(params, foreach=True, **kw)


_EAGER = False  # eager_optimizers() was called: optimizer_step may skip torch's dynamo hooks (see there)


def eager_optimizers() -> bool:
    """Let ``torch.optim`` optimizers run in this process without importing ``torch._dynamo`` (~2.5 s of CPU,
    ~10 s on a loaded box), which torch imports at an optimizer's first ``add_param_group`` / ``zero_grad`` /
    ``step`` only to keep them out of compiled graphs. In a process that never compiles that is a no-op,
    so for processes that train eagerly and exit, e.g. a federated site's ClientApp (Flower 1.42 starts one
    per message; docs/federation.md, "Round time"): ``add_param_group`` and ``zero_grad`` get themselves as
    their cached "dynamo-disabled" version, and ``optimizer_step`` calls the optimizer's own step under
    ``no_grad`` (what torch's wrapper does, minus dynamo's graph breaks; the same arithmetic). Not applied
    (returns False) once dynamo is imported, or when torch's wrappers are not the expected ones."""
    global _EAGER
    import sys
    if "torch._dynamo" in sys.modules:
        return False
    fns = [getattr(getattr(torch.optim.Optimizer, n, None), "__wrapped__", None) for n in ("add_param_group", "zero_grad")]
    if not all(callable(f) for f in fns):
        return False
    for fn in fns:
        if getattr(fn, "__dynamo_disable", None) is None:
            fn.__dynamo_disable = fn  # torch/_compile.py: _disable_dynamo caches the disabled function here
    _EAGER = True
    return True


def _step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``; after ``eager_optimizers()``, without its dynamo graph breaks (which import dynamo)
    when nothing else wraps it: no step hooks, not differentiable, dynamo still not imported."""
    import sys
    if _EAGER and "torch._dynamo" not in sys.modules and not optimizer.defaults.get("differentiable", False):
        from torch.optim import optimizer as _o
        hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
                 _o._global_optimizer_pre_hooks, _o._global_optimizer_post_hooks)
        raw = inspect.unwrap(type(optimizer).step)
        if raw is not type(optimizer).step and not any(hooks):
            with torch.no_grad():
                raw(optimizer)
            return
    optimizer.step()


def train_epochs(
    model: nn.Module,
    schema: Schema,
    data: TensorData,
    config: TrainConfig,
    epochs: int,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
    prox_mu: float = 0.0,
    trainable: Callable[[str], bool] | None = None,
    keep: Mapping[str, Tensor] | None = None,
    *,
    fused: bool = True,
) -> dict[str, float]:
    """Run ``epochs`` passes over ``data``. ``prox_mu`` > 0 adds FedProx's (mu/2)||w - w_global||^2
    against the weights at entry; ``trainable(name)`` restricts which parameters move; ``keep`` (modality ->
    per-row keep probability, ``mmn_fed.correction.keep_probabilities``) hides a new subset of those
    modalities at every epoch. A MultiModN of MLP encoders takes the hand-differentiated step of
    ``mmn_fed.fused`` (the same loss, gradients and Adam step, ~2x faster); ``fused=False`` forces autograd."""
    params = [(n, p) for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if optimizer is None:
        optimizer = make_optimizer([p for _, p in params], config)
    anchor = {n: p.detach().clone() for n, p in params} if prox_mu > 0 else None
    modalities = list(getattr(model, "modalities", data.modalities))
    step = (FusedStep(model, schema, params, optimizer, config.grad_clip, anchor, prox_mu)
            if fused and supported(model, schema, optimizer, params, state_change_penalty=config.state_change_penalty,
                                   shuffle_order=config.shuffle_order)
            else None)
    model.train()
    losses, steps = [], 0
    for _ in range(epochs):
        shown = thin(data, keep or {}, generator)
        for batch in shuffled_batches(shown, config.batch_size, generator):
            if step is not None:
                value, cells = step.step(batch)
                if cells:
                    losses.append(value)
                    steps += 1
                continue
            order = None
            if config.shuffle_order:
                order = [modalities[i] for i in torch.randperm(len(modalities), generator=generator).tolist()]
            loss, cells = model_loss(model, schema, batch, order, config.state_change_penalty)
            if cells == 0:
                continue
            losses.append(optimizer_step(loss, params, optimizer, config.grad_clip, anchor, prox_mu))
            steps += 1
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps}


def optimizer_step(loss: Tensor, params, optimizer: torch.optim.Optimizer, grad_clip: float,
                   anchor: Mapping[str, Tensor] | None = None, prox_mu: float = 0.0) -> float:
    """One update of the named ``params``: the FedProx term against ``anchor`` (when given), backward, clip the
    global gradient norm (``grad_clip`` > 0), step. Returns the loss (with the proximal term)."""
    if anchor is not None:
        loss = loss + 0.5 * prox_mu * sum(((p - anchor[n]) ** 2).sum() for n, p in params)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        clip_grad_norm([p for _, p in params], grad_clip)
    _step(optimizer)
    return float(loss.detach())


def clip_grad_norm(params, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2, foreach) for parameters on one device: the same arithmetic
    without its per-tensor device moves (two per parameter). Returns the total norm before clipping."""
    return clip_grads([p.grad for p in params if p.grad is not None], max_norm)


def split_indices(n: int, fraction: float, seed: int, strata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) index arrays; stratified by ``strata`` when given: within each stratum, in sorted order
    of the strata, its rows shuffled and the first round(size * fraction) held out."""
    rng = np.random.default_rng(seed)
    if strata is None:
        perm = rng.permutation(n)
        k = int(round(n * fraction))
        return np.sort(perm[k:]), np.sort(perm[:k])
    groups = _strata_groups(np.asarray(strata))
    if not groups:  # as np.concatenate([]) does
        raise ValueError("need at least one array to concatenate")
    sizes = [int(round(len(idx) * fraction)) for idx in groups]
    held = [np.zeros(0, dtype=np.intp)]
    if any(sizes):  # else nothing is held out, whatever the shuffles: skip them
        for idx, k in zip(groups, sizes):
            rng.shuffle(idx)
            held.append(idx[:k])
    held = np.sort(np.concatenate(held))
    out = np.ones(n, dtype=bool)
    out[held] = False
    return np.flatnonzero(out), held


def _strata_groups(strata: np.ndarray) -> list[np.ndarray]:
    """The rows of each stratum (ascending), strata in ``np.unique`` order: what ``np.flatnonzero(strata == s)``
    gives for each ``s`` in ``np.unique(strata)``, from one hash pass instead of one comparison per stratum."""
    if strata.dtype.kind in "OUS" and pd.api.types.infer_dtype(strata, skipna=False) == "string":
        codes, uniques = pd.factorize(strata, sort=False)
        rank = np.argsort(np.argsort(np.asarray(uniques, dtype=object), kind="stable"), kind="stable")
        codes = rank[codes]
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(uniques))]
    return [np.flatnonzero(strata == s) for s in np.unique(strata)]


def monitor_value(model: nn.Module, schema: Schema, data: TensorData, monitor: str, targets: Mapping) -> float:
    """Higher is better. 'loss' -> -loss; '<task>:<metric>' at the final state."""
    from .evaluation import predict_final  # local import: evaluation imports training's siblings
    from .metrics import task_metrics

    if monitor == "loss":
        model.eval()
        with torch.no_grad():
            loss, _ = model_loss(model, schema, data)
        return -float(loss)
    task, metric = monitor.split(":", 1)
    preds = predict_final(model, data, targets)
    mask = data.y_present[task].numpy()
    y = data.y[task].numpy()[mask]
    kind = schema.tasks[task].kind
    if kind == "regression":
        st = targets[task]
        y = y * st["std"] + st["mean"]
    val = task_metrics(kind, y, preds[task][mask]).get(metric, float("nan"))
    if math.isnan(val):
        return -float("inf")
    return -val if metric in ("mse", "mae") else val


def default_monitor(schema: Schema) -> str:
    task = next(iter(schema.tasks.values()))
    return f"{task.name}:{'mse' if task.kind == 'regression' else 'auroc'}"


def fit(
    model: nn.Module,
    schema: Schema,
    targets: Mapping,
    train: TensorData,
    val: TensorData | None,
    config: TrainConfig,
    progress: Callable[[dict], None] | None = None,
    correct: Mapping[str, str] | None = None,
) -> dict:
    """Train with Adam, gradient clipping and early stopping on ``val``; restores the best weights.
    ``correct`` (modality -> task) balances those modalities' presence against the label
    (``mmn_fed.correction``): a new subset hidden at every epoch, one fixed subset of ``val``.
    Seeded: the same config and data give the same weights on CPU."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    keep = keep_probabilities(train, correct or {})
    if keep and val is not None and len(val):
        val = thin(val, keep_probabilities(val, correct or {}), torch.Generator().manual_seed(config.seed + 1))
    opt = make_optimizer(model.parameters(), config)
    monitor = default_monitor(schema) if config.monitor == "auto" else config.monitor
    best, best_state, best_epoch, history = -float("inf"), None, 0, []
    t0 = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        stats = train_epochs(model, schema, train, config, 1, gen, optimizer=opt, keep=keep)
        rec = {"epoch": epoch, "train_loss": stats["loss"]}
        if val is not None and len(val):
            score = monitor_value(model, schema, val, monitor, targets)
            rec["val_" + monitor] = score
            if score > best + 1e-6:
                best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        history.append(rec)
        if progress:
            progress(rec)
        if val is not None and epoch - best_epoch >= config.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"history": history, "best_epoch": best_epoch, "best_val": best, "monitor": monitor,
            "seconds": time.perf_counter() - t0}
