"""Robust per-module aggregation for federations that may hold a malicious site (optional).

Same inputs and outputs as ``server.aggregation.aggregate_modules``: each module on its own, over the
sites that returned it with a positive count; modules nobody returned are carried forward.
- ``trimmed_mean_modules``: per coordinate, drop the ``k = ceil(trim * n)`` largest and ``k`` smallest
  values among the n holders (``k`` capped so that at least one value is kept), then average the rest
  weighted by the holders' counts (Yin et al., ICML 2018, with sample weights).
- ``median_modules``: coordinate-wise median over the holders (unweighted: a weight is what an attacker
  would inflate).
With fewer than 3 holders of a module no value can be outvoted; those modules fall back to the weighted
mean (the validation norm check is the only defence there).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from mmn_fed.modules import module_of

from .aggregation import SiteUpdate, check_update, module_weights

Params = Mapping[str, np.ndarray]


def _stack(global_params: Params, updates: Sequence[SiteUpdate]):
    """Yield (param, holders' values stacked on axis 0, their weights) for each parameter of an updated module."""
    weights = module_weights(updates)
    by_site = {u.site: u for u in updates}
    for k, g in global_params.items():
        w = weights.get(module_of(k))
        if not w:
            continue
        sites = sorted(s for s in w if k in by_site[s].params)
        vals = np.stack([np.asarray(by_site[s].params[k], dtype=np.float64) for s in sites])
        yield k, vals, np.array([w[s] for s in sites], dtype=np.float64)


def _finish(global_params: Params, updates: Sequence[SiteUpdate], combined: Mapping[str, np.ndarray]):
    new = {k: (np.asarray(combined[k]).astype(np.asarray(g).dtype) if k in combined else np.array(g, copy=True))
           for k, g in global_params.items()}
    return new, {m: sum(w.values()) for m, w in module_weights(updates).items()}


def trimmed_mean(values: np.ndarray, weights: np.ndarray, trim: float = 0.25) -> np.ndarray:
    """Coordinate-wise trimmed, weighted mean over axis 0 of ``values`` (n sites x ...)."""
    n = values.shape[0]
    k = min(math.ceil(trim * n), (n - 1) // 2) if n >= 3 else 0
    w = np.broadcast_to(weights.reshape((n,) + (1,) * (values.ndim - 1)), values.shape)
    if k == 0:
        return np.sum(values * w, axis=0) / np.sum(w, axis=0)
    order = np.argsort(values, axis=0, kind="stable")
    keep = order[k:n - k]
    v = np.take_along_axis(values, keep, axis=0)
    ww = np.take_along_axis(w, keep, axis=0)
    return np.sum(v * ww, axis=0) / np.sum(ww, axis=0)


def trimmed_mean_modules(global_params: Params, updates: Sequence[SiteUpdate], trim: float = 0.25):
    """Per-module trimmed mean. Returns (new parameters, total count per updated module)."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    for u in updates:
        check_update(global_params, u)
    return _finish(global_params, updates, {k: trimmed_mean(v, w, trim) for k, v, w in _stack(global_params, updates)})


def median_modules(global_params: Params, updates: Sequence[SiteUpdate]):
    """Per-module coordinate-wise median (weighted mean for modules with fewer than 3 holders)."""
    for u in updates:
        check_update(global_params, u)
    out = {}
    for k, v, w in _stack(global_params, updates):
        out[k] = np.median(v, axis=0) if v.shape[0] >= 3 else trimmed_mean(v, w, 0.0)
    return _finish(global_params, updates, out)
