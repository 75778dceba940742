"""A malicious hospital on `heart`, through the real ServerApp and ClientApps: how much each aggregation
rule lets it degrade the federated model.

    python benchmarks/bench_robustness.py                  # 3 seeds x 10 rounds x 3 rules x 5 attacks (~10 min)
    python benchmarks/bench_robustness.py --rounds 5 --seeds 0 --attacks none,-10

Each run is ``server.engines.run_federation`` on the in-process engine (the ServerApp of a real federation,
its always-on update validation, one ClientApp per hospital) with the default settings except the ones
named here: heart's 4 hospitals as the sites, 10 rounds of 1 local epoch, ``val_fraction=0.2`` (the
documented default), the seed. 30% of each hospital's rows (a random draw per seed,
``simulations.attacks.holdout_split``) are held out; the figure is the final model's AUROC on all of them
pooled. One hospital (``--attacker``, Cleveland, the largest) runs ``simulations.attacks.attacking_client_app``:
its train replies carry ``global + k * (its honest update - global)`` (k = -1 sign flip, -10 boosted flip,
+10 boosted step) or NaN. Rules (``aggregation`` in the run config): mean (the default), trimmed-mean (trim
0.25), median; validation runs before each of them and cannot be switched off, so there is no
"mean without validation" row. Prints the pooled test AUROC (mean and 95% t-interval over seeds) per rule and
attack, and per run how many of the attacker's updates validation rejected (and how many honest ones): the
figures quoted in docs/security.md.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from mmn_fed import load_builtin
from server.engines import run_federation
from simulations.attacks import attacking_client_app, holdout_split

RULES = ("mean", "trimmed-mean", "median")


def parse_attack(text: str) -> tuple[str, str, float]:
    """"none" | "nan" | a float k -> (label, kind, k)."""
    if text in ("none", "nan"):
        return text, text, 0.0
    k = float(text)
    return f"k={k:+g}", "scale", k


def run_one(train, test, schema, seed: int, rule: str, attack: tuple[str, str, float], attacker: str, rounds: int,
            run_dir: Path) -> dict:
    label, kind, k = attack
    app = None if kind == "none" else attacking_client_app(attacker, kind, k)
    res = run_federation(train, schema, rounds=rounds, seed=seed, run_dir=run_dir, test_sites=test, val_fraction=0.2,
                         aggregation=rule, trim=0.25, client_app=app)
    rejected = [set(h["rejected"]) for h in res.history]
    return {"seed": seed, "rule": rule, "attack": label, "auroc": res.history[-1]["test"]["disease/auroc"],
            "attacker rejected": sum(attacker in r for r in rejected),
            "honest rejected": sum(len(r - {attacker}) for r in rejected), "honest updates": rounds * (len(train) - 1)}


def robustness_rows(seeds, rounds: int, attacker: str, attacks, rules=RULES, workdir: Path | None = None) -> list[dict]:
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for seed in seeds:
            train, test = holdout_split(df, schema.site_column, 0.3, seed)
            if attacker not in train:
                raise SystemExit(f"--attacker '{attacker}' is not a site; sites: {sorted(train)}")
            for rule in rules:
                for attack in attacks:
                    rows.append(run_one(train, test, schema, seed, rule, attack, attacker, rounds,
                                        Path(tmp) / f"{seed}-{rule}-{attack[0]}"))
                    print(f"  seed {seed} {rule:12s} {attack[0]:7s} AUROC {rows[-1]['auroc']:.3f}  rejected "
                          f"attacker {rows[-1]['attacker rejected']}/{rounds}", flush=True)
    return rows


def t_interval(values) -> str:
    """Mean and 95% t-interval over seeds (just the mean with one seed)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return f"{x.mean():.3f}"
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return f"{x.mean():.3f} [{x.mean() - half:.3f}, {x.mean() + half:.3f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    ap.add_argument("--attacker", default="Cleveland")
    ap.add_argument("--attacks", default="none,-1,-10,10,nan", help="comma list: none, nan or a factor k")
    ap.add_argument("--rules", default=",".join(RULES), help="comma list of aggregation rules")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # every rejection is logged; the table counts them
    t0 = time.perf_counter()
    attacks = [parse_attack(a.strip()) for a in args.attacks.split(",")]
    rows = robustness_rows([int(s) for s in args.seeds.split(",")], args.rounds, args.attacker, attacks,
                           [r.strip() for r in args.rules.split(",")])
    df = pd.DataFrame(rows)
    order = [a[0] for a in attacks]
    auroc = df.groupby(["rule", "attack"], sort=False)["auroc"].agg(t_interval).unstack("attack")[order]
    rej = (df.groupby(["rule", "attack"], sort=False)["attacker rejected"]
           .agg(lambda v: ",".join(str(int(x)) for x in v)).unstack("attack")[order])
    print(f"\nheart, attacker {args.attacker}, {args.rounds} rounds, seeds {args.seeds}; real ServerApp + ClientApps "
          "(in-process engine), validation always on")
    print("pooled held-out AUROC, mean [95% t-interval over seeds]:")
    print(auroc.to_string())
    print(f"\nattacker updates rejected by validation, of {args.rounds} rounds (one figure per seed):")
    print(rej.to_string())
    print(f"\nhonest updates rejected, all runs: {int(df['honest rejected'].sum())} of "
          f"{int(df['honest updates'].sum())}")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
