"""The missingness audit finds label-dependent presence, and only that."""
import numpy as np
import pandas as pd
import pytest

from edge_runtime.schema import Schema
from mmn_fed.audit import audit, audit_frame, benjamini_hochberg, presence_counts
from mmn_fed.data import load_builtin


def synthetic(n: int = 3000, seed: int = 0) -> tuple[pd.DataFrame, Schema]:
    """Four modalities with known mechanisms: MCAR, MAR on a driver independent of the label, MNAR on the
    label, and complete. Two sites with different prevalence."""
    rng = np.random.default_rng(seed)
    site = np.where(rng.random(n) < 0.5, "A", "B")
    y = (rng.random(n) < np.where(site == "A", 0.3, 0.6)).astype(int)
    driver = rng.normal(size=n)  # independent of y
    df = pd.DataFrame({
        "site": site, "y": y, "driver": driver,
        # MCAR within each site, at site-dependent rates: pooled over sites it looks label-dependent
        "mcar": np.where(rng.random(n) < np.where(site == "A", 0.1, 0.6), np.nan, rng.normal(size=n) + y),
        "mar": np.where((driver > 0) & (rng.random(n) < 0.7), np.nan, rng.normal(size=n) + y),
        "mnar": np.where((y == 1) & (rng.random(n) < 0.5), np.nan, rng.normal(size=n) + y),
    })
    schema = Schema.from_dict({
        "modalities": {"complete": ["driver"], "m_mcar": ["mcar"], "m_mar": ["mar"], "m_mnar": ["mnar"]},
        "tasks": {"y": {"column": "y", "kind": "binary", "threshold": 0}},
        "columns": {"numeric": ["driver", "mcar", "mar", "mnar"]},
        "sites": {"column": "site"},
    })
    return df, schema


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_audit_flags_the_mnar_modality_and_no_other(seed):
    df, schema = synthetic(seed=seed)
    res = audit_frame(schema, df, columns=True)
    assert res.flagged() == {"m_mnar": "y"}
    assert res.flagged("column") == {"mnar": "y"}
    assert res.sites == ["A", "B"]
    pooled = audit_frame(schema, df.drop(columns="site"))  # confounded by the sites' prevalence
    assert "m_mcar" in pooled.flagged()
    mnar = [f for f in res.findings if f.name == "m_mnar" and f.kind == "modality"]
    # both sites: presence ~100% of y=0 and ~50% of y=1
    for f in mnar:
        assert f.flagged and f.q_value < 1e-6
        assert f.rates[0] == pytest.approx(1.0) and f.rates[1] == pytest.approx(0.5, abs=0.07)
        assert f.rate_difference == pytest.approx(f.rates[0] - f.rates[1])


def test_counts_are_exact_and_small_cells_never_leave_the_site():
    df, schema = synthetic(n=400)
    counts = presence_counts(schema, df, min_cell=10)
    t = next(t for t in counts["tables"] if t["name"] == "m_mnar")
    assert t["labels"] == ["0", "1"]
    assert t["n"] == [int((df.y == 0).sum()), int((df.y == 1).sum())]
    assert t["present"] == [int(((df.y == 0) & df.mnar.notna()).sum()), int(((df.y == 1) & df.mnar.notna()).sum())]
    # a site with 5 positive rows: any table with a cell in 1..9 is sent as suppressed, with no counts
    small = pd.concat([df[df.y == 0].head(60), df[df.y == 1].head(5)])
    sent = presence_counts(schema, small, min_cell=10)
    for t in sent["tables"]:
        assert t.get("suppressed") is True and "n" not in t and "present" not in t
        assert set(t) == {"kind", "name", "task", "labels", "suppressed", "p_value", "large_effect"}
    res = audit({"small": sent})
    assert all(f.suppressed and not f.n and not f.present for f in res.findings)
    # the site's own test still counts: its MNAR modality is found, the others are not
    assert res.flagged() == {"m_mnar": "y"}
    mnar = next(f for f in res.findings if f.name == "m_mnar")
    assert "counts suppressed" in mnar.describe() and "tested at the site" in mnar.describe()
    # zeros are not small cells: a complete modality is counted (present == n)
    full = next(t for t in presence_counts(schema, df, 10)["tables"] if t["name"] == "complete")
    assert full["present"] == full["n"]


def test_benjamini_hochberg_matches_the_definition():
    p = [0.01, 0.04, 0.03, 0.2, float("nan")]
    q = benjamini_hochberg(p)
    # sorted p: .01 .03 .04 .2 -> p*m/rank: .04 .06 .0533 .2 -> monotone from the top: .04 .0533 .0533 .2
    assert q[:4] == pytest.approx([0.04, 0.05333333, 0.05333333, 0.2])
    assert np.isnan(q[4])


def test_heart_own_missingness_is_reported_per_site():
    df, schema = load_builtin("heart")
    res = audit_frame(schema, df, columns=True)
    slope = next(f for f in res.findings if f.site == "Hungary" and f.name == "slope" and f.task == "disease")
    assert slope.flagged
    assert slope.rates[0] == pytest.approx(0.17, abs=0.01) and slope.rates[1] == pytest.approx(0.69, abs=0.01)
    # Switzerland has 8 healthy patients, one with thal: that table stays at the site
    thal = next(f for f in res.findings if f.site == "Switzerland" and f.name == "thal" and f.task == "disease")
    assert thal.suppressed
    local = audit_frame(schema, df, columns=True, min_cell=1)  # a site auditing its own table
    thal = next(f for f in local.findings if f.site == "Switzerland" and f.name == "thal" and f.task == "disease")
    assert thal.rates[0] == pytest.approx(0.12, abs=0.01) and thal.rates[1] == pytest.approx(0.61, abs=0.01)
