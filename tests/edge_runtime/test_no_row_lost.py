"""No row ever lost (issue 12, item 5): every input row yields exactly one output row in input order, predicted or
not predicted with a status and a reason, or the command fails naming the line and writes nothing.

Each case runs the real CLI (``edge_runtime.cli.main``) on real files, as a new user would.
"""
import csv
import json
import os
import re
import signal
import shutil

import numpy as np
import pandas as pd
import pytest

from edge_runtime import BundleError, UntrustedBundleError, load_bundle
from edge_runtime.cli import main
from edge_runtime.trust import MANIFEST, canonical_json
from mmn_fed.export import load_private_key, sign_bundle

COLUMNS = ["id", "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "slope", "ca",
           "thal", "notes"]


def patients(heart, n=15) -> list[list[str]]:
    """``n`` heart rows as CSV fields: an id, the model's inputs, and a free-text ``notes`` column it ignores."""
    df = heart.df.head(n)
    return [[str(i + 1)] + ["" if pd.isna(v) else str(v) for v in df.iloc[i][COLUMNS[1:-1]]] + ["seen"]
            for i in range(n)]


def write(path, rows, header=COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def predict(heart, inp, out, *extra, bundle=None):
    return main(["predict", str(bundle or heart.bundle), "--trust-key", str(heart.public_key), "--input", str(inp),
                 "--output", str(out), *extra])


def read(path):
    return list(csv.DictReader(open(path, newline="")))


# ---- 1. an unclosed quote ----------------------------------------------------------------------------

def test_unclosed_quote_fails_naming_the_line_and_writes_nothing(heart, tmp_path, capsys):
    """An unclosed quote swallows the rest of the file (the csv module reads it as one value): rows after it
    cannot be recovered, so the command fails naming the line, and the previous output is left as it was."""
    text = write(tmp_path / "p.csv", patients(heart)).read_text().splitlines(keepends=True)
    text[2] = text[2].replace(",seen", ',"seen at 9 (call back')  # data row 2 = line 3
    inp = tmp_path / "p.csv"
    inp.write_text("".join(text))
    out = tmp_path / "pred.csv"
    out.write_text("yesterday's predictions\n")
    assert predict(heart, inp, out) == 2
    err = capsys.readouterr().err
    assert "p.csv line 3" in err and "never closed" in err, err
    assert out.read_text() == "yesterday's predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "pred.csv"]  # no temporary file left


def test_a_quoted_value_over_several_lines_is_still_one_row(heart, tmp_path):
    rows = patients(heart, 4)
    rows[1][-1] = "seen at 9,\nnew line, \"quoted\""
    out = tmp_path / "pred.csv"
    assert predict(heart, write(tmp_path / "p.csv", rows), out, "--keep", "id") == 0
    got = read(out)
    assert [r["id"] for r in got] == ["1", "2", "3", "4"] and all(r["status"] == "ok" for r in got)


# ---- 2. a huge field ---------------------------------------------------------------------------------

def test_huge_field_fails_naming_line_and_column(heart, tmp_path, capsys):
    rows = patients(heart)
    rows[3][-1] = "x" * 200_000
    out = tmp_path / "pred.csv"
    assert predict(heart, write(tmp_path / "p.csv", rows), out) == 2
    err = capsys.readouterr().err
    assert "p.csv line 5, column 15 'notes'" in err and "longer than" in err, err
    assert "Traceback" not in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


# ---- 3. a short row ----------------------------------------------------------------------------------

def test_short_row_is_reported_with_its_missing_columns_and_not_predicted(heart, tmp_path, capsys):
    rows = patients(heart, 5)
    rows.insert(2, ["99", "63", "Male"])
    out = tmp_path / "pred.csv"
    assert predict(heart, write(tmp_path / "p.csv", rows), out, "--keep", "id") == 0
    got = read(out)
    assert [r["id"] for r in got] == ["1", "2", "99", "3", "4", "5"]  # one row per input row, in order
    short = got[2]
    assert short["status"] == "not predicted" and short["disease"] == "" and short["modalities"] == ""
    assert "3 fields but the header has 15" in short["reason"] and "cp, trestbps" in short["reason"]
    assert "notes" in short["reason"]
    assert all(r["status"] == "ok" and r["disease"] for i, r in enumerate(got) if i != 2)
    assert "5 predicted, 1 not predicted" in capsys.readouterr().err


# ---- 4. the output file ------------------------------------------------------------------------------

def test_output_equal_to_input_is_refused_and_the_input_kept(heart, tmp_path, capsys):
    inp = write(tmp_path / "p.csv", patients(heart))
    before = inp.read_bytes()
    assert predict(heart, inp, inp) == 2
    assert predict(heart, inp, tmp_path / "." / "p.csv") == 2
    os.link(inp, tmp_path / "hard.csv")  # another name of the same file
    assert predict(heart, inp, tmp_path / "hard.csv") == 2
    err = capsys.readouterr().err
    assert err.count("is the input file") == 3, err
    assert inp.read_bytes() == before


def test_output_that_is_a_directory_is_a_clear_error(heart, tmp_path, capsys):
    inp = write(tmp_path / "p.csv", patients(heart))
    (tmp_path / "out").mkdir()
    assert predict(heart, inp, tmp_path / "out") == 2
    assert predict(heart, inp, tmp_path / "nowhere" / "pred.csv") == 2
    err = capsys.readouterr().err
    assert "is a directory; name a CSV file" in err and "does not exist" in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_run_that_fails_midway_writes_nothing(heart, tmp_path, capsys):
    """The bad quote is after the first chunk: rows were already predicted and written, to a temporary file."""
    rows = patients(heart, 15)
    rows[12][-1] = '"never closed'  # csv.writer quotes it; break the quoting below
    inp = write(tmp_path / "p.csv", rows)
    inp.write_text(inp.read_text().replace('"""never closed"', '"never closed'))
    out = tmp_path / "pred.csv"
    assert predict(heart, inp, out, "--chunk-size", "4") == 2
    assert "line 14" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


# ---- 5. a partial --order ----------------------------------------------------------------------------

def test_partial_order_is_refused_naming_the_modalities_left_out(heart, bundle, tmp_path, capsys):
    inp = write(tmp_path / "p.csv", patients(heart))
    out = tmp_path / "pred.csv"
    assert predict(heart, inp, out, "--order", "imaging,rest") == 2
    err = capsys.readouterr().err
    assert "leaves out modalities ['demographics', 'symptoms', 'exercise_ecg']" in err, err
    assert not out.exists()
    full = list(reversed(bundle.order))
    assert predict(heart, inp, out, "--order", ",".join(full)) == 0 and len(read(out)) == 15


# ---- 6. malformed but validly signed manifests; a FIFO in the bundle -----------------------------------

def _mutate(m, how):
    if how == "no order":
        del m["order"]
    elif how == "module without inputs":
        del m["modules"]["encoders.rest"]["inputs"]
    elif how == "tasks a list":
        m["tasks"] = list(m["tasks"])
    elif how == "task a string":
        m["tasks"]["disease"] = "binary"
    elif how == "module a list":
        m["modules"]["init_state"] = ["init_state.onnx"]
    elif how == "no column statistics":
        del m["preprocessing"]["columns"]["chol"]
    elif how == "file without size":
        del m["files"]["init_state.onnx"]["bytes"]
    elif how == "schema a string":
        m["preprocessing"]["schema"] = "heart"
    return m


@pytest.mark.parametrize("how, key", [
    ("no order", "'order'"), ("module without inputs", "'modules.encoders.rest.inputs'"),
    ("tasks a list", "'tasks' is a list"), ("task a string", "'tasks.disease' is a string"),
    ("module a list", "'modules.init_state' is a list"), ("no column statistics", "'preprocessing.columns.chol'"),
    ("file without size", "'files.init_state.onnx.bytes'"), ("schema a string", "'preprocessing.schema' is a string"),
])
def test_signed_but_malformed_manifest_is_refused_naming_the_key(heart, bundle_copy, tmp_path, capsys, how, key):
    m = _mutate(json.loads((bundle_copy / MANIFEST).read_text()), how)
    (bundle_copy / MANIFEST).write_bytes(canonical_json(m))
    sign_bundle(bundle_copy, load_private_key(heart.private_key))
    with pytest.raises(BundleError, match=re.escape(key)):
        load_bundle(bundle_copy, trust_key=heart.public_key)
    inp = write(tmp_path / "p.csv", patients(heart, 2))
    assert predict(heart, inp, tmp_path / "pred.csv", bundle=bundle_copy) == 3
    assert main(["verify", str(bundle_copy), "--trust-key", str(heart.public_key)]) == 3
    assert main(["info", str(bundle_copy)]) == 3
    err = capsys.readouterr().err
    assert err.count(key) >= 3 and "bundle refused" in err and "Traceback" not in err, err


def test_deeply_nested_signed_manifest_is_refused(heart, bundle_copy, capsys):
    raw = (bundle_copy / MANIFEST).read_text()
    raw = raw.replace('"provenance": {', '"deep": ' + "[" * 200_000 + "]" * 200_000 + ', "provenance": {', 1)
    (bundle_copy / MANIFEST).write_text(raw)
    sign_bundle(bundle_copy, load_private_key(heart.private_key))
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(bundle_copy, trust_key=heart.public_key)
    assert main(["verify", str(bundle_copy), "--trust-key", str(heart.public_key)]) == 3
    assert "nested too deeply" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_in_the_bundle_is_not_a_regular_file_and_never_blocks(heart, bundle_copy):
    os.unlink(bundle_copy / "encoders.rest.onnx")
    os.mkfifo(bundle_copy / "encoders.rest.onnx")  # opening it for reading would wait for a writer forever
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading the bundle blocked on the FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(UntrustedBundleError, match="encoders.rest.onnx is not a regular file"):
            load_bundle(bundle_copy, trust_key=heart.public_key)
    finally:
        signal.alarm(0)


# ---- 7. --allow-unsigned and --keep notes ----------------------------------------------------------------

def test_allow_unsigned_prints_that_the_bundle_is_not_verified(heart, tmp_path, capsys):
    inp = write(tmp_path / "p.csv", patients(heart, 3))
    out = tmp_path / "pred.csv"
    assert main(["predict", str(heart.unsigned), "--allow-unsigned", "--input", str(inp), "--output", str(out)]) == 0
    assert "warning: bundle NOT verified (--allow-unsigned)" in capsys.readouterr().err
    assert predict(heart, inp, out) == 0
    assert "NOT verified" not in capsys.readouterr().err


def test_kept_columns_are_not_noted_as_ignored(heart, tmp_path, capsys):
    inp = write(tmp_path / "p.csv", patients(heart, 3))
    assert predict(heart, inp, tmp_path / "pred.csv", "--keep", "id") == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "ignored" in line]
    assert notes and "'notes'" in notes[0] and "'id'" not in notes[0], notes


