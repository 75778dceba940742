"""The JavaScript host (edge_runtime/js/mmn-edge.mjs) in a real headless Chromium with onnxruntime-web, against the
Python runtime: the same predictions and per-step trajectories (1e-5) on real exported bundles (heart, support2)
over rows with missing values, whole modalities missing, unknown categories, decimals and categories written
"1.0"; and a tampered portable graph, a wrong trust key and a bundle without a portable graph are refused.

Everything is served by one ThreadingHTTPServer on 127.0.0.1 (port 0, in a thread, stopped by its fixture):
the bundles, mmn-edge.mjs and onnxruntime-web's dist/ from edge_runtime/js/node_modules (`npm ci --prefix
edge_runtime/js`; .ci/run installs it). Without it the tests skip locally and fail in CI, like Chromium.
"""
import functools
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

JS_DIR = Path(__file__).resolve().parents[2] / "edge_runtime" / "js"
ORT_DIST = JS_DIR / "node_modules" / "onnxruntime-web" / "dist"
ORT_MODULE = "ort.wasm.min.mjs"  # the WebAssembly (CPU) build: it loads ort-wasm-simd-threaded.{mjs,wasm}
TOL = 1e-5


@pytest.fixture(scope="session", autouse=True)  # autouse, session: checked before any model is trained
def ort_dist() -> Path:
    if not (ORT_DIST / ORT_MODULE).is_file():
        why = (f"onnxruntime-web is not installed in {JS_DIR / 'node_modules'}: run "
               "`npm ci --prefix edge_runtime/js --ignore-scripts --no-audit --no-fund` (.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(why)
        print(why)
        pytest.skip(why)
    return ORT_DIST


# ---- a static server with a few mounts ----------------------------------------------------------------

class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json", ".onnx": "application/octet-stream",
                      ".sig": "application/octet-stream", ".html": "text/html"}

    def __init__(self, *args, mounts: dict, **kwargs):
        self.mounts = mounts
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        """/<mount>/<file>: a file under that mount's directory only (no traversal); else a path that 404s."""
        parts = [p for p in unquote(urlsplit(path).path).split("/") if p]
        root = self.mounts.get(parts[0]) if parts else None
        if root is None or any(p in (".", "..") or "\\" in p for p in parts[1:]):
            return "/nonexistent/404"
        return str(Path(root, *parts[1:]))

    def log_message(self, *args):  # quiet
        pass


class StaticServer:
    def __init__(self, tmp: Path):
        page = tmp / "page"
        page.mkdir()
        (page / "index.html").write_text("<!doctype html><meta charset=utf-8><title>mmn-edge.mjs</title>")
        self.mounts = {"page": page, "js": JS_DIR, "ort": ORT_DIST}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, mounts=self.mounts))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def mount(self, name: str, directory: Path) -> str:
        self.mounts[name] = Path(directory)
        return f"{self.url}/{name}/"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(ort_dist, tmp_path):
    s = StaticServer(tmp_path)
    try:
        yield s
    finally:
        s.stop()


# Runs in the page: import onnxruntime-web and mmn-edge.mjs, load each bundle, predict or report the refusal.
PAGE_JS = """async ({ort_url, module_url, jobs}) => {
  const ort = await import(ort_url);
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmPaths = new URL('./', ort_url).href;
  const { loadBundle } = await import(module_url);
  const results = [];
  for (const job of jobs) {
    try {
      const key = job.key ? new Uint8Array(job.key) : null;
      const b = await loadBundle(job.url, { ort, trustKey: key });
      results.push({ signed: b.signed, stepNames: b.stepNames, out: job.rows ? await b.predict(job.rows) : null });
    } catch (e) {
      results.push({ error: String(e && e.message || e) });
    }
  }
  return results;
}"""


def run_page(page, errors, server, jobs):
    page.goto(f"{server.url}/page/index.html")
    results = page.evaluate(PAGE_JS, {"ort_url": f"{server.url}/ort/{ORT_MODULE}",
                                      "module_url": f"{server.url}/js/mmn-edge.mjs", "jobs": jobs})
    assert not errors, errors
    return results


