"""Each mechanism's rate and dependence, measured on generated data (mmn_fed.make_synthetic)."""
import numpy as np
import pytest

from mmn_fed import make_synthetic
from mmn_fed.data import derive_labels, fit_preprocessor
from simulations.missingness import MissingnessLog, MissingnessRule, apply_rules, availability

N = 4000


@pytest.fixture(scope="module")
def cohort():
    return make_synthetic(n=N, modalities={"a": 3, "b": 3, "c": 2}, seed=1)


def lost(schema, before, after, modality):
    cols = list(schema.modalities[modality])
    return after[cols].isna().all(axis=1).to_numpy() & ~before[cols].isna().all(axis=1).to_numpy()


def apply(cohort, rule, phase="train", sites=None, flip=False, seed=0):
    df, schema = cohort
    sites = np.array(["s1"] * len(df)) if sites is None else sites
    return apply_rules(df, schema, [rule], sites, seed=seed, phase=phase, flip_mnar=flip)


def test_mcar_rate_and_independence_from_label(cohort):
    df, schema = cohort
    out = apply(cohort, MissingnessRule("a", "mcar", 0.3))
    gone = lost(schema, df, out, "a")
    y = df["outcome"].to_numpy()
    assert abs(gone.mean() - 0.3) < 0.03
    assert abs(gone[y == 1].mean() - gone[y == 0].mean()) < 0.05
    # a modality is removed whole, other modalities untouched
    assert out.loc[gone, list(schema.modalities["a"])].isna().all().all()
    assert out[list(schema.modalities["b"])].equals(df[list(schema.modalities["b"])])


def test_mnar_depends_on_label_only(cohort):
    df, schema = cohort
    out = apply(cohort, MissingnessRule("b", "mnar", 0.8, task="outcome", label=1))
    gone = lost(schema, df, out, "b")
    y = derive_labels(schema, df)["outcome"][0]
    assert abs(gone[y == 1].mean() - 0.8) < 0.04
    assert gone[y == 0].sum() == 0


def test_mnar_flipped_hits_the_other_label(cohort):
    df, schema = cohort
    out = apply(cohort, MissingnessRule("b", "mnar", 0.8, task="outcome", label=1), phase="test", flip=True)
    gone = lost(schema, df, out, "b")
    y = derive_labels(schema, df)["outcome"][0]
    assert gone[y == 1].sum() == 0
    assert abs(gone[y == 0].mean() - 0.8) < 0.04


def test_mar_depends_on_an_observed_column_of_another_modality(cohort):
    df, schema = cohort
    out = apply(cohort, MissingnessRule("a", "mar", 0.6, column="c_0", direction="high"))
    gone = lost(schema, df, out, "a")
    high = df["c_0"].to_numpy() > np.median(df["c_0"])
    assert abs(gone[high].mean() - 0.6) < 0.04
    assert gone[~high].sum() == 0
    assert out["c_0"].equals(df["c_0"])  # the driver stays observed


def test_self_masking_depends_on_the_modality_own_values(cohort):
    df, schema = cohort
    out = apply(cohort, MissingnessRule("a", "self_masking", 0.5, column="a_0", direction="low"))
    gone = lost(schema, df, out, "a")
    low = df["a_0"].to_numpy() < np.median(df["a_0"])
    assert abs(gone[low].mean() - 0.5) < 0.04
    assert gone[~low].sum() == 0
    # what remains observed is biased: the low values are under-represented
    assert out["a_0"].mean() > df["a_0"].mean() + 0.1


def test_absent_at_named_sites_only(cohort):
    df, schema = cohort
    sites = np.where(np.arange(len(df)) % 2 == 0, "s1", "s2")
    out = apply(cohort, MissingnessRule("c", "absent", 1.0, sites=("s2",)), sites=sites)
    gone = lost(schema, df, out, "c")
    assert gone[sites == "s2"].all() and not gone[sites == "s1"].any()
    prep = fit_preprocessor(schema, df)
    table = availability(prep, out, sites)
    assert table.loc["s2", "c"] == 0.0 and table.loc["s1", "c"] == 1.0 and table.loc["s2", "a"] == 1.0


def test_phase_and_reproducibility(cohort):
    df, schema = cohort
    rule = MissingnessRule("a", "mcar", 0.5, phase="train")
    assert lost(schema, df, apply(cohort, rule, phase="test"), "a").sum() == 0
    a = lost(schema, df, apply(cohort, rule, seed=3), "a")
    b = lost(schema, df, apply(cohort, rule, seed=3), "a")
    c = lost(schema, df, apply(cohort, rule, seed=4), "a")
    assert (a == b).all() and (a != c).any()


def test_log_counts(cohort):
    df, schema = cohort
    log = MissingnessLog()
    sites = np.array(["s1"] * len(df))
    apply_rules(df, schema, [MissingnessRule("a", "mcar", 0.25), MissingnessRule("b", "mcar", 0.0)], sites, 0,
                "train", log=log)
    assert log.eligible == [N, N] and log.removed[1] == 0 and abs(log.removed[0] / N - 0.25) < 0.03