# ---- the time-series path (predict_table) ------------------------------------------------------------

TS_RAW = {
    "modalities": {"demo": ["age"], "labs": ["bili"]},
    "tasks": {"event_1y": {"column": "status", "kind": "binary", "positive": [2], "event_time": "futime",
                           "horizon": 365}},
    "timeseries": {"id": "id", "time": "day", "modalities": ["labs"]},
}


@pytest.fixture(scope="module")
def ts_bundle(tmp_path_factory):
    from mmn_fed import ModelConfig, TrainConfig
    from mmn_fed.export import export_bundle
    from mmn_fed.sequences import build_sequences, train_sequences
    from edge_runtime.schema import Schema

    rng = np.random.default_rng(0)
    rows = [{"id": i, "day": float(d * 10), "age": 40.0 + i, "bili": float(rng.lognormal()),
             "status": 2 if i % 2 else 0, "futime": 300.0 + 100 * (i % 3)} for i in range(6) for d in range(4)]
    schema = Schema.from_dict(TS_RAW)
    res = train_sequences(build_sequences(schema, pd.DataFrame(rows)), schema, ModelConfig(state_size=8, hidden=8),
                          TrainConfig(epochs=1, val_fraction=0.0))
    return export_bundle(res.trained, tmp_path_factory.mktemp("ts") / "b")


