"""Time series (issue 11): MultiModN over visits vs a landmark logistic regression, on pbcseq.

Task: death or liver transplant within 2 years of each visit (undefined when follow-up ends earlier without the
event), predicted at every visit. 5 patient splits (2/3 train, 1/3 test, by patient; split k uses seed k). Per
split: MultiModN (``mmn_fed.sequences.train_sequences`` defaults: GRU encoders, loss after every encoder; 20% of
the training patients held out for early stopping) and the
landmark logistic regression (each visit's values, static columns, missing indicators, standardized; C by 5-fold
inner CV on the training visits), both scored by AUROC over the test visits, with a 95% bootstrap CI over test
PATIENTS (all visits of a resampled patient together); over splits: the mean paired difference MultiModN - LR
with a percentile-bootstrap CI. Target: mean paired difference >= 0.

    python benchmarks/bench_timeseries.py [--splits 5] [--epochs 150] [--federated 3] [--recurrent] [--pfusion-window 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from splits import Split, logistic_regression  # noqa: E402

from mmn_fed import ModelConfig, TrainConfig, load_builtin  # noqa: E402
from mmn_fed.metrics import auroc, mean_ci  # noqa: E402
from mmn_fed.sequences import (RecurrentBaseline, build_sequences, encode_sequences, fit_sequences,  # noqa: E402
                               predict_steps, row_schema, split_subjects, train_sequences)

TRAIN_FRACTION = 2 / 3


def cluster_bootstrap(groups: np.ndarray, y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int = 1000,
                      seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of each score's AUROC and of their difference (first - second), resampling
    patients (with all their visits)."""
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    names = list(scores)
    reps = {k: [] for k in names + ["difference"]}
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if len(np.unique(y[idx])) < 2:
            continue
        vals = {k: auroc(y[idx], s[idx]) for k, s in scores.items()}
        for k, v in vals.items():
            reps[k].append(v)
        reps["difference"].append(vals[names[0]] - vals[names[1]])
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in reps.items()}


def run_split(k: int, schema, seqs, args) -> dict:
    ts = schema.timeseries
    rs = row_schema(schema)
    task = next(iter(schema.tasks))
    rng = np.random.default_rng(k)
    perm = rng.permutation(len(seqs.ids))
    n_train = int(round(TRAIN_FRACTION * len(perm)))
    train_all, test = perm[:n_train], perm[n_train:]
    whole, b = seqs.subjects(train_all), seqs.subjects(test)
    t0 = time.perf_counter()
    res_mmn = train_sequences(whole, schema, ModelConfig(), TrainConfig(epochs=args.epochs, seed=k + args.seed_offset,
                                                                        lr=args.lr, missingness=args.missingness))
    sec = time.perf_counter() - t0
    model, prep, info = res_mmn.trained.model, res_mmn.trained.preprocessor, res_mmn.fit_info
    test_data = encode_sequences(prep, b, ts.step_modalities)
    p_mmn = predict_steps(model, test_data, prep.targets, rs)[task]
    ok = test_data.rows.y_present[task].numpy()
    y = test_data.rows.y[task].numpy()[ok].astype(int)
    split = Split("pbcseq", rs, whole.steps, b.steps, {}, "")
    p_lr = logistic_regression(split)(b.steps)
    scores = {"mmn": p_mmn[ok], "lr": np.asarray(p_lr)[ok]}
    groups = b.steps[ts.id].to_numpy()[ok]
    ci = cluster_bootstrap(groups, y, scores, seed=k)
    res = {"split": k, "mmn": auroc(y, scores["mmn"]), "lr": auroc(y, scores["lr"]), "ci": ci,
           "test_visits": int(ok.sum()), "test_patients": len(test), "epochs": len(info["history"]),
           "best_epoch": info["best_epoch"], "seconds": sec}
    res["difference"] = res["mmn"] - res["lr"]
    if args.recurrent:  # the recurrent baseline, same harness: same preprocessing, validation subjects, training
        keep, val = split_subjects(len(whole.ids), 0.2, k)
        torch.manual_seed(k)
        rnn = RecurrentBaseline(prep.modality_dims, {t: prep.task_out_dim(t) for t in rs.tasks}, ts.step_modalities)
        fit_sequences(rnn, rs, prep.targets, encode_sequences(prep, whole.subjects(keep), ts.step_modalities),
                      encode_sequences(prep, whole.subjects(val), ts.step_modalities),
                      TrainConfig(epochs=args.epochs, seed=k, lr=args.lr))
        res["recurrent"] = auroc(y, predict_steps(rnn, test_data, prep.targets, rs)[task][ok])
    if args.pfusion_window:  # P-Fusion over a window (mmn_fed.pfusion_window), same harness as MultiModN
        pf = train_sequences(whole, schema, ModelConfig(kind="pfusion", pfusion_window=args.pfusion_window),
                             TrainConfig(epochs=args.epochs, seed=k, lr=args.lr)).trained
        p_pf = predict_steps(pf.model, encode_sequences(pf.preprocessor, b, ts.modalities), pf.preprocessor.targets,
                             rs)[task]
        res["pfusion"] = auroc(y, p_pf[ok])
    if args.federated:  # the same training patients in IID sites (by patient), default federation settings
        import tempfile

        from server.engines import run_federation
        from simulations.sites import iid

        site_of = dict(zip(whole.ids, iid(len(whole.ids), args.federated, k)))
        rows = df_of(seqs, train_all)
        sites = {str(s): g.drop(columns="__site").reset_index(drop=True)
                 for s, g in rows.assign(__site=rows[ts.id].map(site_of)).groupby("__site")}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            fed = run_federation(sites, schema, seed=k, run_dir=Path(tmp) / "run", lr=args.lr)
        fed_model = fed.trained
        p_fed = predict_steps(fed_model.model, encode_sequences(fed_model.preprocessor, b, ts.step_modalities),
                              fed_model.preprocessor.targets, rs)[task]
        res["federated"] = auroc(y, p_fed[ok])
        res["fed_rounds"] = fed.extra["selection"]["rounds_run"]
        res["fed_seconds"] = time.perf_counter() - t0
    return res


