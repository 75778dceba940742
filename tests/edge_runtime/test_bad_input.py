"""Every kind of bad input has a defined behaviour and a clear message; a bad row never stops the others.

| input                                  | behaviour                                                        |
| -------------------------------------- | ---------------------------------------------------------------- |
| column the model does not use          | ignored; a note names it                                         |
| no column of the model at all          | DataError listing the expected columns                           |
| text / boolean in a numeric column     | that row: no prediction, reason names column and value            |
| inf, -inf, 'inf' in a numeric column   | that row: no prediction, reason 'non-finite number'              |
| a number too large for float32 (1e300) | that row: no prediction, reason 'value too large to encode'       |
| unknown category                       | treated as missing for that column; row predicted, warning        |
| some columns of a modality missing     | modality used (numeric -> mean, categorical -> zeros)             |
| every column of a modality missing     | modality skipped for that row (its encoder is not applied)        |
| no value for any modality              | that row: no prediction, reason                                   |
| a row that is not a mapping            | that row: no prediction, reason                                   |
| empty input                            | zero predictions and a note                                       |
| enormous input                         | processed chunk_size rows at a time; same predictions             |
"""
import math

import numpy as np
import pytest

from edge_runtime import DataError

ROW = {"age": 63, "sex": "Male", "cp": "typical angina", "trestbps": 145.0, "chol": 233.0, "fbs": True,
       "restecg": "lv hypertrophy", "thalch": 150.0, "exang": False, "oldpeak": 2.3, "slope": "downsloping",
       "ca": 0.0, "thal": "fixed defect"}


def with_(**changes):
    r = dict(ROW)
    r.update(changes)
    return r


def test_good_row_is_predicted(bundle):
    p = bundle.predict([ROW])
    assert p.ok.all() and p.reasons == [""] and p.warnings == [""]
    assert 0 < p.values["disease"][0] < 1 and math.isclose(p.values["severity"][0].sum(), 1, rel_tol=1e-5)
    assert p.used == ["demographics+symptoms+rest+exercise_ecg+imaging"]


def test_unknown_columns_are_ignored_with_a_note(bundle):
    p = bundle.predict([with_(favourite_colour="blue", num=2, dataset="Cleveland")])
    assert p.ok.all()
    assert any("favourite_colour" in n for n in p.notes)
    assert not any("'num'" in n or "dataset" in n for n in p.notes)  # label and site columns are expected
    np.testing.assert_allclose(p.values["disease"], bundle.predict([ROW]).values["disease"])


def test_input_without_any_model_column_is_an_error(bundle):
    with pytest.raises(DataError, match="none of the input's columns"):
        bundle.predict([{"foo": 1, "bar": 2}])


@pytest.mark.parametrize("value, message", [
    ("sixty-three", "expected a number"), (True, "boolean"), (float("inf"), "non-finite"), ("-inf", "non-finite"),
    ([63], "expected a number"), ("1e300", "too large"),
])
def test_bad_value_fails_only_its_row(bundle, value, message):
    rows = [ROW, with_(age=value), ROW]
    p = bundle.predict(rows)
    assert p.ok.tolist() == [True, False, True]
    assert "age" in p.reasons[1] and message in p.reasons[1]
    assert math.isnan(p.values["disease"][1]) and np.isnan(p.values["severity"][1]).all()
    assert p.values["disease"][0] == pytest.approx(p.values["disease"][2], abs=1e-7)
    row = p.to_rows()[1]
    assert row["disease"] == "" and row["severity"] == "" and row["reason"] == p.reasons[1]


def test_nan_and_missing_spellings_are_missing_not_errors(bundle):
    p = bundle.predict([with_(age=float("nan"), sex="?", chol="NA", trestbps="")])
    assert p.ok.all() and p.warnings == [""]


def test_unknown_category_is_missing_with_a_warning(bundle):
    p = bundle.predict([with_(cp="hiccups"), with_(cp=None)])
    assert p.ok.all()
    assert "unknown category" in p.warnings[0] and "cp" in p.warnings[0] and p.warnings[1] == ""
    # symptoms has one column: an unknown value there leaves the modality missing, like an empty one
    assert "symptoms" not in p.used[0].split("+")
    assert p.values["disease"][0] == pytest.approx(p.values["disease"][1], abs=1e-7)


def test_partially_missing_modality_is_used_and_wholly_missing_is_skipped(bundle):
    partial = with_(chol=None, fbs=None)  # 'rest' keeps trestbps and restecg
    whole = with_(trestbps=None, chol=None, fbs=None, restecg=None)
    p = bundle.predict([partial, whole])
    assert "rest" in p.used[0].split("+") and "rest" not in p.used[1].split("+")
    assert p.ok.all()


def test_row_without_any_modality_is_not_predicted(bundle):
    p = bundle.predict([{c: None for c in ROW}, ROW])
    assert p.ok.tolist() == [False, True]
    assert "no value for any input column" in p.reasons[0]


def test_non_mapping_row_fails_only_itself(bundle):
    p = bundle.predict([ROW, ["not", "a", "dict"], ROW])
    assert p.ok.tolist() == [True, False, True] and "expected a mapping" in p.reasons[1]


def test_empty_input(bundle):
    p = bundle.predict([])
    assert len(p) == 0 and "no rows" in p.notes[0]
    assert bundle.predict({c: [] for c in ROW}).ok.shape == (0,)


def test_column_dict_input_and_its_errors(bundle):
    p = bundle.predict({c: [v, v] for c, v in ROW.items()})
    assert p.ok.all() and len(p) == 2
    with pytest.raises(DataError, match="different lengths"):
        bundle.predict({"age": [1, 2], "sex": ["Male"]})
    with pytest.raises(DataError, match="list of dicts"):
        bundle.predict(42)


def test_enormous_input_is_chunked_with_the_same_predictions(bundle, heart):
    rows = heart.df.to_dict("records") * 3
    rows[5] = with_(age="bad")
    small = bundle.predict(rows, chunk_size=50)
    big = bundle.predict(rows)
    assert len(small) == len(rows) == len(big)
    assert small.ok.tolist() == big.ok.tolist() and not small.ok[5]
    for t in big.tasks:
        np.testing.assert_allclose(small.values[t], big.values[t], atol=1e-6)


def test_invalid_order_and_chunk_size(bundle):
    with pytest.raises(ValueError, match="order"):
        bundle.predict([ROW], order=["rest", "rest"])
    with pytest.raises(ValueError, match="chunk_size"):
        bundle.predict([ROW], chunk_size=0)


def test_csv_edge_cases(bundle, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        bundle.predict(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(ROW) + "\n")
    assert len(bundle.predict(header_only)) == 0
    dup = tmp_path / "dup.csv"
    dup.write_text("age,age\n1,2\n")
    with pytest.raises(DataError, match="duplicate"):
        bundle.predict(dup)
    ragged = tmp_path / "ragged.csv"
    line = ",".join(str(v) for v in ROW.values())
    ragged.write_text(",".join(ROW) + "\n" + line + "\n" + line + ",extra\n\n" + line + "\n")
    p = bundle.predict(ragged)
    assert p.ok.tolist() == [True, False, True] and "fields" in p.reasons[1]
    with pytest.raises(FileNotFoundError):
        bundle.predict(tmp_path / "nope.csv")
