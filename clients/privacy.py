"""Optional differential privacy at the site: clip each module's update and add Gaussian noise before it
leaves the site, with a Renyi-DP accountant that reports the budget spent.

What is protected: a site's whole contribution. Each round the site releases, for each of its M modules,
``clip(w_new - w_global, C) + N(0, (sigma * C)^2 I)``. Neighbouring datasets are "this site contributes" vs
"it contributes nothing" (add/remove one site), so each module is a Gaussian mechanism of sensitivity C, the
M modules together one of L2 sensitivity sqrt(M) C with noise sigma C, i.e. noise multiplier sigma/sqrt(M).
Every site takes part in every round (no sampling amplification), so T rounds compose to
``RDP(alpha) = T * M * alpha / (2 sigma^2)`` (Mironov 2017); epsilon at delta uses the conversion of
Balle et al. 2020 (tighter than Mironov's ``rdp + log(1/delta)/(alpha-1)``, both are valid bounds).
This is local DP: no trust in the server needed. Under secure aggregation the server sees only the sum,
whose noise is sqrt(n_sites) larger; that stronger central guarantee is not claimed here.

Hook for the ClientApp's train handler (after local training, before masking or replying):
``params, report = privatize_update(new_params, received_params, dp, rng)``; keep a ``GaussianAccountant``
in the site's state and call ``step()`` once per round; report ``epsilon(delta)`` in the metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from mmn_fed import protocol as P
from mmn_fed.modules import group_by_module
from mmn_fed.settings import SiteSettings

DEFAULT_ORDERS = tuple([1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0,
                        48.0, 64.0, 96.0, 128.0, 256.0, 512.0, 1024.0])


@dataclass(frozen=True)
class DPConfig:
    """``clip``: L2 bound C on each module's update; ``noise_multiplier``: sigma (noise std = sigma * C)."""

    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.clip > 0 or not self.noise_multiplier >= 0 or not 0 < self.delta < 1:
            raise ValueError(f"DP config needs clip > 0, noise_multiplier >= 0, 0 < delta < 1; got {self}")


def clip_module_updates(new: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                        clip: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per module, scale ``new - reference`` to L2 norm at most ``clip``. Returns (clipped deltas as
    float64, {module: norm before clipping})."""
    deltas = {k: np.asarray(v, np.float64) - np.asarray(reference[k], np.float64) for k, v in new.items()}
    norms = {}
    for m, params in group_by_module(deltas).items():
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in params.values()))
        norms[m] = norm
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for k in params:
            deltas[k] = deltas[k] * scale
    return deltas, norms


def privatize_update(new: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], config: DPConfig,
                     rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Clipped, noised parameters to send (same names and dtypes as ``new``) and the pre-clip norms.
    ``rng`` must be unpredictable to the server (e.g. ``np.random.default_rng()`` seeded by the OS)."""
    deltas, norms = clip_module_updates(new, reference, config.clip)
    std = config.noise_multiplier * config.clip
    out = {}
    for k, d in deltas.items():
        noisy = np.asarray(reference[k], np.float64) + d + rng.normal(0.0, std, size=d.shape)
        out[k] = noisy.astype(np.asarray(new[k]).dtype)
    return out, norms


def gaussian_rdp(noise_multiplier: float, orders=DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one Gaussian mechanism with sensitivity 1 and std ``noise_multiplier``: alpha / (2 sigma^2)."""
    a = np.asarray(orders, dtype=np.float64)
    return a / (2.0 * noise_multiplier**2) if noise_multiplier > 0 else np.full_like(a, np.inf)


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders=DEFAULT_ORDERS) -> tuple[float, float]:
    """(epsilon, best order) from RDP values at ``orders``: Balle et al. 2020, Theorem 21."""
    a = np.asarray(orders, dtype=np.float64)
    eps = rdp + np.log1p(-1.0 / a) - (np.log(delta) + np.log(a)) / (a - 1.0)
    i = int(np.nanargmin(eps))
    return float(max(eps[i], 0.0)), float(a[i])


@dataclass
class GaussianAccountant:
    """Composition over rounds of the per-module Gaussian mechanism of ``privatize_update``.

    ``modules``: how many modules the site releases per round (each with sensitivity ``clip``)."""

    noise_multiplier: float
    modules: int = 1
    rounds: int = 0

    def step(self, rounds: int = 1) -> None:
        self.rounds += rounds

    def rdp(self, orders=DEFAULT_ORDERS) -> np.ndarray:
        return self.rounds * self.modules * gaussian_rdp(self.noise_multiplier, orders)

    def epsilon(self, delta: float, orders=DEFAULT_ORDERS) -> float:
        if self.rounds == 0:
            return 0.0
        return rdp_to_epsilon(self.rdp(orders), delta, orders)[0]


def noise_for_budget(epsilon: float, delta: float, rounds: int, modules: int = 1) -> float:
    """Smallest noise multiplier (to 1%) whose accountant stays within ``epsilon`` after ``rounds``."""
    lo, hi = 1e-3, 1e4
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        if GaussianAccountant(mid, modules, rounds).epsilon(delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# ---- Flower glue: a train mod -----------------------------------------------------------------------

DP_STATE = "dp"


def privacy_mod(msg, context, call_next):
    """Train mod: if the message's settings record sets ``dp-noise-multiplier`` > 0 (with ``dp-clip``, ``dp-delta``),
    the reply's "arrays" are clipped and noised per module against the received arrays, the RDP spent so far
    is kept in ``context.state`` and the reply's metrics gain ``dp_epsilon`` (at ``dp-delta``) and
    ``dp_clipped_fraction``. Put it inside ``secagg_mod``: ``@app.train(mods=[secagg_mod, privacy_mod])``."""
    from flwr.app import ConfigRecord, MetricRecord

    from mmn_fed import records as R

    settings = SiteSettings.from_config(msg.content[P.CONFIG]) if P.CONFIG in msg.content else SiteSettings()
    sigma = settings.dp_noise_multiplier
    if sigma <= 0:
        return call_next(msg, context)
    dp = DPConfig(clip=settings.dp_clip, noise_multiplier=sigma, delta=settings.dp_delta)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    received = R.from_arrayrecord(msg.content[P.ARRAYS])
    new = R.from_arrayrecord(reply.content[P.ARRAYS])
    noisy, norms = privatize_update(new, received, dp, np.random.default_rng())  # OS entropy: not reproducible
    spent = np.asarray(context.state[DP_STATE]["rdp"], dtype=np.float64) if DP_STATE in context.state \
        else np.zeros(len(DEFAULT_ORDERS))
    spent = spent + len(norms) * gaussian_rdp(sigma)
    context.state[DP_STATE] = ConfigRecord({"rdp": [float(x) for x in spent]})
    reply.content[P.ARRAYS] = R.to_arrayrecord(noisy)
    metrics = dict(reply.content[P.METRICS]) if P.METRICS in reply.content else {}
    metrics["dp_epsilon"] = rdp_to_epsilon(spent, dp.delta)[0]
    metrics["dp_clipped_fraction"] = float(np.mean([n > dp.clip for n in norms.values()]))
    reply.content[P.METRICS] = MetricRecord(metrics)
    return reply
