"""Preprocessing inside the bundle's graphs (edge_runtime/portable.py): the graph equals training's numpy
preprocessing, the portable model run by plain onnxruntime from raw columns equals the Python runtime, and a
bundle exported before the graphs were shipped still loads and predicts the same."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime import load_bundle
from edge_runtime.portable import column_input
from edge_runtime.trust import BundleError, canonical_json

NASTY_HEART = [
    {"age": 63, "sex": "Male", "cp": "typical angina", "trestbps": 145, "chol": 233, "fbs": "TRUE",
     "restecg": "lv hypertrophy", "thalch": 150, "exang": "FALSE", "oldpeak": 2.3, "slope": "downsloping",
     "ca": 0, "thal": "fixed defect"},
    {"age": "54.5", "sex": " Female ", "chol": 0, "trestbps": "0"},        # missing codes: chol and trestbps absent
    {"age": "NA", "sex": "", "cp": "martian angina", "thalch": "?"},        # unknown category; symptoms absent
    {"age": float("nan"), "ca": "1.0", "thal": "normal"},                   # '1.0' is the number 1: imaging numeric ca
    {"age": 40, "oldpeak": "n/a", "slope": "flat", "exang": "TRUE"},       # a partial modality
    {"cp": "asymptomatic"},                                                 # one modality only
    {"age": "forty"},                                                       # fatal: not a number
    {"trestbps": 1e300},                                                    # too large once standardized
    {},                                                                     # nothing at all
]


def table(rows, columns):
    return {c: [r.get(c) for r in rows] for c in columns}


def test_the_graph_makes_the_features_training_makes(heart, bundle):
    """Preprocessor.encode (numpy, training) and Bundle.encode (parse + the bundle's graph) agree exactly."""
    rows = NASTY_HEART + heart.df.sample(200, random_state=1).to_dict("records")
    t = table(rows, bundle.schema.input_columns)
    with np.errstate(over="ignore", invalid="ignore"):
        want = bundle.preprocessor.encode(t, on_error="collect")
        got = bundle.encode(t, on_error="collect")
    assert got.issues == want.issues and [i.fatal for i in got.issues if i.row == 6] == [True]
    assert any("unknown category" in i.message for i in got.issues if i.row == 2)
    np.testing.assert_array_equal(got.valid, want.valid)
    for m in bundle.order:
        np.testing.assert_array_equal(got.present[m], want.present[m], err_msg=m)
        np.testing.assert_array_equal(got.features[m], want.features[m], err_msg=m)
    assert not got.present["rest"][1] and got.present["demographics"][1]  # codes 0 are missing
    assert not got.present["symptoms"][2] and not any(got.present[m][6] for m in bundle.order)


def test_other_hosts_values_that_python_refuses_are_missing_in_the_graph(heart):
    """A host that does not validate (another language) still gets missing for NaN, +-inf and missing codes."""
    sess = ort.InferenceSession(str(heart.bundle / "preprocess.onnx"), providers=["CPUExecutionProvider"])
    b = load_bundle(heart.bundle, trust_key=heart.public_key)
    n = 4
    feed = {column_input(c): (np.full(n, "", dtype=object) if b.preprocessor.columns[c]["kind"] == "categorical"
                              else np.full(n, np.nan)) for c in b.schema.input_columns}
    feed["col.chol"] = np.array([np.inf, -np.inf, 0.0, 250.0])  # 0: heart's missing code for chol
    x, mask = sess.run(["x.rest", "mask.rest"], feed)
    assert mask[:, 0].tolist() == [False, False, False, True]
    assert np.isfinite(x).all() and (x[:3] == 0).all() and x[3].any()


def _portable_run(bundle_dir, rows, columns_of):
    """Run portable.onnx with plain onnxruntime, fed from the manifest's column list alone."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    spec = manifest["portable"]
    sess = ort.InferenceSession(str(bundle_dir / spec["file"]), providers=["CPUExecutionProvider"])
    feed = {}
    for e in spec["inputs"]:
        v = columns_of[e["column"]]
        feed[e["name"]] = np.asarray(v, dtype=object if e["type"] == "string" else np.float64)
    outs = sess.run(list(spec["outputs"].values()), feed)
    masks = dict(zip(spec["masks"], sess.run(list(spec["masks"].values()), feed)))
    S, n = len(spec["steps"]) + 1, len(rows)
    res = {}
    for (task, _), o in zip(spec["outputs"].items(), outs):
        o = o.reshape(S, n, -1).astype(np.float64)
        info = spec["tasks"][task]
        if info["kind"] == "binary":
            o = o[..., 0]
        elif info["kind"] == "regression":
            o = o[..., 0] * info["std"] + info["mean"]
        res[task] = o
    return spec, res, masks


@pytest.mark.parametrize("name", ["heart", "support2", "weather", "odd"])
def test_the_portable_model_from_raw_columns_equals_the_python_runtime(name, request):
    fx = request.getfixturevalue(name)
    path, key, df = (fx.bundle, fx.public_key, fx.df)
    b = load_bundle(path, trust_key=key)
    rows = df.sample(120, random_state=2).to_dict("records")
    rng = np.random.default_rng(3)
    for r in rows:  # whole modalities and single values missing, as at a clinic
        for m in b.order:
            if rng.random() < 0.3:
                for c in b.schema.modalities[m]:
                    r[c] = None
    expected = b.predict(rows, explain=True)
    parsed = b.preprocessor.parse(table(rows, b.schema.input_columns), on_error="collect")
    spec, got, masks = _portable_run(path, rows, parsed.columns)
    assert spec["steps"] == b.order and [e["column"] for e in spec["inputs"]] == list(b.schema.input_columns)
    ok = expected.ok
    assert ok.sum() > 100
    for t in b.tasks:
        np.testing.assert_allclose(got[t][-1][ok], expected.values[t][ok], atol=1e-6, rtol=0)
        for k, step in enumerate(expected.trajectory):
            np.testing.assert_allclose(got[t][k][ok], step.values[t][ok], atol=1e-6, rtol=0, err_msg=step.name)
    for m, step in zip(b.order, expected.trajectory[1:]):
        np.testing.assert_array_equal(masks[m][ok, 0], step.applied[ok])


def test_the_portable_model_is_a_valid_onnx_model(heart):
    onnx = pytest.importorskip("onnx")
    for f in ("portable.onnx", "preprocess.onnx"):
        onnx.checker.check_model(onnx.load(str(heart.bundle / f)), full_check=True)


def _resign(bundle_dir, manifest, private_key):
    from mmn_fed.export import load_private_key, sign_bundle

    (bundle_dir / "manifest.json").write_bytes(canonical_json(manifest))
    sign_bundle(bundle_dir, load_private_key(private_key))


def test_a_bundle_without_shipped_graphs_builds_the_same_graph(heart, tmp_path):
    """Bundles exported before the graphs were shipped load and predict the same (the graph is built from
    their signed statistics)."""
    old = shutil.copytree(heart.bundle, tmp_path / "old")
    m = json.loads((old / "manifest.json").read_text())
    for f in ("preprocess.onnx", "portable.onnx"):
        (old / f).unlink()
        del m["files"][f]
    del m["modules"]["preprocess"], m["portable"]
    _resign(old, m, heart.private_key)
    new_b, old_b = (load_bundle(p, trust_key=heart.public_key) for p in (heart.bundle, old))
    assert new_b.preprocess_shipped and not old_b.preprocess_shipped
    assert old_b._pre_graph == (heart.bundle / "preprocess.onnx").read_bytes()
    rows = NASTY_HEART + heart.df.head(50).to_dict("records")
    a, b = new_b.predict(rows, explain=True), old_b.predict(rows, explain=True)
    for t in a.tasks:
        np.testing.assert_array_equal(a.values[t], b.values[t])
    assert a.reasons == b.reasons


def test_a_preprocessing_graph_for_other_columns_is_refused(heart, tmp_path):
    bad = shutil.copytree(heart.bundle, tmp_path / "bad")
    m = json.loads((bad / "manifest.json").read_text())
    m["modules"]["preprocess"]["inputs"] = m["modules"]["preprocess"]["inputs"][::-1]
    _resign(bad, m, heart.private_key)
    with pytest.raises(BundleError, match="do not match the manifest's columns"):
        load_bundle(bad, trust_key=heart.public_key)
    m["modules"]["preprocess"]["inputs"] = "col.age"
    _resign(bad, m, heart.private_key)
    with pytest.raises(BundleError, match="modules.preprocess"):
        load_bundle(bad, trust_key=heart.public_key)


def test_odd_corners_predict_as_training_encodes(odd):
    """Opset 12, a modality without features, a text missing code in a numeric column, a lone surrogate."""
    b = load_bundle(odd.bundle, trust_key=odd.public_key)
    assert b.dims["extra"] == 0 and b.manifest["opset"] == 12
    spec = {e["column"]: e for e in b.manifest["portable"]["inputs"]}
    assert spec["age (yrs).1"]["missing"] == ["unk"]  # for other hosts: text that means missing
    rows = [{"age (yrs).1": "unk", 'sëx, "q"': "Male", "never": "x"}, {"age (yrs).1": -1, "cp": "asymptomatic"},
            {'sëx, "q"': "\ud800", "age (yrs).1": 50}, {"never": "seen now"}]
    t = table(rows, b.schema.input_columns)
    want, got = b.preprocessor.encode(t, on_error="collect"), b.encode(t)
    for m in b.order:
        np.testing.assert_array_equal(got.features[m], want.features[m])
        np.testing.assert_array_equal(got.present[m], want.present[m])
    p = b.predict(rows)
    assert p.ok.tolist() == [True, True, True, False]  # the last: an unknown category only, nothing present
    assert "unknown category" in p.warnings[2] and p.used[0] == "demographics"
