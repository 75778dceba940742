"""Choosing the time-series defaults without test rows (issue 11): on pbcseq, inside each benchmark split's
TRAINING patients only (bench_timeseries.py's splits), a dev split (1/3 of them) scores variants of MultiModN next
to the landmark logistic regression fitted on the other 2/3. The test patients of bench_timeseries.py are never
read.

    python benchmarks/explore_timeseries.py [--splits 3] [--variants base gru elapsed ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timeseries import TRAIN_FRACTION  # noqa: E402
from splits import Split, logistic_regression  # noqa: E402

from edge_runtime.schema import Schema  # noqa: E402
from mmn_fed import ModelConfig, TrainConfig, load_builtin  # noqa: E402
from mmn_fed.data import fit_preprocessor  # noqa: E402
from mmn_fed.metrics import auroc, mean_ci  # noqa: E402
from mmn_fed.model_io import build_from_preprocessor  # noqa: E402
from mmn_fed.sequences import build_sequences, encode_sequences, fit_sequences, predict_steps, row_schema  # noqa: E402

VARIANTS = {  # name -> (ModelConfig overrides, TrainConfig overrides, schema change)
    "base": ({}, {}, None),
    "gru": ({"encoder": "gru"}, {}, None),
    "lr1e-3": ({}, {"lr": 1e-3}, None),
    "patience40": ({}, {"patience": 40}, None),
    "state64": ({"state_size": 64, "hidden": 64}, {}, None),
    "since-first": ({}, {}, "since-first"),  # days since the first visit, as a modality of the benchmark's own
    "elapsed": ({}, {}, "elapsed"),  # [timeseries] elapsed = true: the time since the previous visit
    "gru+every+elapsed": ({"encoder": "gru"}, {}, "every+elapsed"),  # the defaults, with elapsed = true
    "no-dropout": ({"dropout": 0.0}, {}, None),
    "wd1e-4": ({}, {"weight_decay": 1e-4}, None),
    "every-encoder": ({}, {}, "every"),  # the loss also at the state after each encoder within a step
    "gru+every": ({"encoder": "gru"}, {}, "every"),
    "gru+every+wd1e-2": ({"encoder": "gru"}, {"weight_decay": 1e-2}, "every"),
    "gru+every+drop0.3": ({"encoder": "gru", "dropout": 0.3}, {}, "every"),
    "gru+every+small": ({"encoder": "gru", "state_size": 16, "hidden": 16}, {}, "every"),
    "gru+every+lr1e-2": ({"encoder": "gru"}, {"lr": 1e-2}, "every"),
    "gru+lr1e-2": ({"encoder": "gru"}, {"lr": 1e-2}, None),
    "mlp+every+lr1e-2": ({}, {"lr": 1e-2}, "every"),
    "gru+every+lr3e-2": ({"encoder": "gru"}, {"lr": 3e-2}, "every"),
    "gru+every+lr1e-2+p40": ({"encoder": "gru"}, {"lr": 1e-2, "patience": 40}, "every"),
    "gru+every+lr1e-2+b16": ({"encoder": "gru"}, {"lr": 1e-2, "batch_subjects": 16}, "every"),
}


def with_since_first(schema: Schema, df):
    """Days since the patient's first visit as one more dynamic modality (encoded at every step)."""
    raw = schema.to_dict()
    raw["modalities"].insert(1, {"name": "since_first", "columns": ["since_first"]})
    raw["timeseries"]["modalities"] = ["since_first"] + raw["timeseries"]["modalities"]
    df = df.copy()
    df["since_first"] = df["day"] - df.groupby("id")["day"].transform("min")
    return Schema.from_dict(raw), df


def with_elapsed(schema: Schema, df):
    """The schema key ``[timeseries] elapsed = true`` (the time since the previous visit, derived by
    build_sequences)."""
    raw = schema.to_dict()
    raw["timeseries"]["elapsed"] = True
    return Schema.from_dict(raw), df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    df0, schema0 = load_builtin("pbcseq")
    task = next(iter(schema0.tasks))
    res: dict[str, list[float]] = {v: [] for v in args.variants + ["LR no indicators", "landmark LR"]}
    for k in range(args.splits):
        perm = np.random.default_rng(k).permutation(len(build_sequences(schema0, df0).ids))
        train_all = perm[: int(round(TRAIN_FRACTION * len(perm)))]  # bench_timeseries.py's training patients
        inner = np.random.default_rng(100 + k).permutation(train_all)
        n_dev = len(inner) // 3
        dev, fit_all = inner[:n_dev], inner[n_dev:]
        n_val = int(round(0.2 * len(fit_all)))
        for v in args.variants:
            mc, tc, change = VARIANTS[v]
            change = change or ""
            schema, df = (with_since_first(schema0, df0) if change == "since-first" else
                          with_elapsed(schema0, df0) if change.endswith("elapsed") else (schema0, df0))
            seqs = build_sequences(schema, df)
            rs = row_schema(schema)
            a, val, d = seqs.subjects(fit_all[n_val:]), seqs.subjects(fit_all[:n_val]), seqs.subjects(dev)
            prep = fit_preprocessor(rs, a.steps)
            torch.manual_seed(k)
            model = build_from_preprocessor(prep, ModelConfig(**mc))
            dyn = schema.timeseries.step_modalities
            tc = dict(tc)
            batch = tc.pop("batch_subjects", 32)
            fit_sequences(model, rs, prep.targets, encode_sequences(prep, a, dyn), encode_sequences(prep, val, dyn),
                          TrainConfig(**{"epochs": 150, "seed": k, **tc}), batch_subjects=batch,
                          every_encoder=change.startswith("every"))
            dd = encode_sequences(prep, d, dyn)
            ok = dd.rows.y_present[task].numpy()
            y = dd.rows.y[task].numpy()[ok].astype(int)
            res[v].append(auroc(y, predict_steps(model, dd, prep.targets, rs)[task][ok]))
            if v == args.variants[0]:
                both = seqs.subjects(fit_all)
                split = Split("pbcseq", rs, both.steps, d.steps, {}, "")
                p = logistic_regression(split)(d.steps)
                res["landmark LR"].append(auroc(y, np.asarray(p)[ok]))
                p = logistic_regression(split, indicators=False)(d.steps)  # what the indicators are worth
                res["LR no indicators"].append(auroc(y, np.asarray(p)[ok]))
            print(f"  split {k} {v:<12} dev AUROC {res[v][-1]:.3f}", flush=True)
        print(f"  split {k} landmark LR   dev AUROC {res['landmark LR'][-1]:.3f}", flush=True)
    lr, first = res["landmark LR"], res[args.variants[0]]
    print(f"\n{'variant':<18}{'dev AUROC':>10}{'minus LR, paired [95% CI]':>34}"
          f"{f'minus {args.variants[0]}, paired':>34}")
    for v, a in res.items():
        d = mean_ci([x - y for x, y in zip(a, lr)])
        f = mean_ci([x - y for x, y in zip(a, first)])
        print(f"{v:<18}{np.mean(a):>10.3f}{d[0]:>+12.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"
              f"{f[0]:>+12.3f} [{f[1]:+.3f}, {f[2]:+.3f}]")


if __name__ == "__main__":
    main()
