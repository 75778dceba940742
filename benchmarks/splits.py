"""Train/test splits shared by the benchmarks, and the simple peer they are compared with.

- heart: FLamby's Fed-Heart-Disease test patients (benchmarks/accuracy.py's ``flamby_split``); train = every
  other patient (with missing values), the 4 hospitals as sites;
- support2, pbc: no site column, so a stratified held-out 30% (first task's label, fixed ``random_state``)
  and the training rows split into 4 IID sites (simulations.sites.iid, fixed seed).

``logistic_regression`` is the peer: a scikit-learn pipeline trained on the same pooled training rows.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import flamby_split  # noqa: E402  (FLamby's exact test patients)

from edge_runtime.schema import Schema  # noqa: E402
from mmn_fed import load_builtin  # noqa: E402
from mmn_fed.data import derive_labels  # noqa: E402
from simulations.sites import iid  # noqa: E402

TEST_FRACTION, SPLIT_SEED, IID_SITES = 0.3, 0, 4


@dataclass
class Split:
    """One benchmark split: the schema, pooled train and test rows, the training rows per site."""

    name: str
    schema: Schema
    train: pd.DataFrame
    test: pd.DataFrame
    sites: dict[str, pd.DataFrame]
    how: str  # one line saying how it was split

    @property
    def task(self) -> str:
        """The task the benchmarks score: the schema's first."""
        return next(iter(self.schema.tasks))

    def labels(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(first-task label as 0/1, labelled?) per row of ``df``."""
        v, p = derive_labels(self.schema, df)[self.task]
        return np.asarray(v), np.asarray(p, dtype=bool)


def load_split(name: str) -> Split:
    """``heart`` (FLamby's test patients, 4 hospitals) or a built-in without sites (held-out 30%, 4 IID sites)."""
    df, schema = load_builtin(name)
    if name == "heart":
        tr, te, inc_tr, _ = flamby_split(df)
        train = df.loc[np.concatenate([tr, inc_tr])].reset_index(drop=True)
        test = df.loc[te].reset_index(drop=True)
        sites = {str(n): g.reset_index(drop=True) for n, g in train.groupby(schema.site_column)}
        return Split(name, schema, train, test, sites, f"FLamby test patients ({len(test)}); train {len(train)} at 4 hospitals")
    from sklearn.model_selection import train_test_split

    task = next(iter(schema.tasks))
    v, p = derive_labels(schema, df)[task]
    df = df[np.asarray(p, dtype=bool)].reset_index(drop=True)  # rows without the scored label are in neither
    y = np.asarray(v)[np.asarray(p, dtype=bool)]
    tr, te = train_test_split(np.arange(len(df)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    train, test = df.iloc[tr].reset_index(drop=True), df.iloc[te].reset_index(drop=True)
    site = iid(len(train), IID_SITES, SPLIT_SEED)
    sites = {str(s): train[site == s].reset_index(drop=True) for s in sorted(set(site))}
    return Split(name, schema, train, test, sites,
                 f"held-out stratified {TEST_FRACTION:.0%} ({len(test)}); train {len(train)} at {IID_SITES} IID sites "
                 "(no site column)")


def logistic_regression(split: Split, inner_cv: bool = True, indicators: bool = True):
    """Logistic regression with missing indicators, fitted on the pooled training rows; returns
    ``predict(df) -> p(positive)``. Numeric: mean imputation + a missing indicator per column with missing
    values + standardization; categorical: one-hot with "missing" as its own category. The schema's missing
    codes (heart's chol = 0) count as missing, as MultiModN reads them. C by 5-fold inner CV on AUROC."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    schema = split.schema
    cat = [c for c in schema.input_columns if c in schema.categorical]
    num = [c for c in schema.input_columns if c not in schema.categorical]

    def features(df: pd.DataFrame) -> pd.DataFrame:
        x = df[cat + num].copy()
        for c, codes in schema.missing_codes.items():
            if c in x:
                x[c] = x[c].where(~x[c].isin(codes))
        x[cat] = x[cat].astype(object).where(x[cat].notna(), "missing").astype(str)
        x[num] = x[num].apply(pd.to_numeric, errors="coerce")
        return x

    pre = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="mean", add_indicator=indicators), StandardScaler()), num),
        ("cat", OneHotEncoder(handle_unknown="ignore"), cat)])
    clf = (LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=5, scoring="roc_auc", max_iter=5000) if inner_cv
           else LogisticRegression(C=1.0, max_iter=5000))
    y, labelled = split.labels(split.train)
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # l1_ratios / legacy attributes
    model = make_pipeline(pre, clf).fit(features(split.train[labelled]), y[labelled].astype(int))
    return lambda df: model.predict_proba(features(df))[:, 1]


def bootstrap_ci(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUROC and its 95% percentile-bootstrap interval over patients (``mmn_fed.metrics.bootstrap_ci``)."""
    from mmn_fed.metrics import auroc
    from mmn_fed.metrics import bootstrap_ci as patient_bootstrap

    lo, hi = patient_bootstrap(y, p, "auroc", n_boot=n_boot, seed=seed)
    return float(auroc(y, p)), float(lo), float(hi)
