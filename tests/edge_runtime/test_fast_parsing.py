"""CSV columns (lists of strings) take a vectorized path through preprocessing: each distinct value is parsed
once and the results gathered. It must give exactly what the value-by-value path gives (object arrays take
that one), for every kind of value a clinic file holds."""
import numpy as np
import pytest

from edge_runtime.preprocessing import Preprocessor, parse_categorical, parse_numeric, summarize
from edge_runtime.schema import Schema

NUMERIC_POOL = ["1", "1.0", " 2.5 ", "-3e2", "0", "", "NA", "n/a", "?", " nan ", "None", "-9", "999", "abc", "1,5",
                "inf", "-inf", "1e400", "7"]
CATEGORY_POOL = ["a", "b", " a ", "1", "1.0", "2", "True", "true", "", "NA", "?", "-9", "zzz", "c"]


def draw(pool, n, seed):
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def issues_of(found):
    return [(i.row, i.column, str(i.value), i.message, i.fatal) for i in found]


@pytest.mark.parametrize("seed", range(5))
def test_numeric_strings_parse_as_value_by_value(seed):
    values = draw(NUMERIC_POOL, 500, seed)
    fast, fast_issues = parse_numeric(values, "x", codes=(-9, "999"))
    slow, slow_issues = parse_numeric(np.array(values, dtype=object), "x", codes=(-9, "999"))
    np.testing.assert_array_equal(fast, slow)  # NaN where missing, a code, or bad
    assert issues_of(fast_issues) == issues_of(slow_issues)
    assert any(i.message == "expected a number" for i in fast_issues)  # the pool's bad values are reported


@pytest.mark.parametrize("seed", range(5))
def test_category_strings_parse_as_value_by_value(seed):
    values = draw(CATEGORY_POOL, 500, seed)
    assert parse_categorical(values, codes=(-9,)) == parse_categorical(np.array(values, dtype=object), codes=(-9,))


@pytest.mark.parametrize("seed", range(3))
def test_encoding_csv_columns_equals_the_value_by_value_encoding(seed):
    schema = Schema.from_dict({
        "modalities": {"m1": ["x", "k"], "m2": ["y"]},
        "tasks": {"t": {"column": "t", "kind": "binary"}},
        "columns": {"categorical": ["k"], "missing_codes": {"x": [-9], "k": ["zzz"]}},
    })
    summary = summarize(schema, {"x": [1.0, 2.0, 3.0], "y": [0.0, 1.0, 2.0], "k": ["a", "b", "1"], "t": [0, 1, 0]})
    prep = Preprocessor.from_summary(schema, summary)
    n = 400
    table = {"x": draw(NUMERIC_POOL, n, seed), "y": draw(NUMERIC_POOL, n, seed + 10),
             "k": draw(CATEGORY_POOL, n, seed + 20)}
    fast = prep.encode(table, on_error="collect")
    slow = prep.encode({c: np.array(v, dtype=object) for c, v in table.items()}, on_error="collect")
    for m in ("m1", "m2"):
        np.testing.assert_array_equal(fast.features[m], slow.features[m])
        np.testing.assert_array_equal(fast.present[m], slow.present[m])
    np.testing.assert_array_equal(fast.valid, slow.valid)
    assert issues_of(fast.issues) == issues_of(slow.issues)
    assert any("unknown category" in i.message for i in fast.issues)


