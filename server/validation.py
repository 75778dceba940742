"""Update validation (always on): every site's reply is checked before it can touch the global model.

A reply is rejected, with reasons naming the site, the parameter or module and what was expected, when it
- names a parameter the global model does not have, or one of a module the site was not sent / does not hold;
- leaves a module it returned incomplete;
- has a wrong shape or dtype, or non-finite values;
- gives a returned module no valid count, or a count above what the site reported having (weight inflation);
- moves a module far more than the round's other sites do: per module, the update norm
  ``||w_site - w_global||`` is more than ``min_ratio`` times the round's median norm *and* its robust z-score
  on the log scale, ``0.6745 * (log norm - median) / MAD``, is above ``z_max``. One-sided (a small step is
  harmless; a boosted one is how a scaled update shows); on the log scale because honest sites differ by
  factors (on heart's 4 hospitals honest norms stay within 1.4x of the median; a x10 attack is 10x).
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
    """``z_max``: robust z-score (log norms) above which a module's update is an outlier (3.5 is the usual
    Iglewicz-Hoaglin cut), and only if its norm is also ``min_ratio`` times the median; it needs
    ``min_sites_for_norm`` sites returning the module to mean anything. ``mad_floor`` (log units) keeps
    near-identical benign sites from turning small differences into huge z-scores."""

    z_max: float = 3.5
    min_ratio: float = 3.0
    min_sites_for_norm: int = 3
    mad_floor: float = 0.1
    check_dtype: bool = True


@dataclass
class ValidationReport:
    accepted: list[SiteUpdate]
    rejected: dict[str, list[str]] = field(default_factory=dict)  # site -> reasons
    norms: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> {site: update norm}
    zscores: dict[str, dict[str, float]] = field(default_factory=dict)  # module -> {site: robust z}

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
    for m, per_site in report.norms.items():
        if len(per_site) < policy.min_sites_for_norm:
            continue
        z = robust_z({s: float(np.log(max(n, 1e-30))) for s, n in per_site.items()}, policy.mad_floor)
        report.zscores[m] = z
        med = float(np.median(list(per_site.values())))
        for s, zs in z.items():
            if zs > policy.z_max and per_site[s] > policy.min_ratio * med:
                outliers.setdefault(s, []).append(
                    f"site '{s}': update norm {per_site[s]:.4g} of module '{m}' is far above the round's "
                    f"median {med:.4g} (x{per_site[s] / max(med, 1e-30):.1f}, robust z of log norms {zs:.1f} > {policy.z_max})")
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
