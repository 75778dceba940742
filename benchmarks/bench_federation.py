"""Federated MultiModN on `heart` with its 4 real hospitals as sites (issue 3's figures).

1. Accuracy, 5 seeds: federated (per-module FedAvg, in-process engine) vs centralized vs local-only MultiModN,
   AUROC on the disease task on FLamby's pooled test patients (and per hospital). Train = every other patient
   (with missing values), as in benchmarks/accuracy.py.
2. Cost: 4 sites x 20 rounds, in-process engine and Ray's simulation engine: wall time and peak memory.
3. Communication: parameter bytes per round, per-module subsets vs whole-model FedAvg.

    python benchmarks/bench_federation.py [--seeds 5] [--rounds 20] [--local-epochs 1] [--skip-ray]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import flamby_split  # noqa: E402  (FLamby's exact test patients)

from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized  # noqa: E402
from mmn_fed.data import encode  # noqa: E402
from mmn_fed.evaluation import predict_final  # noqa: E402
from mmn_fed.metrics import auroc, mean_ci  # noqa: E402
from server.engines import run_federation  # noqa: E402


# sites train on all their rows (no validation split, so no keep-best or early stopping: a fixed budget of
# rounds), as when docs/federation.md's figures were measured
NO_VAL = {"val_fraction": 0.0, "keep_best": False, "patience_rounds": 0}


def heart_split():
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    tr, te, inc_tr, _ = flamby_split(df)
    train = df.loc[np.concatenate([tr, inc_tr])].reset_index(drop=True)
    test = df.loc[te].reset_index(drop=True)
    by_site = lambda d: {str(n): g.reset_index(drop=True) for n, g in d.groupby("dataset")}  # noqa: E731
    return schema, train, test, by_site(train), by_site(test)


def score(trained, frames: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Disease AUROC pooled ('all') and per hospital."""
    out = {}
    pooled = pd.concat(list(frames.values()), ignore_index=True)
    for name, d in {"all": pooled, **frames}.items():
        p = predict_final(trained.model, encode(trained.preprocessor, d), trained.preprocessor.targets)["disease"]
        y = (d["num"] > 0).to_numpy()
        out[name] = auroc(y, p) if 0 < y.sum() < len(y) else float("nan")
    return out


def fmt(vals) -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "n/a"
    m, lo, hi = mean_ci(vals)
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def accuracy(args, workdir: Path) -> None:
    schema, train, test, sites, tests = heart_split()
    print(f"train {len(train)} rows at {', '.join(f'{k} {len(v)}' for k, v in sites.items())}; "
          f"test {len(test)} (FLamby) at {', '.join(f'{k} {len(v)}' for k, v in tests.items())}")
    res: dict[str, list[dict]] = {"federated": [], "centralized": []}
    local: dict[str, list[dict]] = {s: [] for s in sites}
    secs: dict[str, list[float]] = {"federated": [], "centralized": [], "local": []}
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        fed = run_federation(sites, schema, rounds=args.rounds, seed=seed, run_dir=workdir / f"fed{seed}",
                             local_epochs=args.local_epochs, lr=args.lr, mu=args.mu, **NO_VAL)
        secs["federated"].append(time.perf_counter() - t0)
        res["federated"].append(score(fed.trained, tests))
        t0 = time.perf_counter()
        cen = train_centralized(train, schema, ModelConfig(), TrainConfig(seed=seed))
        secs["centralized"].append(time.perf_counter() - t0)
        res["centralized"].append(score(cen.trained, tests))
        for s, d in sites.items():
            t0 = time.perf_counter()
            loc = train_centralized(d, schema, ModelConfig(), TrainConfig(seed=seed))
            secs["local"].append(time.perf_counter() - t0)
            local[s].append(score(loc.trained, tests))
        print(f"seed {seed}: federated {res['federated'][-1]['all']:.3f}  centralized {res['centralized'][-1]['all']:.3f}  "
              f"local {' '.join(s + ':' + format(local[s][-1]['all'], '.3f') for s in sites)}", flush=True)
    cols = ["all", *tests]
    print(f"\nDisease AUROC on FLamby's test patients, mean [95% CI] over {args.seeds} seeds "
          f"(federated: {args.rounds} rounds x {args.local_epochs} local epochs, lr {args.lr}, mu {args.mu})")
    print(f"{'model (trained on)':<34}" + "".join(f"{('pooled' if c == 'all' else c):>24}" for c in cols) + f"{'s/run':>8}")
    rows = [("federated MultiModN (4 sites)", res["federated"], secs["federated"]),
            ("centralized MultiModN (pooled)", res["centralized"], secs["centralized"])]
    rows += [(f"local-only MultiModN ({s})", local[s], secs["local"]) for s in sites]
    for name, rs, ss in rows:
        print(f"{name:<34}" + "".join(f"{fmt([r[c] for r in rs]):>24}" for c in cols) + f"{np.mean(ss):>8.1f}")
    gap = np.mean([r["all"] for r in res["federated"]]) - np.mean([r["all"] for r in res["centralized"]])
    print(f"\nfederated - centralized (pooled): {gap:+.3f}  (target >= -0.02)")


# ---- cost ------------------------------------------------------------------------------------

