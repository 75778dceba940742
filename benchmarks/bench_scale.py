"""Federation at scale, in-process engine (issue 14): overhead per site-round, memory, batch size vs split.

One cohort (synthetic, ``mmn_fed.data.make_synthetic``, or a built-in dataset) is split IID into N sites
(4, 16, 64, 256 by default) and federated for a few rounds with a fixed budget (no early stopping). Per N:

- seconds per round (the server's round wall time: train + evaluate messages), the sites' local training
  time (``train_epochs``) and local evaluation time, both measured in the same run by wrapping them;
- overhead per site-round = (round time - local training - local evaluation) / sites, in ms (and the strict
  figure, (round time - local training) / sites, which also counts the evaluation's forward pass);
- optimizer steps per round (summed over sites, and per site), the auto batch size, test AUROC of the final
  model on 20% held-out rows (the same rows for every N);
- RSS after every round, peak RSS of the process, and what the site cache holds (``clients.cache.stats``).

    python benchmarks/bench_scale.py                              # 20k synthetic rows, 4/16/64/256 sites, 5 rounds
    python benchmarks/bench_scale.py --rows 1000000 --sites 64 --rounds 3   # big cohort
    python benchmarks/bench_scale.py --dataset support2 --sites 4 16 64 --rounds 20   # steps + AUROC vs split
    python benchmarks/bench_scale.py --batch-rule pooled             # one batch size for every split
    python benchmarks/bench_scale.py --early-stopping --rounds 100   # the default stopping instead of a fixed budget
    python benchmarks/bench_scale.py --heart-seeds 5                 # heart, default settings, AUROC per seed
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clients.site as site_mod  # noqa: E402
import server.app as server_app  # noqa: E402
from mmn_fed.data import encode, load_builtin, make_synthetic  # noqa: E402
from mmn_fed.evaluation import predict_final  # noqa: E402
from mmn_fed.metrics import auroc  # noqa: E402
from server.engines import run_federation  # noqa: E402

FIXED = {"keep_best": False, "patience_rounds": 0}  # a fixed budget of rounds


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Probe:
    """Times the sites' local training and evaluation per round, counts optimizer steps, samples RSS per round."""

    def __init__(self):
        self.round = 0
        self.train_s: dict[int, float] = {}
        self.eval_s: dict[int, float] = {}
        self.cpu: dict[str, dict[int, float]] = {"round": {}, "train": {}, "eval": {}}  # CPU seconds of this process
        self.round_s: dict[int, float] = {}
        self.steps: dict[int, int] = {}
        self.site_steps: dict[int, list[int]] = {}
        self.batch: set[int] = set()
        self.rss: list[float] = []
        self._orig = (site_mod.Site.train, site_mod.train_epochs, site_mod.evaluate, server_app.save_checkpoint,
                      server_app.train_phase, server_app.aggregate_round, server_app.evaluate_phase)

    def _add(self, kind: str, wall: float, cpu: float) -> None:
        d = {"train": self.train_s, "eval": self.eval_s, "round": self.round_s}[kind]
        d[self.round] = d.get(self.round, 0.0) + wall
        self.cpu[kind][self.round] = self.cpu[kind].get(self.round, 0.0) + cpu

    def install(self):
        site_train, train_epochs, evaluate, save_ckpt, train_phase, aggregate_round, evaluate_phase = self._orig
        probe = self

        def timed(phase):  # a round's wall = its train phase (which also scores the previous round's model) +
            def run(*a, **kw):  # its aggregation (+ the final evaluate phase after the last round)
                rnd = a[2] if phase is not aggregate_round else a[1]
                probe.round = rnd
                t, c = time.perf_counter(), time.process_time()
                out = phase(*a, **kw)
                probe.round = rnd
                probe._add("round", time.perf_counter() - t, time.process_time() - c)
                return out
            return run

        def train(self_, prep, prep_key, model_config, settings, params, server_round, *a, **kw):
            probe.round = server_round
            return site_train(self_, prep, prep_key, model_config, settings, params, server_round, *a, **kw)

        def timed_train(model, schema, data, config, *a, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = train_epochs(model, schema, data, config, *a, **kw)
            probe._add("train", time.perf_counter() - t, time.process_time() - c)
            probe.steps[probe.round] = probe.steps.get(probe.round, 0) + out["steps"]
            probe.site_steps.setdefault(probe.round, []).append(out["steps"])
            from mmn_fed.training import resolve_batch_size
            probe.batch.add(resolve_batch_size(config.batch_size, len(data)))
            return out

        def timed_eval(*a, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = evaluate(*a, **kw)
            probe._add("eval", time.perf_counter() - t, time.process_time() - c)
            return out

        def ckpt(*a, **kw):
            save_ckpt(*a, **kw)
            probe.rss.append(rss_mib())

        (site_mod.Site.train, site_mod.train_epochs, site_mod.evaluate, server_app.save_checkpoint,
         server_app.train_phase, server_app.aggregate_round, server_app.evaluate_phase) = \
            (train, timed_train, timed_eval, ckpt, timed(train_phase), timed(aggregate_round), timed(evaluate_phase))

    def uninstall(self):
        (site_mod.Site.train, site_mod.train_epochs, site_mod.evaluate, server_app.save_checkpoint,
         server_app.train_phase, server_app.aggregate_round, server_app.evaluate_phase) = self._orig


def cohort(args):
    if args.dataset == "synthetic":
        df, schema = make_synthetic(args.rows, missing_rate=0.2, seed=args.seed)
        schema = schema.subset(tasks=["outcome"])
    else:
        df, schema = load_builtin(args.dataset)
        if args.rows:
            df = df.sample(n=min(args.rows, len(df)), random_state=args.seed).reset_index(drop=True)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(df))
    n_test = int(0.2 * len(df)) if args.auroc else 0
    test, train = df.iloc[perm[:n_test]].reset_index(drop=True), df.iloc[perm[n_test:]].reset_index(drop=True)
    return schema, train, test


def first_task_auroc(trained, schema, test) -> float:
    task = next(iter(schema.tasks.values()))
    p = predict_final(trained.model, encode(trained.preprocessor, test), trained.preprocessor.targets)[task.name]
    data = encode(trained.preprocessor, test)
    mask = data.y_present[task.name].numpy()
    y = data.y[task.name].numpy()[mask]
    if task.kind == "multiclass":
        y = (y > 0).astype(int)
        p = 1 - p[mask][:, 0] if p.ndim == 2 else p[mask]
    else:
        p = p[mask]
    return auroc(y, p)


def cache_stats() -> dict:
    try:
        from clients.cache import stats
    except ImportError:  # before clients.cache existed (the baseline)
        import clients.app as app
        return {"sites": len(app._SITES), "models": 0, "mib": float("nan")}
    return stats()


def run(args, n_sites: int, schema, train, test, workdir: Path) -> dict:
    parts = np.array_split(np.random.default_rng(args.seed + 1).permutation(len(train)), n_sites)
    sites = {f"site{i:03d}": train.iloc[np.sort(p)].reset_index(drop=True) for i, p in enumerate(parts)}
    probe = Probe()
    probe.install()
    gc.collect()
    rss0 = rss_mib()
    try:
        t0 = time.perf_counter()
        res = run_federation(sites, schema, rounds=args.rounds, seed=args.seed, run_dir=workdir / f"n{n_sites}",
                             local_epochs=args.local_epochs, batch_size=args.batch_size,
                             **({} if args.early_stopping else FIXED))
        wall = time.perf_counter() - t0
    finally:
        probe.uninstall()
    cached = cache_stats()
    rounds = [h["round"] for h in res.history]
    sec = np.array([probe.round_s[r] for r in rounds])
    tr = np.array([probe.train_s.get(r, 0.0) for r in rounds])
    ev = np.array([probe.eval_s.get(r, 0.0) for r in rounds])
    cpu = {k: np.array([probe.cpu[k].get(r, 0.0) for r in rounds]) for k in probe.cpu}
    out = {"sites": n_sites, "wall": wall, "round_s": sec.mean(), "round_s_last": sec[1:].mean() if len(sec) > 1 else sec.mean(),
           "train_s": tr.mean(), "eval_s": ev.mean(),
           "overhead_ms": 1000 * (sec - tr - ev).mean() / n_sites,
           "overhead_ms_after1": 1000 * (sec[1:] - tr[1:] - ev[1:]).mean() / n_sites if len(sec) > 1 else float("nan"),
           "strict_ms": 1000 * (sec - tr).mean() / n_sites,
           "cpu_ms": 1000 * (cpu["round"] - cpu["train"] - cpu["eval"]).mean() / n_sites,
           "steps": np.mean([probe.steps.get(r, 0) for r in rounds]),
           "site_steps": np.mean([np.mean(probe.site_steps.get(r, [0])) for r in rounds]),
           "batch": sorted(probe.batch), "rounds": len(rounds),
           "total_steps": sum(probe.steps.values()), "rss": probe.rss, "rss0": rss0, "peak": peak_mib(), "cache": cached}
    if args.auroc:
        out["auroc"] = first_task_auroc(res.trained, schema, test)
    return out


def heart(seeds: int) -> None:
    """Disease AUROC on FLamby's heart test patients, federated over the 4 real hospitals with the default settings
    (validation split, keep-best, early stopping), per seed: run it on two versions of the code and pair the seeds."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_federation import heart_split, score
    schema, _, _, sites, tests = heart_split()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            t0 = time.perf_counter()
            res = run_federation(sites, schema, seed=seed, run_dir=Path(tmp) / f"h{seed}")
            out.append(score(res.trained, tests)["all"])
            print(f"heart seed {seed}: AUROC {out[-1]:.4f}, {len(res.history)} rounds, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    print("heart AUROC per seed:", " ".join(f"{v:.4f}" for v in out), f"mean {np.mean(out):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="synthetic", help="synthetic or a built-in dataset (split IID into sites)")
    ap.add_argument("--rows", type=int, default=20000, help="synthetic: rows; built-in: subsample (0 = all)")
    ap.add_argument("--sites", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=0, help="0 = auto (the default rule)")
    ap.add_argument("--batch-rule", choices=("site", "pooled"), default="site",
                    help="with --batch-size 0: site = the default (each site's auto batch, from its own rows); pooled = "
                         "every site uses the auto batch of the pooled training rows (the same for any split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-auroc", dest="auroc", action="store_false", help="skip the held-out test AUROC")
    ap.add_argument("--early-stopping", action="store_true",
                    help="the default stopping (validation split, keep-best, patience 10) with --rounds as the most rounds")
    ap.add_argument("--heart-seeds", type=int, default=0,
                    help="instead: heart's 4 hospitals with the default settings, disease AUROC per seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.heart_seeds:
        return heart(args.heart_seeds)
    t0 = time.perf_counter()
    schema, train, test = cohort(args)
    if args.batch_rule == "pooled" and not args.batch_size:
        from mmn_fed.training import resolve_batch_size
        args.batch_size = resolve_batch_size(0, int(round(len(train) * 0.8)))  # the sites' training rows, pooled
    print(f"cohort: {args.dataset}, {len(train)} training rows (+{len(test)} test), {args.rounds} rounds x "
          f"{args.local_epochs} local epoch(s), batch {'auto' if not args.batch_size else args.batch_size} "
          f"(rule: {args.batch_rule}), seed {args.seed} "
          f"({time.perf_counter() - t0:.1f} s to build)", flush=True)
    print("| sites | s/round | training s/round | local eval s/round | overhead ms/site-round (rounds 2+) | "
          "strict ms/site-round | CPU overhead ms/site-round | steps/round (per site) | batch | AUROC | RSS after each round (MiB) | peak RSS MiB | "
          "cache: sites, models, MiB | wall s |", flush=True)
    print("| --- " * 14 + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sites:
            r = run(args, n, schema, train, test, Path(tmp))
            c = r["cache"]
            print(f"| {n} | {r['round_s']:.2f} | {r['train_s']:.2f} | {r['eval_s']:.2f} | {r['overhead_ms']:.1f} "
                  f"({r['overhead_ms_after1']:.1f}) | {r['strict_ms']:.1f} | {r['cpu_ms']:.1f} | {r['steps']:.0f} ({r['site_steps']:.1f}) | "
                  f"{','.join(map(str, r['batch']))} | {r.get('auroc', float('nan')):.4f} ({r['rounds']} rounds, {r['total_steps']} steps) | "
                  f"{' '.join(f'{x:.0f}' for x in r['rss'])} | {r['peak']:.0f} | "
                  f"{c['sites']}, {c['models']}, {c['mib']:.1f} | {r['wall']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
