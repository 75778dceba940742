"""Time series in scenarios: sites, splits and missingness by subject, and missingness *in time*.

A time-series scenario (its schema has ``[timeseries]``, e.g. the built-in ``pbcseq``) keeps every subject's
visits together: a subject belongs to one site, and all its visits are training or test visits. Besides the
modality mechanisms (applied to each visit row), three mechanisms remove whole visits, decided per subject
(docs/simulations.md, "Time series"):

| mechanism      | what a subject loses                                                                 |
| -------------- | ------------------------------------------------------------------------------------ |
| ``fewer_visits`` | each visit after the first, with probability ``fraction`` (outcome-dependent observation frequency: e.g. healthier patients seen less often) |
| ``dropout``      | with probability ``fraction``, every visit after a uniformly drawn cut (the last visits: outcome-dependent dropout) |
| ``sampling``     | all but the first visit in each window of ``every`` time units since its first visit (a site that measures less often) |

``fewer_visits`` and ``dropout`` apply to the subjects whose outcome for ``task`` is ``label`` (every subject
without a task). A subject's outcome is its label on any of its rows: for an event task (``event_time``) that is
whether the event happens during follow-up, the "sicker patients" of the issue. The label-flipped test condition
applies them to the other subjects. The model's metrics are also computed per bin of time since the subject's
first observation (the paper's continuous-task figures), as records with ``time_from`` / ``time_to``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from edge_runtime.schema import Schema
from mmn_fed.data import derive_labels

from .missingness import TIME_MECHANISMS, MissingnessLog, MissingnessRule, apply_rules, condition, rule_rng

N_TIME_BINS = 5


def subject_codes(df: pd.DataFrame, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """(subject code per row, subject ids in order of first appearance)."""
    codes, uniques = pd.factorize(df[schema.timeseries.id], sort=False)
    if (codes < 0).any():
        rows = (np.flatnonzero(codes < 0)[:5] + 1).tolist()
        raise ValueError(f"data: {int((codes < 0).sum())} row(s) without a subject id "
                         f"('{schema.timeseries.id}'), e.g. data rows {rows}")
    return codes, np.asarray(uniques)


def _times(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    t = pd.to_numeric(df[schema.timeseries.time], errors="coerce").to_numpy(dtype=float)
    if np.isnan(t).any():
        rows = (np.flatnonzero(np.isnan(t))[:5] + 1).tolist()
        raise ValueError(f"data: column '{schema.timeseries.time}' is not a number in {int(np.isnan(t).sum())} "
                         f"row(s), e.g. data rows {rows}")
    return t


def visit_rank(codes: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Each row's position among its subject's visits by time (0 = the first visit)."""
    order = np.lexsort((np.arange(len(codes)), times, codes))
    rank = np.empty(len(codes), dtype=np.int64)
    start = np.r_[0, np.flatnonzero(np.diff(codes[order])) + 1]
    counts = np.diff(np.r_[start, len(order)])
    rank[order] = np.arange(len(order)) - np.repeat(start, counts)
    return rank


def subject_any(codes: np.ndarray, n_subjects: int, rows: np.ndarray) -> np.ndarray:
    """Per subject: does any of its rows satisfy ``rows``?"""
    return np.bincount(codes, weights=rows.astype(float), minlength=n_subjects) > 0


def subject_sites(df: pd.DataFrame, schema: Schema, plan) -> np.ndarray:
    """One site per row, decided per subject (a subject's visits stay at one hospital). ``by`` needs a column
    that is constant within every subject; iid and Dirichlet draw subjects, not rows."""
    from .sites import assign_sites

    codes, ids = subject_codes(df, schema)
    first = np.full(len(ids), -1)
    first[codes[::-1]] = np.arange(len(df))[::-1]  # each subject's first row
    per_subject = assign_sites(df.iloc[first].reset_index(drop=True), schema, plan)
    sites = np.asarray(per_subject, dtype=object)[codes]
    if plan.by:
        from .sites import by_column

        raw = by_column(df, plan.by)
        mixed = np.flatnonzero(raw != sites)
        if len(mixed):
            who = ids[codes[mixed[0]]]
            raise ValueError(f"sites.by: column '{plan.by}' changes within subject '{who}' (data row "
                             f"{mixed[0] + 1}): a subject's visits must stay at one site")
    return sites


