"""Edge CSV throughput (issue 12, item 4): `mmn-edge predict` vs two scikit-learn peers on the same files.

    python benchmarks/bench_edge_rows.py [--rows 100000 1000000] [--cpu 0] [--out DIR]

Builds once: a heart MultiModN (a few epochs; speed does not depend on accuracy), its signed bundle, and a
scikit-learn pipeline of the same inputs (median / most-frequent imputation, standardization, one-hot,
logistic regression), also converted with skl2onnx. Then, for each file size (heart rows drawn with replacement,
written once), runs one after another, each in its own process pinned to one core with one thread:

- ``mmn-edge predict`` (the edge runtime: parse, validate, preprocess, ONNX Runtime, write);
- the pandas pipeline: ``read_csv``, ``predict_proba``, ``to_csv``;
- the same pipeline through skl2onnx and ONNX Runtime (pandas reads and writes).

Prints rows/s and peak RSS of each, and the cold start of a one-row `mmn-edge predict` (process start to output
written, median of 5). Needs scikit-learn and skl2onnx (``pip install skl2onnx``; a benchmark peer only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUMERIC = ["age", "trestbps", "chol", "thalch", "oldpeak", "ca"]
CATEGORICAL = ["sex", "cp", "fbs", "restecg", "exang", "slope", "thal"]

# Each tool runs in a fresh process and prints its peak RSS on its last line; its time is the process's wall time.
# VmHWM, not ru_maxrss: ru_maxrss keeps the pages of the (torch-holding) parent this process was forked from.
_FOOTER = """
import json
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"maxrss_mib": hwm / 1024}))
"""
_EDGE = """
import time; _t0 = time.perf_counter()
import sys
from edge_runtime.cli import main
rc = main(["predict", {bundle!r}, "--input", {input!r}, "--output", {output!r}, "--trust-key", {key!r},
           "--keep", "id"])
assert rc == 0, rc
"""
_PANDAS = """
import time; _t0 = time.perf_counter()
import pickle, pandas as pd
pipe = pickle.load(open({pipe!r}, "rb"))
df = pd.read_csv({input!r})
x = df[{numeric!r}].join(df[{categorical!r}].astype(object).where(df[{categorical!r}].notna(), "").astype(str))
p = pipe.predict_proba(x)[:, 1]
pd.DataFrame({{"id": df["id"], "disease": p}}).to_csv({output!r}, index=False)
"""
_SKL2ONNX = """
import time; _t0 = time.perf_counter()
import numpy as np, onnxruntime as ort, pandas as pd
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
sess = ort.InferenceSession({model!r}, so, providers=["CPUExecutionProvider"])
df = pd.read_csv({input!r})
feeds = {{c: df[c].to_numpy(np.float32).reshape(-1, 1) for c in {numeric!r}}}
feeds.update({{c: df[c].astype(object).where(df[c].notna(), "").astype(str).to_numpy().reshape(-1, 1)
              for c in {categorical!r}}})
