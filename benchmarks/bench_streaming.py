"""Streaming at the edge (issue 11): the p50 latency of one state update next to recomputing the patient's whole
history, and the bytes of a stored patient state.

A pbcseq model (a few epochs; accuracy is not the point here) is exported as a bundle and run by
``edge_runtime.streaming.Stream`` on ONNX Runtime. For histories of H steps: "update" = ``Stream.update`` with
the new step + ``predict``; "recompute" = ``Stream.replay`` of all H steps (what a runtime without a stored state
must do at every visit). Steps cycle through pbcseq's real visits.

    python benchmarks/bench_streaming.py [--steps 10 100 1000] [--repeats 200]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_runtime.bundle import load_bundle
from edge_runtime.streaming import Stream
from mmn_fed import ModelConfig, TrainConfig, load_builtin
from mmn_fed.export import export_bundle
from mmn_fed.sequences import build_sequences, train_sequences


def p50(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--encoder", default="gru", choices=["gru", "mlp"], help="the time-series default is gru")
    args = ap.parse_args()
    torch.set_num_threads(1)
    df, schema = load_builtin("pbcseq")
    seqs = build_sequences(schema, df)
    res = train_sequences(seqs, schema, ModelConfig(encoder=args.encoder), TrainConfig(epochs=3))
    with tempfile.TemporaryDirectory() as tmp:
        export_bundle(res.trained, Path(tmp) / "b")
        stream = Stream(load_bundle(Path(tmp) / "b", allow_unsigned=True))
        visits = seqs.steps.to_dict("records")
        static = visits[0]
        print(f"state size {stream.state_size} floats; stored JSON state "
              f"{len(stream.start(static).to_json().encode())} bytes")
        print(f"encoder {args.encoder}")
        print(f"{'history':>8}{'update + predict, p50':>24}{'recompute history, p50':>26}{'ratio':>8}  state")
        for h in args.steps:
            obs = [{**visits[i % len(visits)], "day": float(i)} for i in range(h)]
            state, _ = stream.replay(static, obs[:-1])
            upd = p50(lambda: stream.predict(stream.update(state, obs[-1])), args.repeats)
            rec = p50(lambda: stream.replay(static, obs), max(3, args.repeats // max(1, h // 10)))
            norm = float(np.linalg.norm(state.state))
            print(f"{h:>8}{upd * 1e3:>21.3f} ms{rec * 1e3:>23.2f} ms{rec / upd:>7.0f}x  |s| = {norm:.3g}"
                  f"{'' if np.isfinite(norm) else ' (NOT finite: the state diverged)'}", flush=True)


if __name__ == "__main__":
    main()
