"""Presence-balanced modality dropout: the MNAR correction.

When a modality's presence depends on a label (the audit, :mod:`mmn_fed.audit`, says where), a model learns
"present, so probably negative" and fails where presence differs. During training we hide the modality in
some of the rows that hold it, so that among the rows of every label the same share holds it: presence
becomes independent of the label and carries nothing the model could learn, while every value seen is real.

For a modality ``m`` corrected against task ``t``, with ``r_c`` the (smoothed) share of rows of label ``c``
that hold ``m``, a row of label ``c`` keeps ``m`` with probability ``min_c r_c / r_c``; unlabelled rows keep
it with ``min_c r_c / r`` (``r`` the overall share). The keep probabilities are computed once per site from
its own rows (no communication); a new subset is hidden at every epoch (training) and one fixed subset for
validation, so model selection sees balanced presence too. It works for any encoder order (presence, not
the order of encoders, is what is balanced) and for both MultiModN and P-Fusion.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from edge_runtime.schema import Schema

from .data import TensorData

if TYPE_CHECKING:
    from .audit import AuditResult

MODES = ("auto", "correct", "off")
SMOOTHING = 5.0  # pseudo-rows pulling each label's presence share toward the site's overall share


def keep_probabilities(data: TensorData, targets: Mapping[str, str],
                       smoothing: float = SMOOTHING) -> dict[str, torch.Tensor]:
    """Per corrected modality (``targets``: modality -> task), each row's probability of keeping it."""
    out = {}
    for m, t in targets.items():
        if m not in data.present or t not in data.y:
            continue
        pres = data.present[m].numpy().astype(bool)
        lab = data.y_present[t].numpy().astype(bool)
        y = data.y[t].numpy()
        keep = np.ones(len(pres), dtype=np.float32)
        if not lab.any() or not pres.any():
            out[m] = torch.from_numpy(keep)
            continue
        overall = float(pres.mean())
        base = float(pres[lab].mean())
        rates = {}
        for c in np.unique(y[lab]):
            rows = lab & (y == c)
            rates[c] = (pres[rows].sum() + smoothing * base) / (rows.sum() + smoothing)
        target = min(rates.values())
        for c, r in rates.items():
            keep[lab & (y == c)] = target / r if r > 0 else 1.0
        keep[~lab] = min(1.0, target / overall) if overall > 0 else 1.0
        out[m] = torch.from_numpy(keep)
    return out


def thin(data: TensorData, keep: Mapping[str, torch.Tensor], generator: torch.Generator) -> TensorData:
    """The same rows with each corrected modality hidden where a uniform draw exceeds its keep probability."""
    if not keep:
        return data  # no correction: no draw either, so uncorrected runs are bit-identical to before
    present = dict(data.present)
    for m, k in keep.items():
        present[m] = present[m] & (torch.rand(len(k), generator=generator) < k)
    return TensorData(data.x, present, data.y, data.y_present)


def retained(data: TensorData, keep: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Expected share of each corrected modality's present rows that training still sees (for the log)."""
    out = {}
    for m, k in keep.items():
        p = data.present[m]
        out[m] = float(k[p].mean()) if bool(p.any()) else 1.0
    return out


def resolve(mode: str, result: "AuditResult | None", schema: Schema) -> dict[str, str]:
    """The modalities to balance, and against which task, for ``missingness = mode``:

    - ``off``: none;
    - ``auto``: the modalities whose presence the audit found label-dependent (:meth:`AuditResult.flagged`);
    - ``correct``: every modality, each against the classification task its presence differs most by (the
      first classification task when the audit has no figure for it).
    """
    if mode not in MODES:
        raise ValueError(f"missingness '{mode}' unknown; expected one of {', '.join(MODES)}")
    if mode == "off":
        return {}
    if mode == "auto":
        return dict(result.flagged()) if result is not None else {}
    tasks = [t for t, task in schema.tasks.items() if task.kind != "regression"]
    if not tasks:
        return {}
    best: dict[str, tuple[float, str]] = {}
    for f in (result.findings if result is not None else []):
        if f.kind == "modality" and not f.suppressed and f.rate_difference == f.rate_difference:
            if f.name not in best or f.rate_difference > best[f.name][0]:
                best[f.name] = (f.rate_difference, f.task)
    return {m: best.get(m, (0.0, tasks[0]))[1] for m in schema.modalities}


def describe(mode: str, targets: Mapping[str, str]) -> str:
    """One line for logs and reports: what the missingness setting did."""
    if not targets:
        return f"missingness = {mode}: no modality corrected" + (
            " (the audit found no label-dependent presence)" if mode == "auto" else "")
    pairs = ", ".join(f"{m} (against {t})" for m, t in targets.items())
    return f"missingness = {mode}: presence balanced against the label for {pairs}"
