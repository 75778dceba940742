"""Missingness audit: does a modality's presence depend on a task's label?

Label-dependent presence (missing not at random with respect to the label) is what breaks a model when
it is deployed where missingness differs: the model learns "this modality is present, so the label is
probably ..." and carries that into a clinic whose presence pattern is different.

The audit works on mergeable counts, so a federation computes it without moving rows:

1. each site counts, per modality (and per column inside it) x classification task x label, the labelled
   rows and how many of them hold the modality (:func:`presence_counts`). Counts between 1 and
   ``min_cell - 1`` never leave the site (small-cell suppression; zeros do, as in common disclosure rules):
   a table with such a cell is sent as ``suppressed``, with only the site's own test of it (its p-value and
   whether the presence rates differ by at least ``min_effect``), so a small site still takes part.
2. the server tests, per site (pooled counts are confounded by site prevalence), presence against the label
   with Pearson's chi-squared test (Fisher's exact test for 2 x 2 tables with an expected count below 5),
   controls the false discovery rate over all modality x task x site tests (Benjamini-Hochberg), and
   reports effect sizes: the presence rate per label, the largest difference between two labels' rates
   and Cramer's V (:func:`audit`).

A (modality, task) pair is *flagged* when some site's test is significant at ``alpha`` after the FDR
control and its presence rates differ by at least ``min_effect``. Training with ``missingness = "auto"``
corrects exactly the flagged pairs (:func:`mmn_fed.correction.resolve`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from edge_runtime.preprocessing import parse_categorical, parse_numeric
from edge_runtime.schema import Schema

from .data import _numeric_values, derive_labels

MIN_CELL = 10  # the default minimum count behind any number that leaves a site in the clear
ALPHA = 0.05  # false discovery rate over all modality x task x site tests
MIN_EFFECT = 0.10  # smallest difference in presence rate between two labels that counts as label-dependent


class AuditError(ValueError):
    """Counts that cannot be audited (unknown task or modality, malformed site counts)."""


# ---- at a site: counts ----------------------------------------------------------------------

def column_presence(schema: Schema, df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per input column: which rows hold a value (the schema's missing codes count as missing).
    Unparseable numeric values count as present: the audit is about what was recorded."""
    out = {}
    for c in schema.input_columns:
        if c not in df.columns:
            out[c] = np.zeros(len(df), dtype=bool)
            continue
        codes = schema.missing_codes.get(c, ())
        if c in schema.categorical:
            values = df[c].to_numpy(dtype=object)
            out[c] = np.array([v is not None for v in parse_categorical(values, codes)], dtype=bool)
        else:  # a numeric column stays numeric: parse_numeric's vectorized path, not one Python call per row
            x, issues = parse_numeric(_numeric_values(df[c]), c, codes)
            ok = ~np.isnan(x)
            for i in issues:
                ok[i.row] = True
            out[c] = ok
    return out


