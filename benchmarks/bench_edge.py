"""Edge runtime benchmark on the heart model, one core, one run.

    python benchmarks/bench_edge.py [--model model.pt] [--epochs 3] [--cpu 0] [--out DIR]

Prints: batch-1 latency p50/p99 of the runtime (composed module graphs) vs one fused ONNX graph of the same
network vs PyTorch eager; throughput at batch 1024 (pre-encoded arrays, and raw rows through preprocessing);
cold start (process start to first prediction); peak RSS of `mmn-edge predict`; bundle size. The three
batch-1 variants are measured interleaved in rounds so that background load hits them alike.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edge_runtime import load_bundle
from edge_runtime.bundle import session_options
from mmn_fed import ModelConfig, TrainConfig, encode, load_builtin, load_model, train_centralized
from mmn_fed.api import save_trained
from mmn_fed.export import export_bundle, generate_keypair


class FusedNet(torch.nn.Module):
    """The same network as one function: initial state, every encoder in order, every decoder."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, *xs):
        state = self.m.init_state.unsqueeze(0).expand(xs[0].shape[0], -1)
        for name, x in zip(self.m.modalities, xs):
            state = self.m.encoders[name](state, x)
        return tuple(self.m.decoders[t](state) for t in self.m.tasks)


def fused_session(model, xs):
    buf = io.BytesIO()
    names = list(model.modalities)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FusedNet(model), xs, buf, dynamo=False, input_names=names, opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in names})
    sess = ort.InferenceSession(buf.getvalue(), session_options(), providers=["CPUExecutionProvider"])
    # It returns logits; the runtime's graphs also apply sigmoid / softmax (slightly more work).
    return sess


def timed_rounds(variants: dict, rounds: int, per_round: int) -> dict[str, np.ndarray]:
    out = {k: [] for k in variants}
    for f in variants.values():
        for _ in range(200):
            f()
    rng = np.random.default_rng(0)
    keys = list(variants)
    for _ in range(rounds):
        for k in rng.permutation(keys):  # shuffled each round: no variant always follows another
            f = variants[k]
            ts = np.empty(per_round)
            for i in range(per_round):
                t = time.perf_counter_ns()
                f()
                ts[i] = time.perf_counter_ns() - t
            out[k].append(ts)
    return {k: np.concatenate(v) / 1e3 for k, v in out.items()}  # microseconds


