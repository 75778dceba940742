"""Secure aggregation's cost per round against plaintext per-module averaging, on heart-sized modules.

The model is MultiModN built for `heart` (all tasks, the app's default state/hidden sizes); the 4 real
hospitals are the sites, each sending the modules it holds with its real per-module counts. Updates are
the initial weights plus noise (cost does not depend on the values). Prints time (whole round, all four
sites' client work run one after another in this process, and the server's part alone) and bytes per
round, plaintext vs secure, without and with one site dropping after it shared its keys.

    python benchmarks/bench_security.py [--state-size 32 --hidden 32 --repeats 20] [--rounds 5]

Then the whole federation (real ServerApp and ClientApps, in-process engine, all of heart's rows, 1 local
epoch): wall time per round, plaintext vs secure aggregation (``--rounds 0`` skips it).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mmn_fed import load_builtin
from mmn_fed.data import encode, fit_preprocessor
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.modules import module_of
from mmn_fed.training import module_counts
from server.aggregation import SiteUpdate, aggregate_modules, params_nbytes
from server.secagg import run_round


def heart_setup(state_size: int, hidden: int):
    df, schema = load_builtin("heart")
    sites = {str(n): g.reset_index(drop=True) for n, g in df.groupby(schema.site_column)}
    prep = fit_preprocessor(schema, list(sites.values()))
    torch.manual_seed(0)
    model = build_from_preprocessor(prep, ModelConfig(state_size=state_size, hidden=hidden))
    g = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    params, counts = {}, {}
    for s, rows in sites.items():
        c = {m: float(n) for m, n in module_counts(model, encode(prep, rows)).items() if n > 0}
        counts[s] = c
        params[s] = {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in g.items() if module_of(k) in c}
    return g, params, counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the whole-federation comparison (0: skip)")
    args = ap.parse_args(argv)
    g, params, counts = heart_setup(args.state_size, args.hidden)
    n_values = sum(v.size for v in g.values())
    print(f"heart MultiModN (state {args.state_size}, hidden {args.hidden}): {len(g)} tensors, {n_values} values, "
          f"{len({module_of(k) for k in g})} modules; sites: " + ", ".join(f"{s} ({len(c)} modules)" for s, c in counts.items()))

    ups = [SiteUpdate(s, params[s], counts[s]) for s in sorted(params)]
    t = time.perf_counter()
    for _ in range(args.repeats):
        aggregate_modules(g, ups)
    plain_t = (time.perf_counter() - t) / args.repeats
    plain_up = sum(params_nbytes(p) for p in params.values())
    plain_down = sum(params_nbytes({k: g[k] for k in p}) for p in params.values())
    print(f"\n{'':34s}{'time/round':>12s}{'server part':>13s}{'bytes up':>12s}{'bytes down':>12s}")
    print(f"{'plaintext per-module FedAvg':34s}{plain_t * 1e3:10.2f}ms{plain_t * 1e3:11.2f}ms{plain_up:12d}{plain_down:12d}")

    for label, drop in [("secure aggregation", {}), ("secure, 1 site drops mid-round", {"Switzerland": "masked"})]:
        totals, res, srv = [], None, None
        clock = {"sites": 0.0, "server": 0.0}
        for r in range(args.repeats):
            t = time.perf_counter()
            res, srv = run_round(g, params, counts, server_round=r, drop=drop, min_holders=1, timings=clock)
            totals.append(time.perf_counter() - t)
        down = srv.bytes_down + sum(params_nbytes({k: g[k] for k in p}) for s, p in params.items() if s not in drop)
        print(f"{label:34s}{np.median(totals) * 1e3:10.2f}ms{clock['server'] / args.repeats * 1e3:11.2f}ms"
              f"{srv.bytes_up:12d}{down:12d}")
        plain, _ = aggregate_modules(g, [u for u in ups if u.site not in drop])
        err = max(float(np.max(np.abs(res.averaged(g)[k] - plain[k]))) for k in g)
        print(f"{'':34s}sites' part {clock['sites'] / args.repeats * 1e3:.2f} ms (all 4 together); "
              f"max |secure - plaintext| = {err:.1e}")
    print("\nbytes up: plaintext = float32 parameters; secure = keys + encrypted shares + uint64 masked vectors + "
          "unmask shares. bytes down: the sites' modules of the global model (both) + relayed keys and shares (secure).")
    if args.rounds:
        federation_time(args.rounds, args.state_size, args.hidden)


def federation_time(rounds: int, state_size: int, hidden: int) -> None:
    import tempfile
    from pathlib import Path

    import clients.app as A
    from server import app as server_app
    from server.engines import write_site_data
    from server.engines.inprocess import InProcessGrid, server_context

    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    sites = {str(n): g.reset_index(drop=True) for n, g in df.groupby(schema.site_column)}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_site_data(Path(tmp) / "data", sites, schema)
        print(f"\nwhole federation, in-process engine, heart's 4 hospitals, {rounds} rounds x 1 local epoch:")
        runs = [("warm-up", False), ("plaintext", False), ("secure aggregation", True), ("plaintext", False),
                ("secure aggregation", True)]
        for i, (label, secure) in enumerate(runs):
            rc = {"num-server-rounds": rounds, "seed": 0, "data-dir": str(data), "run-dir": str(Path(tmp) / str(i)),
                  "local-epochs": 1, "state-size": state_size, "hidden": hidden, "secure-aggregation": secure}
            grid = InProcessGrid(A.app, [{"partition-id": i, "num-partitions": 4} for i in range(4)], rc)
            t = time.perf_counter()
            server_app.app(grid, server_context(rc))
            wall = time.perf_counter() - t
            if label != "warm-up":
                print(f"  {label:20s} {wall:6.1f} s in all, {wall / rounds:5.2f} s per round (incl. setup and evaluation)")


if __name__ == "__main__":
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    main()