out = sess.run(None, feeds)
p = np.asarray([row[1] for row in out[1]]) if isinstance(out[1], list) else out[1][:, 1]
pd.DataFrame({{"id": df["id"], "disease": p}}).to_csv({output!r}, index=False)
"""


def run_tool(code: str, cpu: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + _FOOTER], capture_output=True, text=True, env=env,
                          preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu >= 0 else None)
    if proc.returncode != 0:
        raise RuntimeError(f"tool failed:\n{proc.stderr[-3000:]}")
    # wall time from process start (interpreter and imports included) to the output written
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - t0}


def build(out: Path) -> dict:
    """The bundle, the key and the two scikit-learn peers (fitted on the heart rows)."""
    import pickle

    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
    from mmn_fed.api import save_trained
    from mmn_fed.export import export_bundle, generate_keypair

    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    res = train_centralized(df, schema, ModelConfig(), TrainConfig(epochs=3, seed=0))
    model_path = save_trained(out / "model.pt", res.trained)
    priv, pub = generate_keypair(out / "keys", force=True)
    export_bundle(model_path, out / "bundle", sign_key=priv, force=True)
    y = (df["num"] > 0).astype(int)
    cat = as_strings(df)
    pipe = Pipeline([("prep", ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), NUMERIC),
        ("cat", make_pipeline(SimpleImputer(strategy="most_frequent", missing_values=""),
                              OneHotEncoder(handle_unknown="ignore")), CATEGORICAL)])),
        ("lr", LogisticRegression(max_iter=1000))])
    train = df[NUMERIC].astype(np.float64).join(cat)
    pipe.fit(train, y)
    (out / "pipe.pkl").write_bytes(pickle.dumps(pipe))
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    types = [(c, FloatTensorType([None, 1])) for c in NUMERIC] + [(c, StringTensorType([None, 1])) for c in CATEGORICAL]
    onx = to_onnx(pipe, initial_types=types, options={LogisticRegression: {"zipmap": False}}, target_opset=17)
    (out / "pipe.onnx").write_bytes(onx.SerializeToString())
    return {"bundle": str(out / "bundle"), "key": str(pub), "pipe": str(out / "pipe.pkl"),
            "model": str(out / "pipe.onnx")}


def as_strings(df):
    """The categorical columns as strings, a blank for missing (what both peers are fed)."""
    return df[CATEGORICAL].astype(object).where(df[CATEGORICAL].notna(), "").astype(str)


def write_rows(n: int, path: Path) -> None:
    import numpy as np

    from mmn_fed import load_builtin

    df, _ = load_builtin("heart")
    idx = np.random.default_rng(0).integers(0, len(df), n)
    rows = df.iloc[idx].reset_index(drop=True)
    rows["id"] = np.arange(1, n + 1)
    rows.to_csv(path, index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=int, default=[100_000, 1_000_000])
    ap.add_argument("--cpu", type=int, default=0, help="the core every tool is pinned to (-1: no pinning)")
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_edge_rows_"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = build(out)
    print(f"built the bundle and the peers in {time.perf_counter() - t0:.0f} s ({out})", file=sys.stderr)
    one = out / "one.csv"
    write_rows(1, one)
    cold = [run_tool(_EDGE.format(bundle=built["bundle"], input=str(one), output=str(out / "one.out.csv"),
                                  key=built["key"]), args.cpu)["seconds"] for _ in range(5)]
    print(f"\n{'tool':<34} {'rows':>9} {'rows/s':>10} {'seconds':>8} {'peak RSS MiB':>13}")
    for n in args.rows:
        path = out / f"rows{n}.csv"
        if not path.exists():
            write_rows(n, path)
        tools = {
            "mmn-edge predict": _EDGE.format(bundle=built["bundle"], input=str(path), output=str(out / "edge.csv"),
                                             key=built["key"]),
            "sklearn pipeline (pandas)": _PANDAS.format(pipe=built["pipe"], input=str(path),
                                                        output=str(out / "pandas.csv"), numeric=NUMERIC,
                                                        categorical=CATEGORICAL),
            "sklearn via skl2onnx + ORT, 1 thread": _SKL2ONNX.format(model=built["model"], input=str(path),
                                                                     output=str(out / "onnx.csv"), numeric=NUMERIC,
                                                                     categorical=CATEGORICAL),
        }
        for name, code in tools.items():
            r = run_tool(code, args.cpu)
            print(f"{name:<34} {n:>9,} {n / r['seconds']:>10,.0f} {r['seconds']:>8.2f} {r['maxrss_mib']:>13.0f}")
    print(f"\none-row cold predict (mmn-edge, process start to output written): median {statistics.median(cold):.3f} s "
          f"(min {min(cold):.3f}, max {max(cold):.3f}) over 5 runs; goal < 0.3 s")
    print("goals (issue 12): mmn-edge rows/s >= the pandas pipeline's on the 1M-row file; peak RSS < 100 MB at any "
          "size")


if __name__ == "__main__":
    main()
