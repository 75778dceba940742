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

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from edge_runtime.schema import Schema

from .data import TensorData

if TYPE_CHECKING:
    from .audit import AuditResult

SequenceData = Any  # mmn_fed.sequences.SequenceData (not imported: sequences imports this module's users)

MODES = ("auto", "correct", "off")
# In a correction map (modality -> task), this key asks a time series' sites to balance the *visit rate* against
# the task (``visit_keep_probabilities``): the time-series analogue of balancing a modality's presence.
VISITS = "__visits__"
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


def resolve_sequences(mode: str, result: "AuditResult | None", schema: Schema) -> dict[str, str]:
    """A time series' correction for ``missingness = mode`` (``schema``: the step table's): the modalities
    ``resolve`` picks from the audit of the steps, and, unless ``off``, the visit rate against the first binary
    task (``VISITS``). Each site then tests its own visit rates (``visit_keep_probabilities``) and balances them
    where they depend on the outcome: the counts behind that test never leave the site."""
    out = resolve(mode, result, schema)
    binary = [t for t, task in schema.tasks.items() if task.kind == "binary"]
    if mode != "off" and binary:
        out[VISITS] = binary[0]
    return out


def describe(mode: str, targets: Mapping[str, str]) -> str:
    """One line for logs and reports: what the missingness setting did."""
    if not targets:
        return f"missingness = {mode}: no modality corrected" + (
            " (the audit found no label-dependent presence)" if mode == "auto" else "")
    pairs = ", ".join(f"{'the visit rate' if m == VISITS else m} (against {t})" for m, t in targets.items())
    return f"missingness = {mode}: presence balanced against the label for {pairs}"


# ---- time series: presence per step, and the visit rate -------------------------------------------------

def subject_outcomes(data: SequenceData, task: str) -> np.ndarray:
    """Each subject's outcome for a binary task: 1 if any of its labelled steps is positive, 0 if it has
    labelled steps and none is, -1 without any labelled step."""
    y = data.rows.y[task].numpy()
    lab = data.rows.y_present[task].numpy().astype(bool)
    idx = data.index.numpy()
    valid = idx >= 0
    rows = np.where(valid, idx, 0)
    labelled = (lab[rows] & valid).any(axis=1)
    positive = ((y[rows] > 0.5) & lab[rows] & valid).any(axis=1)
    return np.where(labelled, positive.astype(int), -1)


VISIT_ALPHA = 0.05  # the visit rate is balanced when the site's test of its dependence on the outcome has p < this


def visit_rate_p_value(extra: np.ndarray, span: np.ndarray, outcome: np.ndarray) -> float:
    """Do the two outcome groups' visit rates differ? The exact conditional test of two Poisson rates: given
    all the visits after the first, group 1's count is Binomial(total, its share of the follow-up time) under
    equal rates. 1.0 when it cannot be tested (a group without follow-up time)."""
    from scipy.stats import binomtest

    n = [int(extra[outcome == c].sum()) for c in (0, 1)]
    d = [float(span[outcome == c].sum()) for c in (0, 1)]
    if min(d) <= 0 or sum(n) == 0:
        return 1.0
    return float(binomtest(n[1], n[0] + n[1], d[1] / (d[0] + d[1])).pvalue)


def visit_keep_probabilities(data: SequenceData, task: str, smoothing: float = SMOOTHING,
                             alpha: float | None = VISIT_ALPHA) -> torch.Tensor:
    """Per step row, the probability of keeping the step (a visit) so that the visit rate does not depend on
    the subject's outcome (``subject_outcomes``). A group's rate is its visits after the first per unit of
    follow-up time (smoothed toward the site's overall rate by ``smoothing`` subjects); the non-first steps of a
    group are kept with probability (lowest rate) / (its rate). First steps are always kept, so a subject never
    disappears; steps of subjects without an outcome are kept. Every step is kept when the site's own test does
    not find the rates different (``visit_rate_p_value`` >= ``alpha``; None: always balance), for a task that is
    not binary, or without times."""
    idx = data.index.numpy()
    keep = np.ones(len(data.rows), dtype=np.float32)
    if data.times is None or task not in data.rows.y or data.rows.y[task].dim() != 1:
        return torch.from_numpy(keep)
    outcome = subject_outcomes(data, task)
    valid = idx >= 0
    t = data.times[np.where(valid, idx, 0)]
    last = np.where(valid, t, -np.inf).max(axis=1)
    extra = valid.sum(axis=1) - 1  # visits after the first
    span = np.maximum(last - t[:, 0], 0.0)  # follow-up time
    known = outcome >= 0
    if not known.any() or span[known].sum() <= 0:
        return torch.from_numpy(keep)
    if alpha is not None and visit_rate_p_value(extra[known], span[known], outcome[known]) >= alpha:
        return torch.from_numpy(keep)  # no evidence that the visit rate depends on the outcome: nothing hidden
    mean_extra, mean_span = extra[known].mean(), span[known].mean()
    rates = {c: (extra[outcome == c].sum() + smoothing * mean_extra) / (span[outcome == c].sum() + smoothing * mean_span)
             for c in np.unique(outcome[known])}
    target = min(rates.values())
    later = valid.copy()
    later[:, 0] = False
    for c, r in rates.items():
        rows = idx[later & (outcome == c)[:, None]]
        keep[rows] = target / r if r > 0 else 1.0
    return torch.from_numpy(keep)


def sequence_keep(data: SequenceData, correct: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A time series' correction: the keep probabilities of the modalities balanced per step (as for rows), and
    of the steps when the visit rate is balanced (``correct[VISITS]``; None when no step would be hidden)."""
    modalities = {m: t for m, t in correct.items() if m != VISITS}
    steps = visit_keep_probabilities(data, correct[VISITS]) if VISITS in correct else None
    if steps is not None and bool((steps >= 1).all()):
        steps = None  # nothing to hide: no draw either, so the run is the uncorrected one
    return keep_probabilities(data.rows, modalities), steps


def thin_sequences(data: SequenceData, keep: Mapping[str, torch.Tensor], step_keep: torch.Tensor | None,
                   generator: torch.Generator) -> SequenceData:
    """The same sequences with the corrected modalities hidden at some steps (``thin``), and whole steps hidden
    where a draw exceeds ``step_keep``: a hidden step updates nothing and has no loss cell, as if the visit had
    not happened."""
    if not keep and step_keep is None:
        return data
    rows = thin(data.rows, keep, generator)
    if step_keep is not None:
        hide = torch.rand(len(step_keep), generator=generator) >= step_keep
        present = {m: (p & ~hide) if m in data.dynamic else p for m, p in rows.present.items()}
        rows = TensorData(rows.x, present, rows.y, {t: p & ~hide for t, p in rows.y_present.items()})
    return dataclasses.replace(data, rows=rows)
