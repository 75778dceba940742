"""The `mmn-edge` and `mmn-fed export/keygen` command lines, and the runtime's import isolation."""
import csv
import json
import subprocess
import sys

import numpy as np

from edge_runtime.cli import main as edge_main
from mmn_fed.cli import main as fed_main


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_importing_and_predicting_never_imports_torch_pandas_or_flwr(heart, tmp_path):
    rows = tmp_path / "in.csv"
    heart.df.head(10).to_csv(rows, index=False)
    code = f"""
import sys
from edge_runtime import load_bundle
from edge_runtime.cli import main
b = load_bundle({str(heart.bundle)!r}, trust_key={str(heart.public_key)!r})
p = b.predict({str(rows)!r}, explain=True)
assert p.ok.all(), p.reasons
assert main(["predict", {str(heart.bundle)!r}, "--trust-key", {str(heart.public_key)!r}, "--input", {str(rows)!r},
             "--output", {str(tmp_path / "out.csv")!r}, "--explain"]) == 0
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "pandas", "flwr", "mmn_fed", "onnx"))
print(bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_predict_writes_one_row_per_input_row_in_order(heart, tmp_path, capsys):
    src = heart.df.head(30).copy().astype(object)
    src.loc[4, "age"] = "old"  # a bad row
    src.loc[7, ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "slope",
                "ca", "thal"]] = None  # nothing to predict from
    src.to_csv(tmp_path / "in.csv", index=False)
    rc = edge_main(["predict", str(heart.bundle), "--trust-key", str(heart.public_key), "--input",
                    str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv"), "--keep", "id", "--explain"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "28 predicted, 2 not predicted" in err and "row 5" in err
    out = read_csv(tmp_path / "out.csv")
    assert [r["id"] for r in out] == [str(i) for i in src["id"]]
    assert out[4]["disease"] == "" and "age" in out[4]["reason"]
    assert out[7]["disease"] == "" and "no value" in out[7]["reason"]
    assert set(out[0]) >= {"disease", "severity", "severity_p_0", "severity_p_4", "disease@prior",
                           "disease@+imaging", "modalities", "warnings", "reason"}
    ref = heart.df.head(30).to_dict("records")
    from edge_runtime import load_bundle

    p = load_bundle(heart.bundle, trust_key=heart.public_key).predict(ref)
    got = np.array([float(r["disease"]) for i, r in enumerate(out) if i not in (4, 7)])
    np.testing.assert_allclose(got, np.delete(p.values["disease"], [4, 7]), atol=1e-6)
    assert out[0]["severity"] == p.label("severity")[0]


def test_exit_codes(heart, tmp_path, capsys):
    (tmp_path / "in.csv").write_text("age,sex\n63,Male\n")
    base = ["predict", str(heart.bundle), "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o.csv")]
    assert edge_main(base) == 3  # no key, no opt-in
    assert "no trust key" in capsys.readouterr().err
    assert edge_main(base + ["--trust-key", str(heart.other_public_key)]) == 3
    assert edge_main(base + ["--allow-unsigned"]) == 0
    (tmp_path / "bad.csv").write_text("foo\n1\n")
    assert edge_main(["predict", str(heart.bundle), "--allow-unsigned", "--input", str(tmp_path / "bad.csv"),
                      "--output", str(tmp_path / "o2.csv")]) == 2
    assert "none of the input's columns" in capsys.readouterr().err
    assert not (tmp_path / "o2.csv").exists()  # no half-written output
    assert edge_main(["verify", str(heart.bundle), "--trust-key", str(heart.public_key)]) == 0
    assert "OK" in capsys.readouterr().out
    assert edge_main(["verify", str(heart.unsigned), "--trust-key", str(heart.public_key)]) == 3


def test_info(heart, capsys):
    assert edge_main(["info", str(heart.bundle)]) == 0
    out = capsys.readouterr().out
    assert "NOT verified" in out and "imaging" in out and "severity" in out and "multiclass" in out
    assert "portable: yes" in out
    assert edge_main(["info", str(heart.bundle), "--trust-key", str(heart.public_key), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["verified"] and d["order"][0] == "demographics" and d["total_bytes"] > 0
    assert d["tasks"]["disease"]["kind"] == "binary" and d["portable"] is True


def test_fed_keygen_and_export_commands(heart, tmp_path, capsys):
    assert fed_main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "mmn-edge.key").stat().st_mode & 0o077 == 0  # private key: owner only
    assert fed_main(["export", str(heart.model_path), "--out", str(tmp_path / "b"),
                     "--sign-key", str(tmp_path / "k" / "mmn-edge.key")]) == 0
    capsys.readouterr()
    assert edge_main(["verify", str(tmp_path / "b"), "--trust-key", str(tmp_path / "k" / "mmn-edge.pub")]) == 0
    assert fed_main(["export", str(heart.model_path), "--out", str(tmp_path / "b")]) == 2  # exists, no --force
    assert fed_main(["export", str(heart.model_path), "--out", str(tmp_path / "b"), "--force"]) == 0
    assert not (tmp_path / "b" / "manifest.sig").exists()  # re-exported unsigned: no stale signature
