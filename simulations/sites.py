"""Site partitioners: which hospital holds each row.

- ``by``: natural sites from a column (heart: ``dataset``).
- ``iid``: n sites of near-equal size, rows shuffled.
- ``dirichlet``: n sites whose label mix follows Dir(alpha) per class of ``task`` (label skew; small
  alpha = each site dominated by few classes; the usual non-IID benchmark partition).

Every partitioner returns one site name per row: every row lands in exactly one site.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from edge_runtime.schema import Schema
from mmn_fed.data import derive_labels


@dataclass(frozen=True)
class SitePlan:
    """The ``[sites]`` table of a scenario: exactly one of by / iid / dirichlet."""

    by: str | None = None
    iid: int | None = None
    n: int | None = None  # dirichlet
    alpha: float | None = None  # dirichlet
    task: str | None = None  # dirichlet
    seed: int = 0  # iid / dirichlet draws (fixed across run seeds so sites stay the same)

    @property
    def kind(self) -> str:
        return "by" if self.by else "iid" if self.iid else "dirichlet"

    def describe(self) -> str:
        if self.by:
            return f"natural sites from column '{self.by}'"
        if self.iid:
            return f"{self.iid} IID sites"
        return f"{self.n} Dirichlet sites (alpha={self.alpha}, label skew on '{self.task}')"

    def to_dict(self) -> dict[str, Any]:
        if self.by:
            return {"by": self.by}
        if self.iid:
            return {"iid": self.iid, "seed": self.seed}
        return {"dirichlet": {"n": self.n, "alpha": self.alpha, "task": self.task}, "seed": self.seed}


def site_names(n: int) -> list[str]:
    return [f"site{i + 1}" for i in range(n)]


def by_column(df: pd.DataFrame, column: str) -> np.ndarray:
    if column not in df.columns:
        raise ValueError(f"sites.by: column '{column}' is not in the data; data has {list(df.columns)[:30]}")
    col = df[column]
    if col.isna().any():
        rows = np.flatnonzero(col.isna().to_numpy())[:5].tolist()
        raise ValueError(f"sites.by: column '{column}' is missing for {int(col.isna().sum())} row(s), e.g. rows {rows}")
    return col.astype(str).to_numpy(dtype=object)


def iid(n_rows: int, n_sites: int, seed: int) -> np.ndarray:
    names = np.array(site_names(n_sites), dtype=object)
    perm = np.random.default_rng(seed).permutation(n_rows)
    out = np.empty(n_rows, dtype=object)
    for i, part in enumerate(np.array_split(perm, n_sites)):
        out[part] = names[i]
    return out


def dirichlet(labels: np.ndarray, n_sites: int, alpha: float, seed: int) -> np.ndarray:
    """Per class, split its rows over sites in Dir(alpha) proportions. ``labels`` may hold any hashable
    values (rows without a label form their own class)."""
    rng = np.random.default_rng(seed)
    names = np.array(site_names(n_sites), dtype=object)
    labels = np.asarray(labels).astype(str)
    out = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(n_sites, float(alpha)))
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
        for i, part in enumerate(np.split(idx, cuts)):
            out[part] = names[i]
    return out


def assign_sites(df: pd.DataFrame, schema: Schema, plan: SitePlan) -> np.ndarray:
    """One site name per row of ``df``."""
    if plan.by:
        return by_column(df, plan.by)
    if plan.iid:
        return iid(len(df), plan.iid, plan.seed)
    values, present = derive_labels(schema, df)[plan.task]
    labels = np.where(present, values.astype(str), "<missing>")
    out = dirichlet(labels, plan.n, plan.alpha, plan.seed)
    return out