def drop_visits(df: pd.DataFrame, schema: Schema, rules: tuple[MissingnessRule, ...], sites: np.ndarray, seed: int,
                phase: str, flip: bool = False, log: MissingnessLog | None = None) -> np.ndarray:
    """Which rows (visits) the time mechanisms keep. Conditions are evaluated on the original rows, draws are
    seeded per (seed, rule index, phase) as for the modality rules, so the order of rules does not matter."""
    codes, ids = subject_codes(df, schema)
    times = _times(df, schema)
    rank = visit_rank(codes, times)
    n_subj = len(ids)
    keep = np.ones(len(df), dtype=bool)
    labels = derive_labels(schema, df) if any(r.task is not None for r in rules) else None
    sites = np.asarray(sites).astype(str)
    for i, rule in enumerate(rules):
        if rule.mechanism not in TIME_MECHANISMS:
            continue
        eligible = np.ones(len(df), dtype=bool) if rule.sites is None else np.isin(sites, list(rule.sites))
        if rule.phase not in ("both", phase):
            eligible[:] = False
        flipped = flip and rule.outcome_dependent
        rng = rule_rng(seed, i, f"{phase}{'-flip' if flipped else ''}")
        if rule.mechanism == "sampling":
            first = np.full(n_subj, np.inf)
            np.minimum.at(first, codes, times)
            window = np.floor((times - first[codes]) / rule.every)
            order = np.lexsort((rank, window, codes))
            dup = np.zeros(len(df), dtype=bool)
            dup[order[1:]] = (codes[order[1:]] == codes[order[:-1]]) & (window[order[1:]] == window[order[:-1]])
            lose = eligible & dup
        else:
            if rule.task is not None:
                as_label = MissingnessRule(None, "mnar", rule.fraction, rule.task, rule.label)
                who = subject_any(codes, n_subj, eligible & condition(as_label, schema, df, flip=flipped, labels=labels))
            else:
                who = subject_any(codes, n_subj, eligible)
            if rule.mechanism == "fewer_visits":
                lose = who[codes] & (rank > 0) & (rng.random(len(df)) < rule.fraction)
            else:  # dropout: the visits after a uniformly drawn cut, for a drawn share of the subjects
                n_visits = np.bincount(codes, minlength=n_subj)
                drops = who & (rng.random(n_subj) < rule.fraction)
                kept = 1 + np.floor(rng.random(n_subj) * n_visits).astype(np.int64)  # 1 .. n visits kept
                lose = drops[codes] & (rank >= kept[codes])
            lose &= eligible
        keep &= ~lose
        if log is not None:
            log.eligible.append(int(eligible.sum()))
            log.removed.append(int(lose.sum()))
    return keep


