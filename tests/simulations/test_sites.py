"""Partitioners: every row lands in exactly one site; Dirichlet label skew grows as alpha shrinks."""
import numpy as np
import pandas as pd
import pytest

from mmn_fed import make_synthetic
from simulations.sites import SitePlan, assign_sites, dirichlet, iid


def test_iid_every_row_once_and_balanced():
    out = iid(1003, 4, seed=0)
    assert len(out) == 1003 and not pd.isna(out).any()
    counts = pd.Series(out).value_counts()
    assert sorted(counts.index) == ["site1", "site2", "site3", "site4"]
    assert counts.max() - counts.min() <= 1


def label_skew(sites, labels):
    """Mean total-variation distance between each site's label mix and the global mix."""
    glob = pd.Series(labels).value_counts(normalize=True)
    tv = []
    for s in np.unique(sites):
        loc = pd.Series(labels[sites == s]).value_counts(normalize=True).reindex(glob.index, fill_value=0)
        tv.append(0.5 * np.abs(loc - glob).sum())
    return float(np.mean(tv))


def test_dirichlet_every_row_once_and_skew_grows_as_alpha_shrinks():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    skews = {}
    for alpha in (0.1, 100.0):
        out = dirichlet(labels, 5, alpha, seed=1)
        assert len(out) == len(labels) and not pd.isna(out).any()
        assert set(out) <= {f"site{i}" for i in range(1, 6)}
        skews[alpha] = np.mean([label_skew(dirichlet(labels, 5, alpha, seed=s), labels) for s in range(5)])
    assert skews[0.1] > 0.3 and skews[100.0] < 0.05


def test_assign_sites_by_column_and_errors():
    df, schema = make_synthetic(n=50, seed=0)
    df["hospital"] = np.where(np.arange(50) < 20, "A", "B")
    out = assign_sites(df, schema, SitePlan(by="hospital"))
    assert list(pd.Series(out).value_counts().sort_index()) == [20, 30]
    with pytest.raises(ValueError, match="'nope'"):
        assign_sites(df, schema, SitePlan(by="nope"))
    df.loc[3, "hospital"] = None
    with pytest.raises(ValueError, match="hospital.*missing"):
        assign_sites(df, schema, SitePlan(by="hospital"))


def test_assign_sites_dirichlet_on_a_task():
    df, schema = make_synthetic(n=400, seed=0)
    out = assign_sites(df, schema, SitePlan(n=3, alpha=0.5, task="outcome", seed=2))
    assert len(out) == 400 and set(out) <= {"site1", "site2", "site3"}
