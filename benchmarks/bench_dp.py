"""Client-side differential privacy on `heart`: accuracy vs privacy budget.

    python benchmarks/bench_dp.py [--rounds 10] [--clip 0.5] [--multipliers 0,0.1,0.5,2,8] [--seeds 0]

Federates MultiModN over the 4 hospitals (in-process engine) with per-module clipping + Gaussian noise at each
site, and prints the pooled test AUROC (disease) and the epsilon spent at delta 1e-5 (RDP accountant).
Noise is drawn from OS entropy, so figures vary a little between runs.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mmn_fed import load_builtin
from mmn_fed.training import split_indices
from server.engines import run_federation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--multipliers", default="0,0.1,0.5,2,8")
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round logs would drown the table
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    train, test = {}, {}
    for name, g in df.groupby("dataset"):
        g = g.reset_index(drop=True)
        keep, held = split_indices(len(g), 0.3, 0, (g["num"] > 0).astype(str).to_numpy())
        train[name], test[name] = g.iloc[keep], g.iloc[held]
    print(f"heart, 4 hospitals, {args.rounds} rounds, clip {args.clip}, delta 1e-5")
    print(f"{'noise multiplier':>16} {'pooled AUROC':>13} {'epsilon':>12}")
    for mult in [float(m) for m in args.multipliers.split(",")]:
        aucs, eps = [], []
        for seed in [int(s) for s in args.seeds.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                kw = {"dp_noise_multiplier": mult, "dp_clip": args.clip, "dp_delta": 1e-5} if mult > 0 else {}
                res = run_federation(train, schema, rounds=args.rounds, seed=seed, run_dir=Path(tmp) / "run",
                                     test_sites=test, val_fraction=0.0, keep_best=False, patience_rounds=0, **kw)  # as docs/security.md measured
            rec = pd.DataFrame(res.records)
            sel = rec[(rec.site == "all") & (rec.state == "final") & (rec.combination == "all") & (rec.metric == "auroc")
                      & (rec.get("split", "test") != "validation")]
            aucs.append(float(sel.value.iloc[0]))
            eps.append(max((h.get("train", {}) or {}).get("dp_epsilon", 0.0) or 0.0 for h in res.history))
        e = np.mean(eps)
        print(f"{mult:>16g} {np.mean(aucs):>13.3f} {('inf (no DP)' if mult == 0 else f'{e:,.1f}'):>12}")


if __name__ == "__main__":
    main()
