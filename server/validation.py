"""Update validation (always on): every site's reply is checked before it can touch the global model.

A reply is rejected, with reasons naming the site, the parameter or module and what was expected, when it
- names a parameter the global model does not have, or one of a module the site was not sent / does not hold;
- leaves a module it returned incomplete;
- has a wrong shape or dtype, or non-finite values;
- gives a returned module no valid count, or a count above what the site reported having (weight inflation);
- moves the model far more than the round's other sites do (the norm check, two levels; the update norm of a
  module is ``||w_site - w_global||``, its *ratio* that norm over the round's median norm for the module):
  * the whole update: over the modules that at least ``min_sites_for_norm`` sites returned, the site's combined
    norm ``sqrt(sum_m norm_m^2)`` over ``sqrt(sum_m median_m^2)`` is above ``min_ratio`` (2.5) *and* its robust
    z-score among the sites, ``0.6745 * (log ratio - median) / MAD``, is above ``z_max`` (3.5). A boosted update
    (``simulations.attacks``: ``global + k * (honest - global)``) scales every module by ``|k|``; large modules
    dominate the combined norm and their honest norms concentrate (at most 1.46x on heart, support2 and
    pbcseq, 5 seeds each, every round: 2.5 leaves a 1.7x margin), while x5 and x10 boosts land above it;
  * one module alone: its ratio above ``module_ratio`` (5.0) *and* its robust z (log norms, among the sites
    returning it) above ``z_max``, for an attack that boosts one module only. Not ``min_ratio``: a small
    module (``init_state``: a state-size vector) has a noisy norm whose relative spread over sites is large
    (honest ``init_state`` ratios reach 2.4 on pbcseq with 4 sites, 3.2 with 3, and 3.0 on an unseen ICU
    cohort, robust z 7.4 since 4 sites give a MAD at its floor), which the former 3x per-module cut rejected.
  Both are one-sided (a small step is harmless; a boosted one is how a scaled update shows) and on the log
  scale because honest sites differ by factors. Measured false-rejection and detection rates:
  ``python benchmarks/bench_robustness.py --calibration`` (docs/security.md).
The round goes on with the accepted sites; rejections are logged and returned.

Under secure aggregation the server never sees values: only the structural checks (names, modules, masked
vector shapes) apply there (``server.secagg.SecAggServer.collect_masked``); bound values with client-side
clipping (``clients.privacy``) instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mmn_fed.modules import group_by_module, module_of

from .aggregation import RejectedUpdate, SiteUpdate

logger = logging.getLogger(__name__)

Params = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class ValidationPolicy:
    """``z_max``: robust z-score (log norms) above which an update is an outlier (3.5 is the usual
    Iglewicz-Hoaglin cut), and only if its norm ratio to the round's median is also above ``min_ratio`` (whole
    update, combined over the modules shared by enough sites) or ``module_ratio`` (one module); a module needs
    ``min_sites_for_norm`` sites returning it to mean anything. ``mad_floor`` (log units) keeps near-identical
    benign sites from turning small differences into huge z-scores (with 4 sites the MAD is usually at it: the
    ratio cuts then decide)."""

    z_max: float = 3.5
    min_ratio: float = 2.5
    module_ratio: float = 5.0
    min_sites_for_norm: int = 3
    mad_floor: float = 0.1
    check_dtype: bool = True


@dataclass
class ValidationReport:
    accepted: list[SiteUpdate]
    rejected: dict[str, list[str]] = field(default_factory=dict)  # site -> reasons
    norms: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> {site: update norm}
    zscores: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> {site: robust z}
    site_ratios: dict[str, float] = field(default_factory=dict)  # site -> whole-update norm / round's median
    site_zscores: dict[str, float] = field(default_factory=dict)  # site -> robust z of its log ratio

    @property
    def accepted_sites(self) -> list[str]:
        return [u.site for u in self.accepted]


def structural_problems(global_params: Params, update: SiteUpdate, sent: Sequence[str] | None = None,
                        max_counts: Mapping[str, float] | None = None, check_dtype: bool = True) -> list[str]:
    """Reasons why one update cannot be used, whatever the other sites sent (empty list: fine)."""
    site, reasons = update.site, []
    allowed = None if sent is None else set(sent)
    expected_modules = group_by_module(global_params)
    returned: dict[str, set[str]] = {}
    for k, v in update.params.items():
        if k not in global_params:
            reasons.append(f"site '{site}' returned unknown parameter '{k}'")
            continue
        m = module_of(k)
        if allowed is not None and m not in allowed:
            reasons.append(f"site '{site}' returned module '{m}', which it was not sent (sent: {sorted(allowed)})")
            continue
        returned.setdefault(m, set()).add(k)
        g = np.asarray(global_params[k])
        a = np.asarray(v)
        if a.shape != g.shape:
            reasons.append(f"site '{site}': parameter '{k}' has shape {a.shape}, expected {g.shape}")
            continue
        if check_dtype and a.dtype != g.dtype:
            reasons.append(f"site '{site}': parameter '{k}' has dtype {a.dtype}, expected {g.dtype}")
            continue
        if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)):
            reasons.append(f"site '{site}': parameter '{k}' has non-finite or non-numeric values")
    for m, keys in returned.items():
        missing = set(expected_modules[m]) - keys
        if missing:
            reasons.append(f"site '{site}': module '{m}' is incomplete, missing {sorted(missing)}")
        c = update.counts.get(m)
        if c is None or not isinstance(c, (int, float, np.number)) or not np.isfinite(c) or c < 0:
            reasons.append(f"site '{site}' returned module '{m}' without a valid sample count ({c!r})")
        elif max_counts is not None and max_counts.get(m, 0) <= 0:
            reasons.append(f"site '{site}' returned module '{m}', which it does not hold (its profile has no "
                           "samples for it)")
        elif max_counts is not None and c > max_counts.get(m, 0):
            reasons.append(f"site '{site}': count {c} for module '{m}' exceeds the {max_counts.get(m, 0)} "
                           "samples it reported holding")
    return reasons


def update_norms(global_params: Params, update: SiteUpdate) -> dict[str, float]:
    """{module: L2 norm of (site's parameters - global parameters)} over the modules the site returned."""
    sq: dict[str, float] = {}
    for k, v in update.params.items():
        d = np.asarray(v, dtype=np.float64) - np.asarray(global_params[k], dtype=np.float64)
        sq[module_of(k)] = sq.get(module_of(k), 0.0) + float(np.sum(d * d))
    return {m: float(np.sqrt(s)) for m, s in sq.items()}


def robust_z(values: Mapping[str, float], mad_floor: float = 0.1) -> dict[str, float]:
    """0.6745 * (x - median) / MAD per key, the MAD floored at ``mad_floor``."""
    x = np.array(list(values.values()), dtype=np.float64)
    med = float(np.median(x))
    mad = max(float(np.median(np.abs(x - med))), mad_floor)
    return {k: 0.6745 * (v - med) / mad for k, v in values.items()}


def validate_updates(global_params: Params, updates: Sequence[SiteUpdate],
                     sent: Mapping[str, Sequence[str]] | None = None,
                     max_counts: Mapping[str, Mapping[str, float]] | None = None,
                     policy: ValidationPolicy = ValidationPolicy()) -> ValidationReport:
    """Check every update; returns the accepted ones and, per rejected site, why.

    ``sent[site]``: modules the server sent that site this round (None: any module of the model).
    ``max_counts[site][module]``: the counts the site reported in its profile (None: not checked).
    A site with any problem is rejected as a whole: a site that sends garbage in one module is not
    trusted with the others. The norm check runs on the structurally sound updates only."""
    report = ValidationReport(accepted=[])
    sound: list[SiteUpdate] = []
    for u in updates:
        reasons = structural_problems(global_params, u, None if sent is None else sent.get(u.site, ()),
                                      None if max_counts is None else max_counts.get(u.site, {}),
                                      policy.check_dtype)
        if reasons:
            report.rejected[u.site] = reasons
        else:
            sound.append(u)
    norms = {u.site: update_norms(global_params, u) for u in sound}
    for u in sound:
        for m, n in norms[u.site].items():
            if u.counts.get(m, 0) > 0:
                report.norms.setdefault(m, {})[u.site] = n
    outliers: dict[str, list[str]] = {}
    medians: dict[str, float] = {}
    for m, per_site in report.norms.items():
        if len(per_site) < policy.min_sites_for_norm:
            continue
        z = robust_z({s: float(np.log(max(n, 1e-30))) for s, n in per_site.items()}, policy.mad_floor)
        report.zscores[m] = z
        med = medians[m] = float(np.median(list(per_site.values())))
        for s, zs in z.items():
            if zs > policy.z_max and per_site[s] > policy.module_ratio * med:
                outliers.setdefault(s, []).append(
                    f"site '{s}': update norm {per_site[s]:.4g} of module '{m}' is far above the round's "
                    f"median {med:.4g} (x{per_site[s] / max(med, 1e-30):.1f} > x{policy.module_ratio:g}, robust z "
                    f"of log norms {zs:.1f} > {policy.z_max})")
    ratios = {}
    for s in {s for per_site in report.norms.values() for s in per_site}:
        shared = [m for m in medians if s in report.norms[m]]
        if shared:
            own = np.sqrt(sum(report.norms[m][s] ** 2 for m in shared))
            ref = np.sqrt(sum(medians[m] ** 2 for m in shared))
            ratios[s] = float(own / max(ref, 1e-30))
    report.site_ratios = ratios
    if len(ratios) >= policy.min_sites_for_norm:
        report.site_zscores = robust_z({s: float(np.log(max(r, 1e-30))) for s, r in ratios.items()}, policy.mad_floor)
        for s, zs in report.site_zscores.items():
            if zs > policy.z_max and ratios[s] > policy.min_ratio:
                outliers.setdefault(s, []).insert(0,
                    f"site '{s}': its whole update is far above the round's others (norm over the shared modules "
                    f"x{ratios[s]:.1f} the round's medians > x{policy.min_ratio:g}, robust z of log ratios "
                    f"{zs:.1f} > {policy.z_max})")
    for u in sound:
        if u.site in outliers:
            report.rejected[u.site] = outliers[u.site]
        else:
            report.accepted.append(u)
    for site, reasons in report.rejected.items():
        logger.warning("rejected the update of site '%s': %s", site, "; ".join(reasons))
    return report


def raise_if_rejected(report: ValidationReport) -> None:
    """For callers that prefer an exception: RejectedUpdate listing every rejected site and why."""
    if report.rejected:
        raise RejectedUpdate("; ".join(r for rs in report.rejected.values() for r in rs))