def modality_presence(schema: Schema, df: pd.DataFrame,
                      columns: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A modality is present in a row when any of its columns holds a value (as in preprocessing)."""
    columns = column_presence(schema, df) if columns is None else columns
    return {m: np.logical_or.reduce([columns[c] for c in cols]) for m, cols in schema.modalities.items()}


def _classes(schema: Schema, task: str, values: np.ndarray, present: np.ndarray) -> list:
    if schema.tasks[task].kind == "binary":
        return [0, 1]
    return sorted({str(v) for v in values[present]})


def presence_counts(schema: Schema, df: pd.DataFrame, min_cell: int = MIN_CELL,
                    columns: bool = False, min_effect: float = MIN_EFFECT) -> dict[str, Any]:
    """One site's audit counts: ``{"tables": [{"kind": "modality"|"column", "name", "task", "labels",
    "n": [...], "present": [...]} | {..., "suppressed": true}]}``. ``n[i]`` rows carry label ``labels[i]``
    and ``present[i]`` of them hold the modality. Regression tasks are not audited."""
    labels = derive_labels(schema, df)
    col_pres = column_presence(schema, df)
    groups: list[tuple[str, str, np.ndarray]] = [("modality", m, p)
                                                 for m, p in modality_presence(schema, df, col_pres).items()]
    if columns:
        groups += [("column", c, col_pres[c]) for c in schema.input_columns]
    tables = []
    for t, task in schema.tasks.items():
        if task.kind == "regression":
            continue
        values, lab = labels[t]
        classes = _classes(schema, t, values, lab)
        if task.kind == "binary":
            keys = np.where(lab, values, -1).astype(int).astype(str)
        else:
            keys = np.array([str(v) for v in values], dtype=object)
        for kind, name, pres in groups:
            n, k = [], []
            for c in classes:
                rows = lab & (keys == str(c))
                n.append(int(rows.sum()))
                k.append(int((rows & pres).sum()))
            cells = [v for pair in zip(k, (a - b for a, b in zip(n, k))) for v in pair]
            entry: dict[str, Any] = {"kind": kind, "name": name, "task": t, "labels": [str(c) for c in classes]}
            if any(0 < v < min_cell for v in cells):
                # the counts stay here; the site's own test of them leaves (one p-value over all its labelled rows,
                # and whether the rates differ by the audit's smallest effect), so small sites still count
                p, _ = _test(n, k)
                rates = [b / a for a, b in zip(n, k) if a]
                entry.update(suppressed=True, p_value=None if p != p else p,
                             large_effect=bool(len(rates) >= 2 and max(rates) - min(rates) >= min_effect))
            else:
                entry.update(n=n, present=k)
            tables.append(entry)
    return {"min_cell": int(min_cell), "tables": tables}


# ---- at the server: tests ---------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One presence-vs-label test at one site."""

    site: str
    kind: str  # "modality" or "column"
    name: str
    task: str
    labels: tuple[str, ...]
    n: tuple[int, ...] = ()
    present: tuple[int, ...] = ()
    suppressed: bool = False
    p_value: float = float("nan")
    q_value: float = float("nan")  # Benjamini-Hochberg adjusted
    rate_difference: float = float("nan")  # largest difference between two labels' presence rates
    cramers_v: float = float("nan")
    flagged: bool = False

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(k / n if n else float("nan") for k, n in zip(self.present, self.n))

    def describe(self) -> str:
        if self.suppressed:
            verdict = ("LABEL-DEPENDENT (tested at the site)" if self.flagged else
                       f"q = {self.q_value:.2g}, tested at the site" if self.q_value == self.q_value else "not testable")
            return (f"{self.site}: {self.kind} {self.name} x {self.task}: counts suppressed (a cell below the minimum "
                    f"count); {verdict}")
        rates = ", ".join(f"{r:.0%} of {lab}" for lab, r in zip(self.labels, self.rates) if r == r)
        tail = "LABEL-DEPENDENT" if self.flagged else "no evidence" if self.q_value >= ALPHA else "small effect"
        return (f"{self.site}: {self.kind} {self.name} present for {rates} ({self.task}); "
                f"q = {self.q_value:.2g}, difference {self.rate_difference:.2f}: {tail}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["labels"], d["n"], d["present"] = list(self.labels), list(self.n), list(self.present)
        d["rates"] = list(self.rates)
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in d.items()}


@dataclass
class AuditResult:
    findings: list[Finding]
    alpha: float = ALPHA
    min_effect: float = MIN_EFFECT
    min_cell: int = MIN_CELL
    sites: list[str] = field(default_factory=list)

    def flagged(self, kind: str = "modality") -> dict[str, str]:
        """modality -> the task whose label its presence depends on most (largest rate difference)."""
        best: dict[str, Finding] = {}
        for f in self.findings:
            if f.flagged and f.kind == kind and (f.name not in best or f.rate_difference > best[f.name].rate_difference):
                best[f.name] = f
        return {m: f.task for m, f in best.items()}

    def lines(self, only_flagged: bool = False) -> list[str]:
        return [f.describe() for f in self.findings if f.flagged or not only_flagged]

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "min_effect": self.min_effect, "min_cell": self.min_cell, "sites": self.sites,
                "test": "Pearson chi-squared (Fisher exact for sparse 2x2), Benjamini-Hochberg FDR over all tests",
                "flagged": self.flagged(), "flagged_columns": self.flagged("column"),
                "findings": [f.to_dict() for f in self.findings]}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def _test(n: Sequence[int], k: Sequence[int]) -> tuple[float, float]:
    """(p-value, Cramer's V) for presence vs label; NaN when a margin is empty."""
    from scipy import stats

    table = np.array([list(k), [a - b for a, b in zip(n, k)]], dtype=float)  # rows: present, absent
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2 or (table.sum(1) == 0).any():
        return float("nan"), float("nan")
    total = table.sum()
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / total
    chi2 = float(((table - expected) ** 2 / expected).sum())
    v = float(np.sqrt(chi2 / (total * (min(table.shape) - 1))))
    if table.shape == (2, 2) and expected.min() < 5:
        return float(stats.fisher_exact(table)[1]), v
    return float(stats.chi2.sf(chi2, (table.shape[0] - 1) * (table.shape[1] - 1))), v


