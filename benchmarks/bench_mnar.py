"""MNAR robustness with DEFAULT settings, federated, next to the oracle and the P-Fusion baseline.

    python benchmarks/bench_mnar.py                           # heart, support2, then pbc (held-out check)
    python benchmarks/bench_mnar.py --datasets heart --seeds 3 --workers 2 --out runs/bench_mnar
    python benchmarks/bench_mnar.py --datasets pbcseq --seeds 5   # a time series: MNAR in time (visits)

At every training site, 80% of the positive patients lose one informative modality (heart: exercise_ecg,
support2: labs, pbc: labs); the flipped test set removes it from 80% of the negative test patients instead
(the paper's Exp. 4). pbcseq is a time series (docs/simulations.md, "Time series"): at training, the
patients without death or transplant lose 80% of their visits after the first (sicker patients are measured more
often); the flipped test thins the visits of the patients *with* the event instead; AUROC is over the test
patients' visits. Every model is federated with the default settings (``mmn_fed.settings``; only the
``model`` and ``missingness`` settings vary) through the real ServerApp/ClientApps (in-process engine):

- ``mmn auto``: MultiModN, default ``missingness = auto`` (the audit decides; it flags the MNAR modality);
- ``mmn off``: MultiModN with the correction off (shows what the correction undoes);
- ``pfusion off``: the paper's P-Fusion baseline, uncorrected;
- ``oracle``: the same model with the same settings trained on the same patients WITHOUT the injected rule,
  scored on the same flipped test rows;
- ``mmn off clean`` vs ``oracle`` on the clean test: what ``auto`` costs when no MNAR was injected (there the
  audit triggers only on the data's own missingness, e.g. pbc's cholesterol).

Prints per dataset: AUROC mean [95% percentile-bootstrap CI over seeds] on clean and flipped tests, the
per-seed paired differences and the targets (mean paired MultiModN flipped - oracle flipped >= -0.02;
auto - off on clean data without injected MNAR >= -0.01). Each run is cached in --out (re-running resumes).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mmn_fed.metrics import mean_ci

DATASETS = {  # builtin, sites, MNAR modality (None: the visits of a time series), task
    "heart": ("heart", {"by": "dataset"}, "exercise_ecg", "disease"),
    "support2": ("support2", {"iid": 4}, "labs", "death_180d"),
    "pbc": ("pbc", {"iid": 4}, "labs", "death_or_transplant"),
    "pbcseq": ("pbcseq", {"iid": 4}, None, "death_or_transplant_2y"),
}
VARIANTS = {  # name -> (fraction of MNAR at training, model, missingness)
    "mmn auto": (0.8, "multimodn", "auto"),
    "mmn off": (0.8, "multimodn", "off"),
    "pfusion off": (0.8, "pfusion", "off"),
    "oracle": (0.0, "multimodn", "auto"),
    "mmn off, no MNAR": (0.0, "multimodn", "off"),
}


def scenario(dataset: str, fraction: float):
    from simulations.scenario import Scenario

    builtin, sites, modality, task = DATASETS[dataset]
    rule = ({"modality": modality, "mechanism": "mnar", "task": task, "label": 1, "fraction": fraction} if modality
            else {"mechanism": "fewer_visits", "task": task, "label": 0, "fraction": fraction})
    return Scenario.from_dict({
        "scenario": {"name": f"bench-mnar-{dataset}"},
        "data": {"builtin": builtin, "tasks": [task]},
        "sites": sites,
        "missingness": [rule],
        "test": {"conditions": ["clean", "mnar_flipped"]},
    })


def _path(out: str, dataset: str, variant: str, seed: int) -> Path:
    return Path(out) / dataset / f"{variant.replace(' ', '_').replace(',', '')}-seed{seed}.json"


def run_one(dataset: str, variant: str, seed: int, out: str) -> dict:
    """One federated run with default settings; its AUROC on the clean and flipped test rows (0.8 flip)."""
    import logging

    import torch

    from mmn_fed.data import encode
    from mmn_fed.evaluation import predict_final
    from mmn_fed.metrics import auroc
    from server.engines import run_federation
    from simulations.runner import prepare

    path = _path(out, dataset, variant, seed)
    if path.exists():
        return json.loads(path.read_text())
    twin = _path(out, dataset, "oracle", seed)
    if variant == "mmn off, no MNAR" and twin.exists() and not json.loads(twin.read_text())["corrected"]:
        # auto corrected nothing on this data: the off run is the same computation (no draw is made)
        return {**json.loads(twin.read_text()), "variant": variant, "same_run_as": "oracle"}
    torch.set_num_threads(1)
    fraction, model, mode = VARIANTS[variant]
    sc = scenario(dataset, fraction)
    train = prepare(sc, seed)
    tests = prepare(scenario(dataset, 0.8), seed).tests  # the same test patients for every variant
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    res = run_federation(train.site_frames(), sc.schema, seed=seed, model=model, missingness=mode,
                         run_dir=path.parent / path.stem)
    task = next(iter(sc.schema.tasks))
    prep = res.trained.preprocessor
    scores = {}
    for cond, frame in tests.items():
        if sc.schema.timeseries is not None:  # every test visit
            from mmn_fed.sequences import build_sequences, encode_sequences, predict_steps

            d = encode_sequences(prep, build_sequences(sc.schema, frame), sc.schema.timeseries.step_modalities)
            p = predict_steps(res.trained.model, d, prep.targets, prep.schema)[task]
            d = d.rows
        else:
            d = encode(prep, frame)
            p = predict_final(res.trained.model, d, prep.targets)[task]
        ok = d.y_present[task].numpy()
        scores[cond] = auroc(d.y[task].numpy()[ok], p[ok])
    plan = res.trained.metadata["provenance"]["missingness"]
    rec = {"dataset": dataset, "variant": variant, "seed": seed, **scores, "corrected": plan["corrected"],
           "rounds": len(res.history), "seconds": round(time.perf_counter() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return rec


def fmt(values) -> str:
    m, lo, hi = mean_ci(values)
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def report(dataset: str, recs: list[dict], seeds: list[int]) -> None:
    by = {(r["variant"], r["seed"]): r for r in recs}
    what = (f"{DATASETS[dataset][2]} missing for 80% of positives" if DATASETS[dataset][2] else
            "80% of the later visits of the patients without the event dropped")
    print(f"\n== {dataset}: {what} at every training site; "
          f"federated, default settings, {len(seeds)} seeds (AUROC mean [95% bootstrap CI over seeds])")
    print(f"{'variant':<18} {'clean':<22} {'flipped':<22} corrected / rounds")
    for v in VARIANTS:
        rows = [by[(v, s)] for s in seeds if (v, s) in by]
        if rows:
            print(f"{v:<18} {fmt([r['clean'] for r in rows]):<22} {fmt([r['mnar_flipped'] for r in rows]):<22} "
                  f"{sorted({','.join(r['corrected']) or '-' for r in rows})} / {sorted({r['rounds'] for r in rows})}")
    pair = lambda a, b, c: [by[(a, s)][c] - by[(b, s)][c] for s in seeds if (a, s) in by and (b, s) in by]  # noqa: E731
    d_flip = pair("mmn auto", "oracle", "mnar_flipped")
    d_clean = pair("oracle", "mmn off, no MNAR", "clean")
    if d_flip:
        m = mean_ci(d_flip)[0]
        print(f"paired MultiModN flipped - oracle flipped: {fmt(d_flip)} per seed {np.round(d_flip, 3).tolist()} "
              f"-> {'met' if m >= -0.02 else 'MISSED'} (>= -0.02)")
    if d_clean:
        m = mean_ci(d_clean)[0]
        print(f"no injected MNAR, clean test, auto - off: {fmt(d_clean)} per seed {np.round(d_clean, 3).tolist()} "
              f"-> {'met' if m >= -0.01 else 'MISSED'} (>= -0.01)")
    d_pf = pair("mmn auto", "pfusion off", "mnar_flipped")
    if d_pf:
        print(f"paired MultiModN (auto) flipped - P-Fusion flipped: {fmt(d_pf)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="runs/bench_mnar")
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    jobs = [(d, v, s) for d in args.datasets for s in seeds for v in args.variants if v != "mmn off, no MNAR"]
    late = [(d, "mmn off, no MNAR", s) for d in args.datasets for s in seeds if "mmn off, no MNAR" in args.variants]
    t0 = time.perf_counter()
    recs: list[dict] = []
    with cf.ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_one, d, v, s, args.out): (d, v, s) for d, v, s in jobs}
        for i, f in enumerate(cf.as_completed(futures), 1):
            recs.append(f.result())
            print(f"\r{i}/{len(jobs) + len(late)} runs, {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
        futures = {pool.submit(run_one, d, v, s, args.out): (d, v, s) for d, v, s in late}  # after their oracle twins
        for i, f in enumerate(cf.as_completed(futures), len(jobs) + 1):
            recs.append(f.result())
            print(f"\r{i}/{len(jobs) + len(late)} runs, {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for d in args.datasets:
        report(d, [r for r in recs if r["dataset"] == d], seeds)


if __name__ == "__main__":
    main()