def throughput(f, n_rows: int, rounds: int = 15, calls: int = 20) -> tuple[float, float]:
    """(median, best) samples/s over ``rounds`` rounds of ``calls`` calls. The best round approximates an
    unloaded core; the median shows what background load leaves."""
    f()
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        rates.append(calls * n_rows / (time.perf_counter() - t0))
    return float(np.median(rates)), float(np.max(rates))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model.pt to export (default: train a small heart model)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last allowed)")
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rss-rows", type=int, default=200_000)
    args = ap.parse_args()

    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # children (cold start, CLI) inherit the one core
    torch.set_num_threads(1)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_edge_"))
    work.mkdir(parents=True, exist_ok=True)
    df, schema = load_builtin("heart")
    if args.model:
        model_path = Path(args.model)
    else:
        res = train_centralized(df, schema, ModelConfig(dropout=0.0), TrainConfig(epochs=args.epochs, seed=0))
        model_path = save_trained(work / "model.pt", res.trained)
    priv, pub = generate_keypair(work / "keys", force=True)
    bundle_dir = export_bundle(model_path, work / "bundle", sign_key=priv, force=True)
    trained = load_model(model_path)
    model = trained.model.eval()
    bundle = load_bundle(bundle_dir, trust_key=pub)
    order = bundle.order

    # ---- batch 1 (one patient with every modality), pre-encoded ----
    full = df[df[list(schema.input_columns)].notna().all(axis=1)]
    one = encode(trained.preprocessor, full.head(1), with_labels=False)
    f1 = {m: one.x[m].numpy() for m in order}
    p1 = {m: one.present[m].numpy() for m in order}
    xs1 = tuple(one.x[m] for m in order)
    fused = fused_session(model, xs1)
    feed1 = {m: f1[m] for m in order}
    fnet = FusedNet(model)

    def eager():
        with torch.no_grad():
            fnet(*xs1)

    row1 = full.head(1).to_dict("records")
    fused_raw, fused_out, run_opts = fused._sess, [o.name for o in fused.get_outputs()], ort.RunOptions()
    lat = timed_rounds({"runtime": lambda: bundle.run(f1, p1), "fused": lambda: fused.run(None, feed1),
                        "fused, raw binding": lambda: fused_raw.run(fused_out, feed1, run_opts),
                        "torch": eager, "runtime raw row": lambda: bundle.predict(row1)},
                       args.rounds, args.per_round)

    # ---- batch 1024 ----
    idx = np.arange(1024) % len(df)
    rows_df = df.iloc[idx].reset_index(drop=True)
    enc = encode(trained.preprocessor, rows_df, with_labels=False)
    fb = {m: enc.x[m].numpy() for m in order}
    pb_mixed = {m: enc.present[m].numpy() for m in order}
    pb_full = {m: np.ones(1024, dtype=bool) for m in order}
    feedb = {m: fb[m] for m in order}
    rows = rows_df.to_dict("records")
    tp = {
        "runtime, pre-encoded, all modalities": throughput(lambda: bundle.run(fb, pb_full), 1024),
        "runtime, pre-encoded, heart's missingness (masked)": throughput(lambda: bundle.run(fb, pb_mixed), 1024),
        "fused graph, pre-encoded": throughput(lambda: fused.run(None, feedb), 1024),
        "runtime, raw rows (dicts -> preprocessing -> predict)": throughput(lambda: bundle.predict(rows), 1024, 8, 3),
    }
    xsb = tuple(enc.x[m] for m in order)

    def eager_b():
        with torch.no_grad():
            fnet(*xsb)

    tp["torch eager, pre-encoded"] = throughput(eager_b, 1024)

    # ---- cold start: process start -> first prediction printed ----
    row = json.dumps({k: (None if v != v else v) for k, v in row1[0].items()}, default=str)
    code = (f"import json\nfrom edge_runtime import load_bundle\n"
            f"b = load_bundle({str(bundle_dir)!r}, trust_key={str(pub)!r})\n"
            f"p = b.predict([json.loads({row!r})])\nprint(float(p.values['disease'][0]), flush=True)\n")
    def child_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cold, cold_cpu = [], []
    for _ in range(7):
        c0, t0 = child_cpu(), time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        cold.append(time.perf_counter() - t0)
        cold_cpu.append(child_cpu() - c0)
        assert out.stdout.strip()
    one_csv = work / "one.csv"
    full.head(1).to_csv(one_csv, index=False)
    # the console script next to this interpreter (a pyenv shim on PATH adds ~0.1-0.2 s of bash + pyenv)
    local = Path(sys.executable).parent / "mmn-edge"
    mmn_edge = str(local) if local.exists() else (shutil.which("mmn-edge") or "mmn-edge")
    cli_cold, cli_cpu = [], []
    for _ in range(7):
        c0, t0 = child_cpu(), time.perf_counter()
        subprocess.run([mmn_edge, "predict", str(bundle_dir), "--trust-key", str(pub), "--input", str(one_csv),
                        "--output", str(work / "one_out.csv")], capture_output=True, check=True)
        cli_cold.append(time.perf_counter() - t0)
        cli_cpu.append(child_cpu() - c0)

    # ---- peak RSS of `mmn-edge predict` on a large CSV (measured in a fresh parent with one child) ----
    big = work / "big.csv"
    reps = -(-args.rss_rows // len(df))
    df_big = df.loc[np.tile(np.arange(len(df)), reps)[: args.rss_rows]]
    df_big.to_csv(big, index=False)
    probe = ("import resource, subprocess, sys, time\nt = time.perf_counter()\n"
             "subprocess.run(sys.argv[1:], check=True, capture_output=True)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)\n")
    cmd = [mmn_edge, "predict", str(bundle_dir), "--trust-key", str(pub), "--input", str(big),
           "--output", str(work / "big_out.csv")]
    rss_kb, cli_seconds = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                                         check=True).stdout.split()
    small_cmd = cmd[:6] + [str(one_csv), "--output", str(work / "one_out.csv")]
    rss1_kb, _ = subprocess.run([sys.executable, "-c", probe, *small_cmd], capture_output=True, text=True,
                                check=True).stdout.split()

    size = sum(p.stat().st_size for p in bundle_dir.iterdir())
    onnx_size = sum(p.stat().st_size for p in bundle_dir.glob("*.onnx"))

    # ---- report ----
    q = {k: (np.percentile(v, 50), np.percentile(v, 99)) for k, v in lat.items()}
    print(f"heart MultiModN ({len(order)} encoders, {len(bundle.tasks)} decoders, state {model.config.state_size}); "
          f"pinned to cpu {cpu}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"onnxruntime session: 1 intra-op thread, sequential, no arena, no spinning; torch threads 1")
    print("\nbatch-1 latency, one patient with all 5 modalities (µs), "
          f"{args.rounds} interleaved rounds x {args.per_round} calls")
    for k, (p50, p99) in q.items():
        print(f"  {k:<34} p50 {p50:8.1f}   p99 {p99:8.1f}")
    r_f = q["runtime"][0] / q["fused"][0]
    r_t = q["torch"][0] / q["runtime"][0]
    print(f"  runtime / fused graph (p50)        {r_f:.2f}x   (target <= 1.2x)")
    print(f"  runtime / fused, raw binding (p50) {q['runtime'][0] / q['fused, raw binding'][0]:.2f}x   "
          f"(the runtime calls the session binding directly; this is the fused graph called the same way)")
    print(f"  torch eager / runtime (p50)        {r_t:.1f}x   (target >= 5x)")
    print("  'fused' = one ONNX graph of the whole network exported from PyTorch, called via session.run;")
    print("  'runtime' = Bundle.run on pre-encoded arrays; 'raw row' = Bundle.predict([dict]): preprocessing in Python too")
    print("\nthroughput at batch 1024 (samples/s, one core)                    median of rounds    best round")
    for k, (med, best) in tp.items():
        print(f"  {k:<55} {med:12,.0f}  {best:12,.0f}")
    print("\ncold start (process start -> first prediction, s)    wall median   wall min   CPU (user+sys) median")
    print(f"  python -c 'load_bundle(verify) + predict one row'   {np.median(cold):8.3f}   {min(cold):8.3f}   "
          f"{np.median(cold_cpu):8.3f}")
    print(f"  mmn-edge predict, 1-row CSV (whole command)         {np.median(cli_cold):8.3f}   {min(cli_cold):8.3f}   "
          f"{np.median(cli_cpu):8.3f}   [{mmn_edge}]")
    print("\npeak RSS of `mmn-edge predict` (ru_maxrss of the child)")
    print(f"  {args.rss_rows:,}-row CSV: {int(rss_kb) / 1024:.1f} MiB  ({args.rss_rows / float(cli_seconds):,.0f} rows/s "
          f"end to end incl. CSV parse + write, {float(cli_seconds):.1f} s)")
    print(f"  1-row CSV: {int(rss1_kb) / 1024:.1f} MiB")
    print(f"\nbundle size: {size / 1024:.1f} KiB ({onnx_size / 1024:.1f} KiB ONNX in "
          f"{len(list(bundle_dir.glob('*.onnx')))} files + manifest + signature)")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
