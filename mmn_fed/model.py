"""MultiModN (sequential, modular, multi-task) and the P-Fusion baseline.

Both take per-modality inputs ``x[m]`` of shape (B, d_m) with a presence mask ``present[m]`` (B,)
and return a list of decoded states: ``outputs[i][task]`` are logits (B, out_dim) for state i,
with ``applied[i]`` (B,) telling which samples actually reached state i through an encoder.
MultiModN decodes the initial state and the state after every encoder (|M| + 1 states);
P-Fusion decodes once, after fusing every modality.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .settings import DEFAULTS, RunSettings


@dataclass
class ModelConfig:
    """Architecture hyperparameters. ``kind`` selects MultiModN or P-Fusion."""

    kind: str = DEFAULTS.model  # multimodn | pfusion (defaults: mmn_fed.settings)
    state_size: int = DEFAULTS.state_size  # MultiModN state; P-Fusion: size of each modality embedding
    hidden: int = DEFAULTS.hidden  # hidden width of encoders and decoders
    dropout: float = 0.1
    encoder: str = "mlp"  # a name in ENCODERS: the architecture is pluggable
    # P-Fusion on time series (mmn_fed.pfusion_window): steps over which a variable's last value is carried
    pfusion_window: int = DEFAULTS.pfusion_window

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @classmethod
    def from_settings(cls, settings: RunSettings, **overrides) -> "ModelConfig":
        """The architecture that run settings (``mmn_fed.settings``) ask for."""
        return cls(**{"kind": settings.model, "state_size": settings.state_size, "hidden": settings.hidden,
                      "pfusion_window": settings.pfusion_window, **overrides})


def mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    """Two ReLU layers then a linear output, as in the paper's encoders and decoders."""
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, d_out),
    )


_LEVELS = 256  # dropout draws 8 random bits per unit
_PER_WORD = 8  # of a 64-bit word


def keep_scale(p: float) -> float:
    """The factor of a kept unit in ``keep_masks``' masks: 1 / the keep probability (0 when every unit drops)."""
    drop = math.ceil(p * _LEVELS)
    return _LEVELS / (_LEVELS - drop) if drop < _LEVELS else 0.0


def keep_masks(count: int, shape: Sequence[int], p: float) -> Tensor:
    """``count`` inverted-dropout masks of ``shape`` (0 where a unit is dropped, 1 / keep probability where kept),
    drawn in one call: 8 random bits per unit, eight per 64-bit word of torch's generator, ~10x cheaper than
    ``bernoulli_`` (``nn.Dropout``'s draw was a fifth of a training epoch; the random words are still the largest
    part of a training step's dropout). A unit is dropped with probability ceil(p * 256) / 256 (0.1016 for 0.1,
    exactly 0.25 and 0.5 for those); kept units are scaled by the inverse of the keep probability, so the
    expectation is exact. Seeded by ``torch.manual_seed`` like ``nn.Dropout``."""
    return keep_masks_in_sequence([count * math.prod(shape)], p)[0].view(count, *shape)