def visits(path, extra: str = ""):
    lines = ["id,day,age,bili,notes"] + [f"{i},{d * 10},{40 + i},1.2,ok" for i in range(3) for d in range(3)]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def ts_predict(bundle, inp, out):
    return main(["predict", str(bundle), "--allow-unsigned", "--input", str(inp), "--output", str(out)])


def test_time_series_unclosed_quote_fails_naming_the_line(ts_bundle, tmp_path, capsys):
    inp = visits(tmp_path / "v.csv", '3,0,50,1.0,"unclosed\n3,10,50,1.1,ok\n')
    out = tmp_path / "pred.csv"
    assert ts_predict(ts_bundle, inp, out) == 2
    assert "v.csv line 11" in capsys.readouterr().err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.csv"]


def test_time_series_huge_field_fails_naming_line_and_column(ts_bundle, tmp_path, capsys):
    inp = visits(tmp_path / "v.csv", "3,0,50,1.0," + "x" * 200_000 + "\n")
    out = tmp_path / "pred.csv"
    assert ts_predict(ts_bundle, inp, out) == 2
    err = capsys.readouterr().err
    assert "v.csv line 11, column 5 'notes'" in err and "Traceback" not in err, err
    assert not out.exists()


def test_time_series_output_equal_to_input_is_refused(ts_bundle, tmp_path, capsys):
    inp = visits(tmp_path / "v.csv")
    before = inp.read_bytes()
    assert ts_predict(ts_bundle, inp, inp) == 2
    assert "is the input file" in capsys.readouterr().err and inp.read_bytes() == before
    out = tmp_path / "pred.csv"
    assert ts_predict(ts_bundle, inp, out) == 0 and len(read(out)) == 9  # the clean file: a row per visit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv", "v.csv"]


def test_time_series_short_row_is_an_error_row_naming_its_missing_columns(ts_bundle, tmp_path, capsys):
    inp = visits(tmp_path / "v.csv", "3,0,50\n")
    out = tmp_path / "pred.csv"
    assert ts_predict(ts_bundle, inp, out) == 0
    got = read(out)
    assert sorted(int(r) for row in got for r in row["rows"].split()) == list(range(1, 11))  # every row once
    short = [row for row in got if row["rows"] == "10"]
    assert len(short) == 1 and short[0]["status"] == "error" and short[0]["event_1y"] == ""
    assert "line 11 of v.csv (data row 10) has 3 fields but the header has 5: no field for column(s) bili, notes" \
        in short[0]["reason"], short[0]["reason"]