def apply_time_rules(df: pd.DataFrame, schema: Schema, rules: tuple[MissingnessRule, ...], sites: np.ndarray,
                     seed: int, phase: str, flip: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """The modality rules on every visit row, then the visits the time mechanisms remove. Returns (rows, their
    sites)."""
    out = apply_rules(df, schema, rules, sites, seed, phase, flip_mnar=flip)
    keep = drop_visits(df, schema, rules, sites, seed, phase, flip)
    return out[keep].reset_index(drop=True), np.asarray(sites)[keep]


def split_subjects_by_site(df: pd.DataFrame, schema: Schema, sites: np.ndarray, fraction: float,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) with a seeded ``fraction`` of each site's subjects held out for testing,
    stratified by the subject's outcome for the first task (every visit of a subject on one side)."""
    from mmn_fed.training import split_indices

    codes, ids = subject_codes(df, schema)
    task = next(iter(schema.tasks))
    first = np.full(len(ids), -1)
    first[codes[::-1]] = np.arange(len(df))[::-1]
    strata = np.asarray(sites).astype(str)[first].astype(object)
    if schema.tasks[task].kind != "regression":  # the subject's label on its last row (its outcome)
        values, present = derive_labels(schema, df)[task]
        last = np.full(len(ids), -1)
        last[codes] = np.arange(len(df))
        strata = strata + "|" + np.where(present[last], values[last].astype(str), "missing").astype(object)
    _, test = split_indices(len(ids), fraction, seed, strata)
    is_test = np.isin(codes, test)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def time_edges(schema: Schema, df: pd.DataFrame, given: tuple[float, ...] = ()) -> list[float]:
    """Bin edges of the time since a subject's first observation: ``given``, or quintiles of the data's visits
    (the whole table, before any missingness, so every model, condition and seed shares them)."""
    if given:
        return list(given)
    codes, ids = subject_codes(df, schema)
    times = _times(df, schema)
    first = np.full(len(ids), np.inf)
    np.minimum.at(first, codes, times)
    elapsed = times - first[codes]
    edges = np.quantile(elapsed, np.linspace(0, 1, N_TIME_BINS + 1))
    edges = np.unique(np.round(edges) if edges[-1] > 10 * N_TIME_BINS else edges)  # readable edges
    edges[-1] = np.inf
    return edges.tolist()


def elapsed_since_first(seqs) -> np.ndarray:
    """Per step row of ``seqs`` (``mmn_fed.sequences.Sequences``): the step time minus the subject's first."""
    from mmn_fed.sequences import STEP_TIME

    t = seqs.steps[STEP_TIME].to_numpy(dtype=float)
    valid = seqs.index >= 0
    first = np.empty(len(t))
    first[seqs.index[valid]] = np.repeat(t[seqs.index[:, 0]], valid.sum(axis=1))
    return t - first


def evaluate_sequences(trained, schema: Schema, frame: pd.DataFrame, context: Mapping[str, Any],
                       edges: list[float]) -> list[dict[str, Any]]:
    """Records of a trained sequence model on a visit table: over all the steps (``state = final``,
    ``combination = all``, ``unit = step``), and per bin of time since the first observation (the same records
    with ``time_from`` / ``time_to``, None for the open last bin; bins with fewer than 10 labelled steps are left
    out)."""
    from mmn_fed.metrics import task_metrics
    from mmn_fed.sequences import build_sequences, data_records, encode_sequences, predict_steps

    prep = trained.preprocessor
    seqs = build_sequences(schema, frame)
    data = encode_sequences(prep, seqs, schema.timeseries.step_modalities)
    site = context.get("site", "all")
    records = [{**r, "site": site} for r in data_records(trained.model, prep, data, context)]
    preds = predict_steps(trained.model, data, prep.targets, prep.schema)
    elapsed = elapsed_since_first(seqs)
    for t, p in preds.items():
        kind = prep.schema.tasks[t].kind
        ok = data.rows.y_present[t].numpy()
        y = data.rows.y[t].numpy()
        if kind == "regression":
            y = y * prep.targets[t]["std"] + prep.targets[t]["mean"]
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = ok & (elapsed >= lo) & (elapsed < hi)
            if sel.sum() < 10:
                continue
            for metric, value in task_metrics(kind, y[sel], p[sel]).items():
                records.append({**context, "site": site, "task": t, "metric": metric, "value": float(value),
                                "n": int(sel.sum()), "state": "final", "combination": "all", "unit": "step",
                                "time_from": float(lo), "time_to": float(hi) if np.isfinite(hi) else None})
    return records


def availability(schema: Schema, frame: pd.DataFrame, sites: np.ndarray) -> pd.DataFrame:
    """Per site: steps, subjects, steps per subject and the share of steps holding each time-series modality
    (a modality counts as held at a step when any of its columns has a value)."""
    from mmn_fed.sequences import build_sequences

    out = {}
    sites = np.asarray(sites).astype(str)
    for s in sorted(set(sites)):
        part = frame[sites == s].reset_index(drop=True)
        seqs = build_sequences(schema, part)
        row = {"rows": len(seqs.steps), "subjects": len(seqs.ids),
               "steps per subject": round(len(seqs.steps) / max(len(seqs.ids), 1), 2)}
        for m in schema.timeseries.modalities:
            cols = list(schema.modalities[m])
            row[m] = float(seqs.steps[cols].notna().any(axis=1).mean()) if len(seqs.steps) else 0.0
        out[s] = row
    return pd.DataFrame.from_dict(out, orient="index")


COUNT_COLUMNS = ("rows", "subjects", "steps per subject")  # availability columns that are counts, not shares
