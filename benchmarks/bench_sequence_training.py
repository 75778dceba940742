"""Training time per (subject, step) of time-series MultiModN (GRU encoders, every-encoder loss: the defaults)
next to the recurrent baseline (``mmn_fed.sequences.RecurrentBaseline``), on synthetic sequences of 10, 100 and
1,000 steps with the same number of (subject, step) cells (issue 11: flat in the number of steps, at most 3x the
recurrent baseline). One epoch, batches of 32 subjects, 1 thread; the median of --repeats epochs.

    python benchmarks/bench_sequence_training.py [--cells 20000] [--steps 10 100 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmn_fed import ModelConfig, TrainConfig
from mmn_fed.data import fit_preprocessor
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.sequences import (RecurrentBaseline, build_sequences, encode_sequences, make_synthetic_sequences,
                               row_schema, train_epochs_sequences)


def epoch_seconds(model, schema, data, repeats: int, every_encoder: bool) -> float:
    cfg = TrainConfig()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_epochs_sequences(model, schema, data, cfg, 1, gen, opt, every_encoder=every_encoder)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=20000, help="subjects x steps per configuration")
    ap.add_argument("--steps", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'steps':>6}{'subjects':>10}{'MultiModN us/cell':>20}{'recurrent us/cell':>20}{'ratio':>8}")
    for steps in args.steps:
        n = max(32, args.cells // steps)
        df, schema = make_synthetic_sequences(n, steps, seed=0)
        seqs = build_sequences(schema, df)
        rs = row_schema(schema)
        prep = fit_preprocessor(rs, seqs.steps)
        data = encode_sequences(prep, seqs, schema.timeseries.step_modalities)
        torch.manual_seed(0)
        mmn = build_from_preprocessor(prep, ModelConfig(encoder="gru"))
        rnn = RecurrentBaseline(prep.modality_dims, {t: prep.task_out_dim(t) for t in rs.tasks},
                                schema.timeseries.step_modalities)
        cells = n * steps
        a = epoch_seconds(mmn, rs, data, args.repeats, True) / cells * 1e6
        b = epoch_seconds(rnn, rs, data, args.repeats, False) / cells * 1e6
        print(f"{steps:>6}{n:>10}{a:>20.1f}{b:>20.1f}{a / b:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