def keep_masks_in_sequence(sizes: Sequence[int], p: float) -> list[Tensor]:
    """Flat masks of ``sizes`` units, exactly those of one ``keep_masks`` call per size in turn (the same
    values, the generator left in the same state), drawn at once when every size is a multiple of 8 (each
    call then uses whole 64-bit words)."""
    drop = math.ceil(p * _LEVELS)
    if drop >= _LEVELS:
        return [torch.zeros(n) for n in sizes]
    if len(sizes) > 1 and any(n % _PER_WORD for n in sizes):
        return [keep_masks_in_sequence([n], p)[0] for n in sizes]
    total = sum(sizes)
    words = torch.empty(-(-total // _PER_WORD), dtype=torch.int64).random_(-2 ** 63, None)  # 64 uniform bits
    bits = words.view(torch.uint8)[:total]
    # (bits >= drop) * scale, in float arithmetic (bits - (drop - 1) is an integer: >= 1 kept, <= 0 dropped),
    # exactly: 2x faster than the comparison and its bool -> float conversion
    scale = keep_scale(p)
    return list(bits.to(torch.float32).sub_(drop - 1).mul_(scale).clamp_(0.0, scale).split(list(sizes)))


def dropout(h: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout as ``F.dropout``, the mask drawn by ``keep_masks``."""
    if not training or p <= 0:
        return h
    return h * keep_masks(1, h.shape, p)[0].to(h.dtype)


def run_mlp(net: nn.Sequential, h: Tensor, masks: Tensor | None = None) -> Tensor:
    """``net(h)`` for a network built by ``mlp``: the same layers, dropout drawn by ``dropout``, or taken from
    ``masks`` (2, rows, hidden) when given (training: ``keep_masks`` drawn for several networks at once)."""
    if masks is not None:
        h = F.relu(net[0](h)) * masks[0]
        return net[6](F.relu(net[3](h)) * masks[1])
    p, training = net[2].p, net.training
    h = dropout(F.relu(net[0](h)), p, training)
    h = dropout(F.relu(net[3](h)), p, training)
    return net[6](h)


class MLPEncoder(nn.Module):
    """(state, x) -> new state, as a residual update: s' = s + f([s, x])."""

    def __init__(self, d_in: int, state_size: int, hidden: int, dropout: float):
        super().__init__()
        self.net = mlp(state_size + d_in, hidden, state_size, dropout)

    def forward(self, state: Tensor, x: Tensor, masks: Tensor | None = None) -> Tensor:
        return state + run_mlp(self.net, torch.cat([state, x], dim=-1), masks)


class GRUEncoder(nn.Module):
    """(state, x) -> new state with a GRU cell: an alternative architecture for longer inputs."""

    def __init__(self, d_in: int, state_size: int, hidden: int, dropout: float):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cell = nn.GRUCell(hidden, state_size)

    def forward(self, state: Tensor, x: Tensor) -> Tensor:
        return self.cell(self.proj(x), state)


# Register new encoder architectures here: name -> constructor(d_in, state_size, hidden, dropout).
ENCODERS: dict[str, Callable[..., nn.Module]] = {"mlp": MLPEncoder, "gru": GRUEncoder}


class MultiModN(nn.Module):
    """Learned initial state, one encoder per modality, one decoder per task.

    Missingness is per sample: a sample lacking modality m keeps its state at step m, so its
    prediction is exactly that of the sequence without encoder m, whatever else is in the batch.
    """

    def __init__(self, modality_dims: Mapping[str, int], task_dims: Mapping[str, int], config: ModelConfig):
        super().__init__()
        if config.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder '{config.encoder}'; known: {sorted(ENCODERS)}")
        self.config = config
        self.modalities = list(modality_dims)
        self.tasks = list(task_dims)
        s = config.state_size
        self.init_state = nn.Parameter(torch.randn(s) * 0.1)
        self.encoders = nn.ModuleDict(
            {m: ENCODERS[config.encoder](d, s, config.hidden, config.dropout) for m, d in modality_dims.items()}
        )
        self.decoders = nn.ModuleDict({t: mlp(s, config.hidden, k, config.dropout) for t, k in task_dims.items()})

    def decode(self, state: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {t: run_mlp(self.decoders[t], state) for t in (tasks or self.tasks)}

    def initial(self, batch: int) -> Tensor:
        return self.init_state.unsqueeze(0).expand(batch, -1)

    def encode_states(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor],
                      order: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """The initial state and the state after each encoder: states (S, B, D) and applied (S, B), S = steps + 1.
        An encoder runs only if some sample holds its modality, and is masked only if some sample lacks it."""
        order = list(order) if order is not None else self.modalities
        masks = [present[m] for m in order]
        batch = masks[0].shape[0] if masks else next(iter(present.values())).shape[0]
        held = torch.stack(masks).sum(1).tolist() if masks else []  # one sum for all modalities
        state = self.initial(batch)
        states = [state]
        drop = self._encoder_masks([m for m, k in zip(order, held) if k], batch)
        for m, mask, k in zip(order, masks, held):
            extra = (next(drop),) if drop is not None and k else ()
            if k == batch:
                state = self.encoders[m](state, x[m], *extra)
            elif k:
                state = torch.where(mask.unsqueeze(-1), self.encoders[m](state, x[m], *extra), state)
            states.append(state)
        return torch.stack(states), torch.stack([torch.ones(batch, dtype=torch.bool), *masks])

    def _encoder_masks(self, run: Sequence[str], batch: int):
        """Training with MLP encoders: the dropout masks of the encoders in ``run``, drawn at once (an iterator of
        (2, batch, hidden) masks, one per encoder). None when no dropout applies."""
        p = self.config.dropout
        if not (self.training and p > 0 and run and all(isinstance(self.encoders[m], MLPEncoder) for m in run)):
            return None
        return iter(keep_masks(2 * len(run), (batch, self.config.hidden), p).view(len(run), 2, batch, -1))

    def forward_stacked(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor],
                        order: Sequence[str] | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """All states at once: logits {task: (S, B, k)}, applied (S, B), states (S, B, D), S = steps + 1.
        Decoders run once over the stacked states (one call per task instead of one per state)."""
        stacked, applied = self.encode_states(x, present, order)
        flat = stacked.reshape(-1, stacked.shape[-1])
        logits = {t: run_mlp(self.decoders[t], flat).reshape(stacked.shape[0], stacked.shape[1], -1) for t in self.tasks}
        return logits, applied, stacked

    def forward_sequence(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor], index: Tensor,
                         dynamic: Sequence[str], every_encoder: bool = False) -> tuple[dict[str, Tensor], Tensor]:
        """Time series (mmn_fed.sequences): ``x``/``present`` hold step rows; ``index`` (N, T) the row of each
        subject's step t (-1 after its last). The static modalities (those not in ``dynamic``) are encoded once,
        from the subject's first step row; then at every step each dynamic modality observed at that step
        updates the state (schema order); the state after each step is decoded. Returns (logits {task: (R, k)},
        rows (R,)): one decoded state per existing step, with the step row it belongs to. One Python step per
        time step, batched over subjects: the cost grows linearly with the number of steps.
        ``every_encoder`` (training): also decode the state after each encoder applied within a step (with that
        step's row), as the static model decodes after every encoder; these come after the per-step states."""
        n, steps = index.shape
        valid = index >= 0
        rows = index.clamp(min=0)
        state = self.initial(n)
        first = rows[:, 0]
        for m in self.modalities:
            if m not in dynamic:
                mask = present[m][first] & valid[:, 0]
                if bool(mask.any()):
                    state = torch.where(mask.unsqueeze(-1), self.encoders[m](state, x[m][first]), state)
        states, inner, inner_masks, inner_rows = [], [], [], []
        dyn = [m for m in self.modalities if m in dynamic]
        for t in range(steps):
            r = rows[:, t]
            for m in dyn:
                mask = present[m][r] & valid[:, t]
                state = torch.where(mask.unsqueeze(-1), self.encoders[m](state, x[m][r]), state)
                if every_encoder:
                    inner.append(state)
                    inner_masks.append(mask)
                    inner_rows.append(r)
            states.append(state)
        stacked = torch.stack(states, dim=1)[valid]  # (R, D), subject-major
        out_rows = index[valid]
        if inner:  # selected once at the end: one gather instead of one per encoder and step
            keep = torch.stack(inner_masks, dim=1)
            stacked = torch.cat([stacked, torch.stack(inner, dim=1)[keep]])
            out_rows = torch.cat([out_rows, torch.stack(inner_rows, dim=1)[keep]])
        return {t: run_mlp(self.decoders[t], stacked) for t in self.tasks}, out_rows

    def forward(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor], order: Sequence[str] | None = None,
                return_states: bool = False):
        logits, applied, states = self.forward_stacked(x, present, order)
        outputs = [{t: logits[t][i] for t in self.tasks} for i in range(applied.shape[0])]
        if return_states:
            return outputs, list(applied), list(states)
        return outputs, list(applied)


class PFusion(nn.Module):
    """HAIM-style parallel fusion: per-modality embeddings, concatenated (missing ones zero-filled),
    one MLP decoder per task. It sees *which* modalities are missing, so it can learn the missingness."""

    def __init__(self, modality_dims: Mapping[str, int], task_dims: Mapping[str, int], config: ModelConfig):
        super().__init__()
        self.config = config
        self.modalities = list(modality_dims)
        self.tasks = list(task_dims)
        e = config.state_size
        self.encoders = nn.ModuleDict(
            {m: nn.Sequential(mlp(d, config.hidden, e, config.dropout), nn.ReLU()) for m, d in modality_dims.items()}
        )
        fused = e * len(self.modalities)
        self.decoders = nn.ModuleDict({t: mlp(fused, config.hidden, k, config.dropout) for t, k in task_dims.items()})

    def forward_stacked(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor],
                        order: Sequence[str] | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One decoded state (the fused embedding): logits {task: (1, B, k)}, applied (1, B), fused (1, B, F)."""
        batch = next(iter(present.values())).shape[0]
        embs = [self.encoders[m](x[m]) * present[m].unsqueeze(-1).to(x[m].dtype) for m in self.modalities]
        fused = torch.cat(embs, dim=-1)
        logits = {t: self.decoders[t](fused).unsqueeze(0) for t in self.tasks}
        return logits, torch.ones(1, batch, dtype=torch.bool), fused.unsqueeze(0)

    def forward(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor], order: Sequence[str] | None = None,
                return_states: bool = False):
        logits, applied, states = self.forward_stacked(x, present, order)
        outputs = [{t: logits[t][0] for t in self.tasks}]
        if return_states:
            return outputs, list(applied), list(states)
        return outputs, list(applied)


def build_model(modality_dims: Mapping[str, int], task_dims: Mapping[str, int], config: ModelConfig) -> nn.Module:
    if config.kind == "multimodn":
        return MultiModN(modality_dims, task_dims, config)
    if config.kind == "pfusion":
        return PFusion(modality_dims, task_dims, config)
    raise ValueError(f"unknown model kind '{config.kind}'; expected 'multimodn' or 'pfusion'")
