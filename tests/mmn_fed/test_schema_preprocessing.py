import numpy as np
import pandas as pd
import pytest

from edge_runtime.preprocessing import DataError, Preprocessor, merge_summaries, summarize
from edge_runtime.schema import Schema, SchemaError, canonical_category
from mmn_fed.data import encode, fit_preprocessor, frame_to_columns, load_builtin, site_summary

BASE = {
    "modalities": {"demo": ["age", "sex"], "lab": ["chol", "ca"]},
    "tasks": {"disease": {"column": "num", "kind": "binary", "threshold": 0}},
    "columns": {"categorical": ["sex"], "missing_codes": {"chol": [0]}},
}


def small_frame():
    return pd.DataFrame({
        "age": [50, 60, np.nan, 40], "sex": ["M", "F", None, "F"], "chol": [200.0, 0.0, np.nan, 250.0],
        "ca": [0.0, 1.0, np.nan, np.nan], "num": [0, 2, 1, 0],
    })


def test_schema_roundtrip_and_queries():
    s = Schema.from_dict(BASE)
    assert s.input_columns == ["age", "sex", "chol", "ca"]
    assert Schema.from_dict(s.to_dict()) == s
    assert s.subset(modalities=["lab"]).input_columns == ["chol", "ca"]


@pytest.mark.parametrize("patch, needle", [
    ({"modalities": {"demo": []}}, "modality 'demo' is empty"),
    ({"modalities": {"demo": ["age"], "lab": ["age"]}}, "column 'age' is in modality"),
    ({"tasks": {"disease": {"column": "num", "kind": "ordinal"}}}, "kind must be one of"),
    ({"tasks": {"disease": {"kind": "binary"}}}, "needs column"),
    ({"tasks": {"disease": {"column": "num", "kind": "regression", "threshold": 1}}}, "threshold/positive only apply"),
    ({"columns": {"categorical": ["nope"]}}, "'nope', which is in no modality"),
    ({"bogus": {}}, "unknown schema section"),
    ({"tasks": {}}, "at least one task"),
])
def test_bad_schema_names_the_problem(patch, needle):
    raw = {**BASE, **patch}
    with pytest.raises(SchemaError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Schema.from_dict(raw)


def test_unknown_column_and_missing_task_column_are_named():
    s = Schema.from_dict(BASE)
    df = small_frame().drop(columns=["ca"])
    with pytest.raises(SchemaError, match="'ca' \\(modality lab\\)"):
        fit_preprocessor(s, df)
    with pytest.raises(SchemaError, match="'num' \\(task disease\\)"):
        fit_preprocessor(s, small_frame().drop(columns=["num"]))


def test_non_numeric_value_in_numeric_column_is_named():
    s = Schema.from_dict(BASE)
    df = small_frame()
    df["age"] = df["age"].astype(object)
    df.loc[1, "age"] = "sixty"
    with pytest.raises(DataError, match="column 'age'.*'sixty'"):
        fit_preprocessor(s, df)


def test_encoding_values_and_presence():
    s = Schema.from_dict(BASE)
    prep = fit_preprocessor(s, small_frame())
    # chol == 0 is a missing code: mean over 200 and 250 only
    assert prep.columns["chol"]["mean"] == pytest.approx(225.0)
    assert prep.columns["sex"]["categories"] == ["F", "M"]
    data = encode(prep, small_frame())
    assert data.present["demo"].tolist() == [True, True, False, True]
    assert data.present["lab"].tolist() == [True, True, False, True]  # row 1: chol missing, ca present
    # row 3: ca missing inside a present modality -> 0 (the mean)
    assert data.x["lab"][3, 1].item() == 0.0
    # one-hot
    assert data.x["demo"][0, 1:].tolist() == [0.0, 1.0]
    assert data.y["disease"].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_merged_site_summaries_equal_pooled_statistics():
    df, schema = load_builtin("heart")
    sites = [g for _, g in df.groupby("dataset")]
    merged = Preprocessor.from_summary(schema, merge_summaries([site_summary(schema, g) for g in sites]))
    pooled = fit_preprocessor(schema, df)
    for c, st in pooled.columns.items():
        for k, v in st.items():
            if isinstance(v, float):
                assert merged.columns[c][k] == pytest.approx(v, rel=1e-12)
            else:
                assert merged.columns[c][k] == v
    assert merged.targets == pooled.targets


def test_categorical_canonicalization():
    assert canonical_category(True) == canonical_category("True") == "True"
    assert canonical_category(1.0) == canonical_category("1") == canonical_category("1.0") == "1"
    assert canonical_category(" flat ") == "flat"


def test_collect_mode_reports_bad_rows_and_keeps_others():
    s = Schema.from_dict(BASE)
    prep = fit_preprocessor(s, small_frame())
    cols = {"age": [50, "x", 30], "sex": ["M", "F", "Other"], "chol": [float("inf"), 210, 220], "ca": [0, 1, 2]}
    enc = prep.encode(cols, on_error="collect")
    assert enc.valid.tolist() == [False, False, True]
    fatal = {(i.row, i.column) for i in enc.issues if i.fatal}
    assert fatal == {(0, "chol"), (1, "age")}
    unknown = [i for i in enc.issues if not i.fatal]
    assert unknown and unknown[0].column == "sex" and unknown[0].row == 2
    assert enc.present["demo"].tolist() == [False, False, True]


def test_builtin_datasets_load_with_their_schemas():
    for name, n in (("heart", 920), ("support2", 9105)):
        df, schema = load_builtin(name)
        assert len(df) == n
        prep = fit_preprocessor(schema, df)
        data = encode(prep, df)
        assert len(data) == n
    df, schema = load_builtin("support2")
    for leak in ("num_sps", "num_surv2m", "num_surv6m", "num_hday", "fac_dnr"):
        assert leak not in schema.input_columns


def test_modality_and_task_order_survive_key_sorting_json():
    import json

    df, schema = load_builtin("heart")
    prep = fit_preprocessor(schema, df)
    back = Preprocessor.from_dict(json.loads(json.dumps(prep.to_dict(), sort_keys=True)))
    assert list(back.schema.modalities) == list(schema.modalities)  # the encoder order
    assert list(back.schema.tasks) == list(schema.tasks)
    assert back.schema == schema
