"""Accuracy on `heart` against the public FLamby protocol (issue 2's acceptance figures).

Test set A = FLamby's Fed-Heart-Disease test patients: rows complete in FLamby's 10 features
(slope, ca, thal dropped), each hospital split 66/34 stratified with random_state=43 (scikit-learn's
train_test_split, as FLamby does). Test set B = a stratified third of the patients FLamby drops for
missing values (Switzerland, with a single negative patient, is split unstratified).
MultiModN and P-Fusion train on every other patient (with their missing values);
the logistic regression trains on FLamby's training rows. Prints mean and 95% CI over seeds.

    python benchmarks/accuracy.py [--seeds 5] [--tasks disease]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
from mmn_fed.data import encode
from mmn_fed.evaluation import predict_final
from mmn_fed.metrics import auroc, mean_ci

FLAMBY_FEATURES = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak"]
CENTERS = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]


def flamby_split(df: pd.DataFrame):
    from sklearn.model_selection import train_test_split

    y = (df["num"] > 0).astype(int)
    complete = df[FLAMBY_FEATURES].notna().all(axis=1)
    train_idx, test_idx = [], []
    for c in CENTERS:
        rows = df.index[(df["dataset"] == c) & complete]
        # stratified where both classes have >= 2 patients (Switzerland has a single negative)
        strat = y[rows] if y[rows].value_counts().min() >= 2 else None
        tr, te = train_test_split(rows, test_size=0.34, random_state=43, stratify=strat)
        train_idx += list(tr)
        test_idx += list(te)
    incomplete = df.index[~complete]
    inc_train, inc_test = train_test_split(incomplete, test_size=1 / 3, random_state=43, stratify=y[incomplete])
    return np.array(train_idx), np.array(test_idx), np.array(inc_train), np.array(inc_test)


def logistic_regression(df, train_idx, test_idx) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = pd.get_dummies(df[FLAMBY_FEATURES].astype({"fbs": str, "exang": str}), dtype=float)
    y = (df["num"] > 0).astype(int).to_numpy()
    sc = StandardScaler().fit(X.loc[train_idx])
    clf = LogisticRegression(max_iter=2000).fit(sc.transform(X.loc[train_idx]), y[train_idx])
    return auroc(y[test_idx], clf.predict_proba(sc.transform(X.loc[test_idx]))[:, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tasks", default="disease", help="tasks to train (comma list); scored on disease")
    ap.add_argument("--epochs", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=args.tasks.split(","))
    tr, te, inc_tr, inc_te = flamby_split(df)
    print(f"FLamby train {len(tr)}  test A {len(te)} (per center "
          f"{[int((df.loc[te, 'dataset'] == c).sum()) for c in CENTERS]})  incomplete train {len(inc_tr)}  test B {len(inc_te)}")
    train_df = df.loc[np.concatenate([tr, inc_tr])].reset_index(drop=True)
    lr = logistic_regression(df, tr, te)
    results: dict[str, dict[str, list]] = {}
    for kind in ("multimodn", "pfusion"):
        res = results.setdefault(kind, {"A": [], "B": [], "sec": []})
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            r = train_centralized(train_df, schema, ModelConfig(kind=kind), TrainConfig(seed=seed, epochs=args.epochs))
            res["sec"].append(time.perf_counter() - t0)
            for name, idx in (("A", te), ("B", inc_te)):
                part = df.loc[idx].reset_index(drop=True)
                data = encode(r.trained.preprocessor, part)
                p = predict_final(r.trained.model, data, r.trained.preprocessor.targets)["disease"]
                res[name].append(auroc((part["num"] > 0).to_numpy(), p))
    print(f"\n{'model':<28}{'AUROC test A (FLamby)':>26}{'AUROC test B (incomplete)':>30}{'train s/run':>14}")
    print(f"{'logistic regression (FLamby)':<28}{lr:>26.3f}{'-':>30}{'-':>14}")
    for kind, res in results.items():
        cells = []
        for name in ("A", "B"):
            m, lo, hi = mean_ci(res[name])
            cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
        print(f"{kind + ' (centralized)':<28}{cells[0]:>26}{cells[1]:>30}{np.mean(res['sec']):>14.1f}")
    gap = np.mean(results["multimodn"]["A"]) - np.mean(results["pfusion"]["A"])
    print(f"\nMultiModN - P-Fusion on test A: {gap:+.3f} (parity target: |gap| <= 0.03); MultiModN target >= 0.89")


if __name__ == "__main__":
    main()