def raw_key(public_key_path: Path) -> list[int]:
    from cryptography.hazmat.primitives import serialization

    from edge_runtime.trust import load_public_key

    pub = load_public_key(public_key_path)
    return list(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def require_portable(bundle: Path) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "portable" in manifest, f"{bundle}: export wrote no manifest['portable'] (the portable graph)"
    assert manifest["portable"]["file"] in manifest["files"]
    return manifest


# ---- bundles -------------------------------------------------------------------------------------------

def csv_text(v) -> str:
    """A value as a CSV cell holds it: '' for missing; floats keep their decimals ('145.0')."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v)


MISSING_WORDS = ["", "NA", "na", "N/A", "NaN", "null", "None", "?", "  ", " n/a "]


def messy_rows(df, schema, count: int, seed: int) -> list[dict]:
    """``count`` real rows as CSV text, then damaged at random: cells missing in assorted spellings (or the key
    absent), whole modalities missing, numbers padded and given decimals, integral categories as '1.0'."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, r in df.sample(n=count, random_state=seed).iterrows():
        row = {c: csv_text(r[c]) for c in schema.input_columns}
        for m, cols in schema.modalities.items():
            if rng.random() < 0.2:  # the whole modality missing
                for c in cols:
                    row[c] = str(rng.choice(MISSING_WORDS))
                continue
            for c in cols:
                u = rng.random()
                if u < 0.12:
                    row[c] = str(rng.choice(MISSING_WORDS))
                elif u < 0.16:
                    del row[c]
                elif u < 0.3 and row[c] and c not in schema.categorical:
                    row[c] = f" {float(row[c]):.4f} "  # decimals and padding
                elif u < 0.4 and row[c] and c in schema.categorical and row[c].lstrip("-").isdigit():
                    row[c] = f"{row[c]}.0"  # '1' written '1.0'
        if not any(row.get(c, "").strip() for c in schema.input_columns):  # keep at least one value
            c = schema.input_columns[0]
            row[c] = csv_text(r[c]) or "1"
        rows.append(row)
    return rows


def heart_rows(heart) -> list[dict]:
    from mmn_fed import load_builtin

    _, schema = load_builtin("heart")
    crafted = [
        {"age": "63.0", "sex": "Male", "cp": "typical angina", "trestbps": "145.0", "chol": "233.0", "fbs": "True",
         "restecg": "lv hypertrophy", "thalch": "150.0", "exang": "False", "oldpeak": "2.3", "slope": "downsloping",
         "ca": "0.0", "thal": "fixed defect"},
        {"age": 54, "sex": " Female ", "cp": "", "trestbps": "NA", "chol": "0", "fbs": False, "thalch": " 160.50 "},
        {"age": "41", "sex": "Male", "cp": "levitating angina", "thal": "unheard-of defect", "ca": "N/A"},  # unknowns
        {"age": "", "sex": "NA", "cp": "asymptomatic", "oldpeak": "1.0E0", "slope": "flat", "exang": "TRUE"},
        {"sex": "male", "cp": "non-anginal", "chol": "  ", "thalch": "?", "ca": "2"},  # 'male': unknown (case)
        {"trestbps": "0", "chol": "0", "fbs": "True", "restecg": "normal"},  # missing codes: rest from fbs/restecg
        {"exang": "True"},  # one modality only
        {"age": "nAn", "sex": "null", "cp": "None", "trestbps": "?", "chol": "n/a", "fbs": "", "restecg": "",
         "thalch": "", "exang": "", "oldpeak": "", "slope": "", "ca": "", "thal": ""},  # nothing: not predicted
        {"age": "abc", "sex": "Male", "cp": "asymptomatic"},  # not a number: not predicted
    ]
    return crafted + messy_rows(heart.df, schema, 24, seed=1)


def support2_rows(df) -> list[dict]:
    from mmn_fed import load_builtin

    _, schema = load_builtin("support2")
    crafted = [
        {"num_age": "62.84998", "fac_sex": "male", "fac_diabetes": "1.0", "fac_dementia": "0.0", "fac_ca": "no",
         "num_meanbp": "97.0", "num_hrt": " 69 ", "fac_income": "missing", "fac_race": "white"},
        {"num_age": 70.5, "fac_diabetes": 1, "fac_dementia": " 0 ", "fac_dzgroup": "Coma", "num_crea": "1.19995117"},
        {"fac_sex": "female", "fac_diabetes": "1.00", "fac_race": "martian", "fac_income": "NA",  # '1.00', unknown
         "num_wblc": "", "num_sod": "141.0", "num_adlp": "7.0"},
        {"fac_dzgroup": "Lung Cancer", "fac_dzclass": "Cancer", "fac_diabetes": "2.0", "num_num_co": "2"},  # '2': unknown
        {"num_bili": "0.19998169", "num_ph": "7.459961"},  # labs only
    ]
    return crafted + messy_rows(df, schema, 24, seed=2)


def python_reference(bundle: Path, public_key: Path, rows: list[dict]):
    from edge_runtime import load_bundle

    return load_bundle(bundle, trust_key=public_key).predict(rows, explain=True)


def assert_parity(name: str, manifest: dict, py, js: dict, rows: list[dict]):
    assert "error" not in js, f"{name}: {js.get('error')}"
    assert js["signed"] is True
    assert js["stepNames"] == [s.name for s in py.trajectory]
    assert js["stepNames"] == ["prior"] + [f"+{x}" for x in manifest["portable"]["steps"]]
    out = js["out"]
    assert len(out) == len(rows)
    assert py.ok.sum() >= len(rows) - 3  # the rows are meant to be predicted, bar the crafted refusals
    for i, (row, o) in enumerate(zip(rows, out)):
        where = f"{name} row {i} {row}"
        if not py.ok[i]:  # the same rows are not predicted (no value at all, a value that is not a number)
            assert o.get("error"), f"{where}: Python refused it ({py.reasons[i]}) but JS predicted {o}"
            assert all(o[t] is None for t in py.tasks), where
            continue
        assert not o.get("error"), f"{where}: {o.get('error')}"
        assert o["used"] == [x for x in manifest["portable"]["steps"] if x in py.used[i].split("+")], where
        for t in py.tasks:
            np.testing.assert_allclose(np.asarray(o[t], dtype=float), py.values[t][i], rtol=0, atol=TOL,
                                       err_msg=f"{where}, task {t}")
            traj = np.array([s.values[t][i] for s in py.trajectory], dtype=float)
            np.testing.assert_allclose(np.asarray(o["steps"][t], dtype=float), traj, rtol=0, atol=TOL,
                                       err_msg=f"{where}, task {t}, trajectory")


# ---- tests ---------------------------------------------------------------------------------------------

def odd_rows(odd) -> list[dict]:
    crafted = [{"age (yrs).1": "unk", 'sëx, "q"': "Male", "cp": "asymptomatic"},  # a text missing code
               {"age (yrs).1": " UNK ", "thalch": "150"}, {"age (yrs).1": "-1", "chol": "200", "never": "x"},
               {"never": "seen now", "constructor": "1"}]  # nothing known: refused
    return crafted + [{c: csv_text(v) for c, v in r.items() if c != "never"}
                      for r in odd.df.sample(12, random_state=4).to_dict("records")]


def test_javascript_host_matches_the_python_runtime(heart, support2, weather, odd, server, browser_page):
    from mmn_fed import load_builtin

    page, errors = browser_page
    s2_bundle, s2_pub, s2_df = support2.bundle, support2.public_key, support2.df  # conftest.py
    cases = {"heart": (heart.bundle, heart.public_key, heart_rows(heart)),
             "support2": (s2_bundle, s2_pub, support2_rows(s2_df)),  # multiclass, string missing codes
             "weather": (weather.bundle, weather.public_key,  # regression
                         messy_rows(weather.df, load_builtin("nycflights13_weather")[1], 20, seed=3)),
             "odd": (odd.bundle, odd.public_key, odd_rows(odd))}  # opset 12, no-feature modality, odd names
    manifests = {name: require_portable(b) for name, (b, _, _) in cases.items()}
    jobs = [{"url": server.mount(name, b), "key": raw_key(pub), "rows": rows} for name, (b, pub, rows) in cases.items()]
    results = run_page(page, errors, server, jobs)
    for (name, (b, pub, rows)), js in zip(cases.items(), results):
        assert_parity(name, manifests[name], python_reference(b, pub, rows), js, rows)


def test_javascript_host_refuses_tampered_and_untrusted_bundles(heart, server, browser_page, tmp_path):
    page, errors = browser_page
    manifest = require_portable(heart.bundle)
    portable = manifest["portable"]["file"]
    tampered = Path(shutil.copytree(heart.bundle, tmp_path / "tampered"))
    data = bytearray((tampered / portable).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of the portable graph
    (tampered / portable).write_bytes(bytes(data))
    old = Path(shutil.copytree(heart.unsigned, tmp_path / "old"))  # as exported before the portable graph
    m = json.loads((old / "manifest.json").read_text())
    m.pop("portable", None)
    (old / "manifest.json").write_text(json.dumps(m))
    key = raw_key(heart.public_key)
    jobs = [{"url": server.mount("tampered", tampered), "key": key},
            {"url": server.mount("good", heart.bundle), "key": raw_key(heart.other_public_key)},
            {"url": server.mount("unsigned", heart.unsigned), "key": key},
            {"url": server.mount("old", old), "key": None},
            {"url": server.mount("good2", heart.bundle), "key": key}]
    tampered_r, wrong_key, unsigned, too_old, good = run_page(page, errors, server, jobs)
    assert "sha256" in tampered_r.get("error", ""), tampered_r
    assert "signature" in wrong_key.get("error", ""), wrong_key
    assert "unsigned" in unsigned.get("error", ""), unsigned
    assert "mmn-fed export" in too_old.get("error", ""), too_old
    assert good.get("signed") is True, good  # the untouched bundle loads: the refusals above are the damage's