def _rss_of(pattern_pids) -> int:
    total = 0
    for pid in pattern_pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _flower_pids(since: float) -> list[int]:
    """Processes of Flower/Ray started after ``since`` (boot-relative seconds): the engine's processes."""
    hz = 100
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            start = int((d / "stat").read_text().rsplit(")", 1)[1].split()[19]) / hz
        except (OSError, IndexError, ValueError):
            continue
        if start >= since and any(k in cmd for k in ("flower-", "flwr", "ray", "raylet", "gcs_server")):
            out.append(int(d.name))
    return out


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def cost(args, workdir: Path) -> dict:
    schema, train, test, sites, tests = heart_split()
    out = {}
    # in-process: in a fresh interpreter, so its peak RSS is the federation's alone
    code = ("import json,resource,time,sys; sys.path.insert(0,'benchmarks'); import bench_federation as b;"
            "from server.engines import run_federation; schema,train,test,sites,tests=b.heart_split(); t0=time.perf_counter();"
            f"r=run_federation(sites,schema,rounds={args.rounds},seed=0,run_dir='{workdir / 'cost_inproc'}',local_epochs={args.local_epochs},**{NO_VAL!r});"
            "print(json.dumps({'seconds':time.perf_counter()-t0,'peak_rss':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024,"
            "'comm':r.comm,'rounds':len(r.history)}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    inproc = json.loads(res.stdout.strip().splitlines()[-1])
    out["inprocess"] = inproc
    print(f"\nin-process engine, 4 sites x {args.rounds} rounds x {args.local_epochs} local epochs: "
          f"{inproc['seconds']:.1f} s wall, peak RSS {inproc['peak_rss'] / 2**20:.0f} MiB (one process)")
    if not args.skip_ray:
        since, peak, stop = _uptime() - 1, [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_of(_flower_pids(since)))
                time.sleep(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        ray = run_federation(sites, schema, rounds=args.rounds, seed=0, run_dir=workdir / "cost_ray", engine="ray",
                             local_epochs=args.local_epochs, **NO_VAL)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        a = torch.load(workdir / "cost_inproc" / "model.pt", weights_only=True)["state_dict"]
        b = ray.trained.model.state_dict()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        out["ray"] = {"seconds": wall, "peak_rss": peak[0], "max_weight_diff_vs_inprocess": diff}
        print(f"Ray simulation engine (flwr run, 2 CPUs), same run: {wall:.1f} s wall (incl. SuperLink + Ray start), "
              f"peak RSS summed over Flower/Ray processes {peak[0] / 2**20:.0f} MiB; "
              f"max |w_ray - w_inprocess| = {diff:.1e}")
    comm = pd.DataFrame(inproc["comm"])
    tr = comm[comm.phase == "train"]
    per_round = tr.groupby(["round", "direction"])[["bytes", "fedavg_bytes"]].sum().groupby("direction").mean()
    print("\nparameter bytes per training round (all sites), per-module subsets vs whole-model FedAvg:")
    for d, r in per_round.iterrows():
        print(f"  {d:>4}: {r.bytes / 1024:8.1f} KiB  vs  {r.fedavg_bytes / 1024:8.1f} KiB  ({r.bytes / r.fedavg_bytes:.0%})")
    per_site = tr[tr.direction == "up"].groupby("site")[["bytes", "fedavg_bytes"]].mean()
    for s, r in per_site.iterrows():
        print(f"  up from {s:<14} {r.bytes / 1024:7.1f} KiB vs {r.fedavg_bytes / 1024:7.1f} KiB")
    return out


def comm_disjoint(args, workdir: Path) -> None:
    """Bytes when sites hold different modalities (heart with imaging only at Cleveland, exercise ECG not at
    Switzerland): where per-module federation saves traffic."""
    schema, train, test, sites, tests = heart_split()
    sites = {k: v.copy() for k, v in sites.items()}
    for s, d in sites.items():
        if s != "Cleveland":
            d[list(schema.modalities["imaging"])] = np.nan
        if s == "Switzerland":
            d[list(schema.modalities["exercise_ecg"])] = np.nan
    r = run_federation(sites, schema, rounds=2, seed=0, run_dir=workdir / "disjoint", local_epochs=1, **NO_VAL)
    tr = pd.DataFrame(r.comm)
    tr = tr[(tr.phase == "train") & (tr["round"] == 1)]
    print("\nsites holding different modalities (imaging only at Cleveland; no exercise ECG at Switzerland), one round:")
    for _, x in tr[tr.direction == "up"].iterrows():
        print(f"  up from {x.site:<14} {x.bytes / 1024:7.1f} KiB vs {x.fedavg_bytes / 1024:7.1f} KiB  ({x.bytes / x.fedavg_bytes:.0%})")
    print(f"  total per round: {tr.bytes.sum() / 1024:.1f} KiB vs whole-model FedAvg {tr.fedavg_bytes.sum() / 1024:.1f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mu", type=float, default=0.0)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_fed_") as tmp:
        workdir = Path(tmp)
        if not args.skip_accuracy:
            accuracy(args, workdir)
        cost(args, workdir)
        comm_disjoint(args, workdir)


if __name__ == "__main__":
    main()