def test_output_columns_hold_each_rows_values_under_their_names():
    """The CLI writes ``Predictions.to_columns`` column by column: each value under its own name, formatted
    as before (8 significant digits), blanks where a row is not predicted or a step did not apply."""
    from edge_runtime.bundle import Predictions, Step

    tasks = {"b": {"kind": "binary"}, "m": {"kind": "multiclass", "classes": ["x", "y", "z"]}}
    values = {"b": np.array([0.25, np.nan, 0.123456789]),
              "m": np.array([[0.1, 0.7, 0.2], [np.nan] * 3, [0.5, 0.3, 0.2]])}
    ok = np.array([True, False, True])
    steps = [Step("prior", np.ones(3, bool), {"b": np.full(3, 0.5), "m": np.tile([0.2, 0.3, 0.5], (3, 1))}),
             Step("labs", np.array([True, True, False]), {"b": np.array([0.3, 0.4, 0.6]),
                                                         "m": np.array([[0.9, 0.05, 0.05]] * 3)})]
    p = Predictions(tasks, values, ok, ["", "no modality", ""], ["", "", "w"], ["labs", "", "labs"], [], steps)
    rows = p.to_rows(explain=True)
    assert list(rows[0]) == p.columns(explain=True)
    assert rows[0]["b"] == "0.25" and rows[2]["b"] == "0.12345679" and rows[1]["b"] == ""
    assert (rows[0]["m"], rows[0]["m_p_y"], rows[2]["m"], rows[1]["m"]) == ("y", "0.7", "x", "")
    assert (rows[0]["b@prior"], rows[0]["b@labs"], rows[2]["b@labs"], rows[1]["b@labs"]) == ("0.5", "0.3", "", "")
    assert (rows[0]["m@prior"], rows[0]["m@labs"], rows[2]["m@labs"]) == ("z", "x", "")
    assert [r["reason"] for r in rows] == ["", "no modality", ""] and rows[2]["warnings"] == "w"


def test_values_remembered_across_chunks_give_the_same_encoding():
    """A chunked input reuses each column's parsed strings (``Preprocessor._memo``): a later chunk encodes as a
    fresh preprocessor encodes it, and the memory stays bounded."""
    import edge_runtime.preprocessing as pp

    schema = Schema.from_dict({"modalities": {"m1": ["x", "k"]}, "tasks": {"t": {"column": "t", "kind": "binary"}},
                               "columns": {"categorical": ["k"], "missing_codes": {"x": [-9]}}})
    prep = Preprocessor.from_summary(schema, summarize(schema, {"x": [1.0, 2.0], "k": ["a", "b"], "t": [0, 1]}))
    first = {"x": draw(NUMERIC_POOL, 300, 1), "k": draw(CATEGORY_POOL, 300, 2)}
    # another mix of values: the chunks' distinct values differ, so nothing may be remembered by position
    second = {"x": draw(NUMERIC_POOL[5:], 300, 3), "k": draw(CATEGORY_POOL[4:], 300, 4)}
    prep.encode(first, on_error="collect")
    again = prep.encode(second, on_error="collect")
    fresh = Preprocessor.from_dict(prep.to_dict()).encode(second, on_error="collect")
    np.testing.assert_array_equal(again.features["m1"], fresh.features["m1"])
    np.testing.assert_array_equal(again.present["m1"], fresh.present["m1"])
    assert issues_of(again.issues) == issues_of(fresh.issues)
    assert prep._memo[("numeric", "x")] and prep._memo[("category", "k")]  # remembered across the chunks
    memo = {str(i): (float(i), None) for i in range(pp.MEMO_LIMIT + 1)}
    pp.parse_numeric(["1", "2"], "x", memo=memo)
    assert len(memo) == 2  # over the limit, the memory starts again


@pytest.mark.parametrize("values,fast_path", [
    (["1", True, np.float32(0.1), "2"], False),  # a list that starts with a string but is not only strings
    (["1\x00", "2", "x\x00", ""], True),  # NUL characters (numpy's strings would drop them; a dict does not)
    (["1", "2" * 5000] + ["3"] * 4000, True),  # one very long value
])
def test_the_fast_path_is_exact_or_not_taken(values, fast_path):
    from edge_runtime.preprocessing import _distinct_strings

    assert (_distinct_strings(values) is not None) == fast_path  # refused: not only strings
    fast, fast_issues = parse_numeric(values, "x")
    slow, slow_issues = parse_numeric(np.array(values, dtype=object), "x")
    np.testing.assert_array_equal(fast, slow)
    assert issues_of(fast_issues) == issues_of(slow_issues)
    assert [type(i.value) for i in fast_issues] == [type(i.value) for i in slow_issues]
    assert parse_categorical(values) == parse_categorical(np.array(values, dtype=object))