def benjamini_hochberg(p: Sequence[float]) -> np.ndarray:
    """FDR-adjusted q-values (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if not ok.size:
        return q
    order = ok[np.argsort(p[ok])]
    m = ok.size
    adj = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(adj[::-1])[::-1])
    return q


def audit(site_counts: Mapping[str, Mapping[str, Any]], alpha: float = ALPHA, min_effect: float = MIN_EFFECT) -> AuditResult:
    """Test every site's tables (``site name -> presence_counts(...)``) with FDR control over all of them."""
    raw = []
    min_cells = set()
    for site, counts in site_counts.items():
        if not isinstance(counts, Mapping) or not isinstance(counts.get("tables"), list):
            raise AuditError(f"site '{site}': audit counts need a 'tables' list")
        min_cells.add(int(counts.get("min_cell", MIN_CELL)))
        for t in counts["tables"]:
            base = dict(site=str(site), kind=str(t["kind"]), name=str(t["name"]), task=str(t["task"]),
                        labels=tuple(t["labels"]))
            if t.get("suppressed"):
                p = t.get("p_value")
                raw.append((Finding(**base, suppressed=True), float("nan") if p is None else float(p), float("nan"),
                            bool(t.get("large_effect", False))))
                continue
            n, k = tuple(int(v) for v in t["n"]), tuple(int(v) for v in t["present"])
            if len(n) != len(base["labels"]) or len(k) != len(n) or any(b > a or b < 0 for a, b in zip(n, k)):
                raise AuditError(f"site '{site}': malformed counts for {t['kind']} {t['name']} x {t['task']}")
            p, v = _test(n, k)
            rates = [b / a for a, b in zip(n, k) if a]
            diff = float(max(rates) - min(rates)) if len(rates) >= 2 else float("nan")
            raw.append((Finding(**base, n=n, present=k), p, v, diff))
    q = benjamini_hochberg([r[1] for r in raw])
    findings = []
    for (f, p, v, *rest), qi in zip(raw, q):
        if f.suppressed:  # tested at the site: only its p-value and whether the effect is large came here
            large = rest[0]
            findings.append(Finding(**{**{k: getattr(f, k) for k in ("site", "kind", "name", "task", "labels")},
                                       "suppressed": True, "p_value": p, "q_value": float(qi),
                                       "flagged": bool(qi == qi and qi < alpha and large)}))
            continue
        diff = rest[0]
        flagged = bool(qi == qi and qi < alpha and diff == diff and diff >= min_effect)
        findings.append(Finding(**{**{k: getattr(f, k) for k in ("site", "kind", "name", "task", "labels", "n", "present")},
                                   "p_value": p, "q_value": float(qi), "rate_difference": diff, "cramers_v": v,
                                   "flagged": flagged}))
    return AuditResult(findings, alpha, min_effect, max(min_cells, default=MIN_CELL), sorted(site_counts))


def audit_frame(schema: Schema, df: pd.DataFrame, sites: Iterable[str] | np.ndarray | None = None,
                min_cell: int = MIN_CELL, columns: bool = False, alpha: float = ALPHA,
                min_effect: float = MIN_EFFECT) -> AuditResult:
    """The audit of one table: per site when ``sites`` (one name per row) is given or the schema names a site
    column present in ``df``, else the whole table as one site named 'all'."""
    if sites is None and schema.site_column and schema.site_column in df.columns:
        sites = df[schema.site_column].astype(str).to_numpy()
    if sites is None:
        groups = {"all": df}
    else:
        sites = np.asarray(list(sites), dtype=object).astype(str)
        groups = {s: df[sites == s] for s in dict.fromkeys(sorted(sites))}
    return audit({s: presence_counts(schema, g, min_cell, columns) for s, g in groups.items()}, alpha, min_effect)
