"""Centralized training time and peak memory, MultiModN vs P-Fusion, on the built-in datasets.

    python benchmarks/bench_train.py [--dataset heart] [--seeds 3]

Wall time covers preprocessing fit, encoding and training with early stopping (default config, 1 thread).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="heart")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    df, schema = load_builtin(args.dataset)
    print(f"{args.dataset}: {len(df)} rows, {len(schema.modalities)} modalities, tasks {list(schema.tasks)}")
    times = {}
    for kind in ("multimodn", "pfusion"):
        t = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            r = train_centralized(df, schema, ModelConfig(kind=kind), TrainConfig(seed=seed))
            t.append(time.perf_counter() - t0)
        times[kind] = t
        print(f"{kind:<10} {np.mean(t):6.2f} s per run (min {min(t):.2f}, max {max(t):.2f}); "
              f"epochs run: {len(r.fit_info['history'])}")
    print(f"MultiModN / P-Fusion time ratio: {np.mean(times['multimodn']) / np.mean(times['pfusion']):.2f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