def df_of(seqs, subjects) -> "pd.DataFrame":
    """The input rows (visits) of some subjects: their step rows with the step-table columns dropped."""
    steps = seqs.subjects(subjects).steps
    return steps.drop(columns=[c for c in steps.columns if c.endswith("__target") or c in ("step_time", "source_row")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=150, help="most epochs (early stopping, patience 20)")
    ap.add_argument("--lr", type=float, default=TrainConfig().lr, help="learning rate (default: the setting's)")
    ap.add_argument("--missingness", default=TrainConfig().missingness, choices=["auto", "correct", "off"],
                    help="MultiModN's missingness setting (default: the setting's; auto balances the visit rate)")
    ap.add_argument("--seed-offset", type=int, default=0, help="MultiModN's training seed is split + this (the "
                                                                 "splits stay the same): the seed-to-seed spread")
    ap.add_argument("--recurrent", action="store_true", help="also the recurrent baseline (a GRU over steps with masks)")
    ap.add_argument("--pfusion-window", type=int, default=0, metavar="W",
                    help="also P-Fusion over a window (mmn_fed.pfusion_window): each step's last observed value of "
                         "every variable within W steps and a missing indicator per variable")
    ap.add_argument("--federated", type=int, default=0, metavar="SITES",
                    help="also federate the training patients over this many IID sites (default settings)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    df, schema = load_builtin("pbcseq")
    seqs = build_sequences(schema, df)
    task = next(iter(schema.tasks))
    print(f"pbcseq: {len(seqs.ids)} patients, {len(seqs.steps)} visits; task {task} (labelled visits "
          f"{int(seqs.steps[task + '__target'].notna().sum())})")
    out = []
    for k in range(args.splits):
        r = run_split(k, schema, seqs, args)
        out.append(r)
        ci = r["ci"]
        print(f"  split {k}: MultiModN {r['mmn']:.3f} [{ci['mmn'][0]:.3f}, {ci['mmn'][1]:.3f}]  landmark LR "
              f"{r['lr']:.3f} [{ci['lr'][0]:.3f}, {ci['lr'][1]:.3f}]  difference {r['difference']:+.3f} "
              f"[{ci['difference'][0]:+.3f}, {ci['difference'][1]:+.3f}]  ({r['test_visits']} test visits of "
              f"{r['test_patients']} patients; {r['epochs']} epochs, best {r['best_epoch']}, {r['seconds']:.0f} s)",
              flush=True)
        if "recurrent" in r:
            print(f"           recurrent baseline: {r['recurrent']:.3f} (MultiModN - recurrent "
                  f"{r['mmn'] - r['recurrent']:+.3f})", flush=True)
        if "pfusion" in r:
            print(f"           P-Fusion window {args.pfusion_window}: {r['pfusion']:.3f} (MultiModN - P-Fusion "
                  f"{r['mmn'] - r['pfusion']:+.3f})", flush=True)
        if "federated" in r:
            print(f"           federated over {args.federated} IID sites: {r['federated']:.3f} ({r['fed_rounds']} rounds, "
                  f"{r['fed_seconds']:.0f} s); federated - centralized {r['federated'] - r['mmn']:+.3f}", flush=True)
    if out and "recurrent" in out[0]:
        m, lo, hi = mean_ci([r["mmn"] - r["recurrent"] for r in out])
        print(f"recurrent baseline {np.mean([r['recurrent'] for r in out]):.3f}; MultiModN - recurrent: {m:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}]")
    if out and "pfusion" in out[0]:
        m, lo, hi = mean_ci([r["mmn"] - r["pfusion"] for r in out])
        print(f"P-Fusion window {np.mean([r['pfusion'] for r in out]):.3f}; MultiModN - P-Fusion: {m:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}]")
    if out and "federated" in out[0]:
        m, lo, hi = mean_ci([r["federated"] - r["mmn"] for r in out])
        print(f"federated - centralized MultiModN: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]; federated - LR: "
              f"{np.mean([r['federated'] - r['lr'] for r in out]):+.3f}")
    m, lo, hi = mean_ci([r["difference"] for r in out])
    print(f"MultiModN {np.mean([r['mmn'] for r in out]):.3f}, landmark LR {np.mean([r['lr'] for r in out]):.3f} "
          f"(means over {len(out)} splits)")
    print(f"mean paired difference MultiModN - LR: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (bootstrap over splits) -> "
          f"{'met' if m >= 0 else 'NOT met'} (>= 0)")


if __name__ == "__main__":
    main()
