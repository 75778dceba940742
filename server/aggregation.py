"""Per-module aggregation: the arithmetic of the federation, as pure functions on numpy arrays.

Every module (``init_state``, ``encoders.<m>``, ``decoders.<t>``; see ``mmn_fed.modules``) is averaged
on its own, over the sites that returned it, weighted by that site's count for that module (the
samples that actually passed through it). A module no site returned is carried forward unchanged.
Normalizing by the weights of the sites that *hold* a module (not of all sites) is what keeps a module
held by one site from shrinking every round, FedMoDN's bug.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mmn_fed.modules import module_of
from mmn_fed.settings import SETTING

Params = Mapping[str, np.ndarray]


class RejectedUpdate(ValueError):
    """A site's update does not fit the global model (unknown parameter, wrong shape, bad count)."""


@dataclass(frozen=True)
class SiteUpdate:
    """What one site returned: its modules' parameters and per-module sample counts."""

    site: str
    params: Params
    counts: Mapping[str, float]


def check_update(global_params: Params, update: SiteUpdate) -> None:
    """Raise RejectedUpdate naming the site and the offending parameter or module."""
    for k, v in update.params.items():
        if k not in global_params:
            raise RejectedUpdate(f"site '{update.site}' returned unknown parameter '{k}'")
        if tuple(np.shape(v)) != tuple(np.shape(global_params[k])):
            raise RejectedUpdate(f"site '{update.site}': parameter '{k}' has shape {np.shape(v)}, "
                                 f"expected {np.shape(global_params[k])}")
        if not np.all(np.isfinite(v)):
            raise RejectedUpdate(f"site '{update.site}': parameter '{k}' has non-finite values")
    for m in {module_of(k) for k in update.params}:
        c = update.counts.get(m)
        if c is None or not np.isfinite(c) or c < 0:
            raise RejectedUpdate(f"site '{update.site}' returned module '{m}' without a valid sample count ({c!r})")


def module_weights(updates: Sequence[SiteUpdate]) -> dict[str, dict[str, float]]:
    """{module: {site: count}} over the sites that returned that module with a positive count."""
    out: dict[str, dict[str, float]] = {}
    for u in updates:
        for m in {module_of(k) for k in u.params}:
            if u.counts[m] > 0:
                out.setdefault(m, {})[u.site] = float(u.counts[m])
    return out


def aggregate_modules(global_params: Params, updates: Sequence[SiteUpdate]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-module weighted average. Returns (new parameters, total count per updated module).

    Each parameter of module M becomes sum_s n_s,M * w_s / sum_s n_s,M over the sites s that returned M
    with n_s,M > 0; parameters of modules nobody returned are copied unchanged. Sites are summed in
    name order so that the result does not depend on the order replies arrived in.
    """
    for u in updates:
        check_update(global_params, u)
    weights = module_weights(updates)
    ordered = sorted(updates, key=lambda u: u.site)
    new: dict[str, np.ndarray] = {}
    for k, g in global_params.items():
        w = weights.get(module_of(k))
        if not w:
            new[k] = np.array(g, copy=True)
            continue
        total = sum(w.values())
        acc = np.zeros(np.shape(g), dtype=np.float64)
        for u in ordered:
            if u.site in w and k in u.params:
                acc += (w[u.site] / total) * np.asarray(u.params[k], dtype=np.float64)
        new[k] = acc.astype(np.asarray(g).dtype)
    return new, {m: sum(w.values()) for m, w in weights.items()}


# ---- optional server optimizer, per module ------------------------------------------------

SERVER_OPTIMIZERS = SETTING["server-optimizer"].choices  # declared with the setting (mmn_fed.settings)


@dataclass
class ServerOptimizer:
    """FedAvgM / FedAdam applied per parameter to the pseudo-gradient (average - global), only for
    modules updated this round. ``kind="none"`` returns the average (plain FedAvg with per-module weights).

    State (moments per parameter, step per module) is plain arrays so checkpoints can hold it.
    """

    kind: str = "none"  # none | fedavgm | fedadam
    lr: float = 1.0  # server learning rate (fedavgm); fedadam typically 1e-2
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer '{self.kind}' unknown; expected one of {', '.join(SERVER_OPTIMIZERS)}")

    def step(self, global_params: Params, averaged: Params, updated: Sequence[str]) -> dict[str, np.ndarray]:
        if self.kind == "none":
            return {k: np.array(v, copy=True) for k, v in averaged.items()}
        updated = set(updated)
        out: dict[str, np.ndarray] = {}
        for k, g in global_params.items():
            mod = module_of(k)
            if mod not in updated:
                out[k] = np.array(g, copy=True)
                continue
            g64 = np.asarray(g, dtype=np.float64)
            delta = np.asarray(averaged[k], dtype=np.float64) - g64
            if self.kind == "fedavgm":
                self.m[k] = self.momentum * self.m.get(k, np.zeros_like(g64)) + delta
                out[k] = (g64 + self.lr * self.m[k]).astype(np.asarray(g).dtype)
            else:  # fedadam (Reddi et al. 2021), as in Flower's FedAdam, per parameter
                self.m[k] = self.beta1 * self.m.get(k, np.zeros_like(g64)) + (1 - self.beta1) * delta
                self.v[k] = self.beta2 * self.v.get(k, np.zeros_like(g64)) + (1 - self.beta2) * delta * delta
                out[k] = (g64 + self.lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(np.asarray(g).dtype)
        for mod in updated:
            self.steps[mod] = self.steps.get(mod, 0) + 1
        return out

    def state(self) -> dict:
        return {"kind": self.kind, "m": dict(self.m), "v": dict(self.v), "steps": dict(self.steps)}

    def load_state(self, state: Mapping) -> None:
        self.m = {k: np.asarray(v) for k, v in state.get("m", {}).items()}
        self.v = {k: np.asarray(v) for k, v in state.get("v", {}).items()}
        self.steps = dict(state.get("steps", {}))


# ---- communication accounting -------------------------------------------------------------

def params_nbytes(params: Params) -> int:
    """Bytes of parameter payload (array data only, as FedAvg accounting usually reports)."""
    return int(sum(np.asarray(v).nbytes for v in params.values()))
