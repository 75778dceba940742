"""The vectorized setup (target_summary, stratify_key, split_indices, the audit's column presence) gives exactly
what the per-row implementations it replaced gave: those are kept here as the reference."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from edge_runtime.preprocessing import parse_categorical, parse_numeric
from edge_runtime.schema import Schema, canonical_category
from mmn_fed.api import stratify_key
from mmn_fed.audit import column_presence
from mmn_fed.data import derive_labels, target_summary
from mmn_fed.training import split_indices


# ---- the replaced implementations, verbatim ----------------------------------------------------

def old_target_summary(schema, labels):
    out = {}
    for name, (v, p) in labels.items():
        kind = schema.tasks[name].kind
        if kind == "regression":
            x = v[p].astype(np.float64)
            out[name] = {"kind": "numeric", "count": int(x.size), "sum": float(x.sum()), "sumsq": float((x * x).sum())}
        else:
            vals = v[p] if kind == "multiclass" else np.array([canonical_category(int(a)) for a in v[p]], dtype=object)
            keys, counts = np.unique(vals.astype(str), return_counts=True) if len(vals) else ([], [])
            out[name] = {"kind": "categorical", "counts": {str(k): int(c) for k, c in zip(keys, counts)}}
    return out


def old_stratify_key(schema, df):
    task = next(iter(schema.tasks))
    v, p = derive_labels(schema, df)[task]
    key = np.where(p, v.astype(str) if schema.tasks[task].kind != "regression" else "x", "missing").astype(object)
    if schema.site_column and schema.site_column in df.columns:
        key = key + "|" + df[schema.site_column].astype(str).to_numpy()
    return key


def old_split_indices(n, fraction, seed, strata=None):
    rng = np.random.default_rng(seed)
    if strata is None:
        perm = rng.permutation(n)
        k = int(round(n * fraction))
        return np.sort(perm[k:]), np.sort(perm[:k])
    held = []
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        rng.shuffle(idx)
        held.append(idx[: int(round(len(idx) * fraction))])
    held = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(n), held)
    return keep, held


def old_column_presence(schema, df):
    out = {}
    for c in schema.input_columns:
        if c not in df.columns:
            out[c] = np.zeros(len(df), dtype=bool)
            continue
        values = df[c].to_numpy(dtype=object)
        codes = schema.missing_codes.get(c, ())
        if c in schema.categorical:
            out[c] = np.array([v is not None for v in parse_categorical(values, codes)], dtype=bool)
        else:
            x, issues = parse_numeric(values, c, codes)
            ok = ~np.isnan(x)
            for i in issues:
                ok[i.row] = True
            out[c] = ok
    return out


# ---- an odd frame: odd categories, NaN, mixed types, missing codes, inf ---------------------------

def odd_frame(n: int = 240, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    grade = np.array(["a", " b", "B", "1", "1.0", "2.5", "é", "", None, np.nan, 7, 7.0, True], dtype=object)
    num = rng.standard_normal(n)
    num[rng.random(n) < 0.2] = np.nan
    num[::37] = -99.0  # a missing code
    num[5] = np.inf
    ints = rng.integers(-3, 4, n)
    return pd.DataFrame({
        "num": num, "ints": ints, "flag": rng.random(n) < 0.5,
        "grade": grade[rng.integers(0, len(grade), n)],
        "y_bin": np.where(rng.random(n) < 0.1, np.nan, rng.integers(-2, 3, n).astype(float)),
        "y_pos": np.array(["yes", "no", " Yes", None, 1, "1", np.nan], dtype=object)[rng.integers(0, 7, n)],
        "y_cls": np.array(["x", "y", "z", 2, 2.0, None, "", " x"], dtype=object)[rng.integers(0, 8, n)],
        "y_reg": np.where(rng.random(n) < 0.1, np.nan, rng.standard_normal(n)),
        "site": np.array(["s1", "s2", " s1", 3, "3"], dtype=object)[rng.integers(0, 5, n)],
    })


def odd_schema(first_task: str, site: bool) -> Schema:
    tasks = {
        "bin": {"column": "y_bin", "kind": "binary", "threshold": 0},
        "pos": {"column": "y_pos", "kind": "binary", "positive": ["yes", "1"]},
        "cls": {"column": "y_cls", "kind": "multiclass"},
        "reg": {"column": "y_reg", "kind": "regression"},
    }
    d = {"modalities": {"a": ["num", "ints"], "b": ["flag", "grade"]},
         "columns": {"categorical": ["grade", "flag"], "missing_codes": {"num": [-99]}},
         "tasks": {first_task: tasks[first_task], **{k: v for k, v in tasks.items() if k != first_task}}}
    if site:
        d["sites"] = {"column": "site"}
    return Schema.from_dict(d)


@pytest.mark.parametrize("first", ["bin", "pos", "cls", "reg"])
def test_target_summary_equals_the_per_row_version(first):
    schema = odd_schema(first, site=False)
    labels = derive_labels(schema, odd_frame())
    assert target_summary(schema, labels) == old_target_summary(schema, labels)
    # binary labels handed over directly: several spellings of one class, negatives, bools, integers, empty
    for v in (np.array([0.0, 1.0, 1.5, -0.5, 2.0, -3.0, 10.0]), np.array([True, False, True]),
              np.array([3, -1, 0, 3]), np.zeros(0)):
        lab = {"bin": (v, np.ones(len(v), dtype=bool))}
        assert list(target_summary(schema, lab)["bin"]["counts"].items()) == \
            list(old_target_summary(schema, lab)["bin"]["counts"].items())
    with pytest.raises(ValueError):  # a NaN label marked present fails as int(nan) did
        target_summary(schema, {"bin": (np.array([1.0, np.nan]), np.ones(2, dtype=bool))})


@pytest.mark.parametrize("first", ["bin", "pos", "cls", "reg"])
@pytest.mark.parametrize("site", [False, True])
def test_stratify_key_equals_the_per_row_version(first, site):
    schema, df = odd_schema(first, site), odd_frame()
    new, old = stratify_key(schema, df), old_stratify_key(schema, df)
    assert new.dtype == old.dtype == object
    assert new.tolist() == old.tolist()
    assert all(type(a) is str for a in new)
    if site:  # a blank site: what the row-by-row concatenation did (pandas keeps NaN through astype(str))
        df.loc[3, "site"] = np.nan
        with pytest.raises(TypeError):
            old_stratify_key(schema, df)
        with pytest.raises(TypeError):
            stratify_key(schema, df)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_split_indices_equals_the_per_row_version(fraction):
    df = odd_frame(500)
    strata_list = [None, old_stratify_key(odd_schema("cls", True), df),
                   old_stratify_key(odd_schema("bin", False), df).astype(str),  # a numpy str array
                   np.array(["a", "b", "a", "c", "b", "a", "a"] * 3, dtype=object),  # strata of 1-3 rows
                   np.random.default_rng(0).integers(0, 4, 300),  # numbers: the comparison path
                   np.array([1.5, np.nan, 2.5, 1.5, np.nan, 2.5] * 20)]
    for seed in (0, 7):
        for strata in strata_list:
            n = len(df) if strata is None else len(strata)
            new, old = split_indices(n, fraction, seed, strata), old_split_indices(n, fraction, seed, strata)
            for a, b in zip(new, old):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)


def test_column_presence_equals_the_per_row_version():
    schema, df = odd_schema("bin", True), odd_frame()
    new, old = column_presence(schema, df), old_column_presence(schema, df)
    assert new.keys() == old.keys()
    for c in new:
        np.testing.assert_array_equal(new[c], old[c], err_msg=c)
