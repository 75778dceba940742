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

Calibration of the norm check (``--calibration``): false rejections and detection rates per cohort.

    python benchmarks/bench_robustness.py --calibration                      # heart, support2, pbcseq x 5 seeds
    python benchmarks/bench_robustness.py --calibration --cohorts heart --seeds 0

Per cohort and seed, one honest federation (``run_federation``, default settings: up to 100 rounds, stopped by
patience) on 4 sites: heart's hospitals (70% of each, ``holdout_split``), support2's rows and pbcseq's subjects
drawn into 4 IID sites (the seed). Every round's replies go through the real validation as they arrive (false
rejections: honest site-rounds rejected, of all); then, for each site in turn as the attacker, its reply is
replaced by ``simulations.attacks.attacked_update`` (``global + k * (honest - global)`` for k = 3, 5, 10 and
-10, or NaN) and the round's replies are validated again (detection: attacked site-rounds rejected, of all).
That is the per-round question "would this attack, by this site, in this round, be caught", on the honest
trajectory (a caught attack leaves the trajectory honest). Also prints the largest honest norm ratios (whole
update and per module), the margin of the cuts.
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
import server.strategy as strategy
from server.aggregation import SiteUpdate
from server.engines import run_federation
from server.validation import validate_updates
from simulations.attacks import attacked_update, attacking_client_app, holdout_split
from simulations.sites import iid

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


COHORTS = ("heart", "support2", "pbcseq")
CALIBRATION_ATTACKS = {"x3": ("scale", 3.0), "x5": ("scale", 5.0), "x10": ("scale", 10.0),
                       "flip x10": ("scale", -10.0), "NaN": ("nan", 0.0)}


def cohort_sites(name: str, seed: int):
    """(schema, {site: rows}) for the calibration: heart's hospitals (70%), else 4 IID sites (subjects for pbcseq)."""
    df, schema = load_builtin(name)
    if name == "heart":
        schema = schema.subset(tasks=["disease"])
        return schema, holdout_split(df, schema.site_column, 0.3, seed)[0]
    if schema.timeseries is not None:  # a subject's visits stay at one site
        ids = df[schema.timeseries.id].unique()
        site_of = dict(zip(ids, iid(len(ids), 4, seed)))
        site = df[schema.timeseries.id].map(site_of).to_numpy()
    else:
        site = iid(len(df), 4, seed)
    return schema, {str(s): df[site == s].reset_index(drop=True) for s in sorted(set(site))}


def calibration_rows(cohorts, seeds, workdir: Path | None = None, **settings) -> list[dict]:
    """One row per cohort, seed, round and site: rejected when honest, and caught under each attack."""
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name in cohorts:
            for seed in seeds:
                schema, sites = cohort_sites(name, seed)
                rounds: list[tuple] = []

                def recording(global_params, updates, sent=None, max_counts=None, **kw):
                    report = validate_updates(global_params, updates, sent=sent, max_counts=max_counts, **kw)
                    rounds.append((dict(global_params), list(updates), sent, max_counts, report))
                    return report

                t0 = time.perf_counter()
                strategy.validate_updates = recording
                try:
                    run_federation(sites, schema, seed=seed, run_dir=Path(tmp) / f"{name}-{seed}", **settings)
                finally:
                    strategy.validate_updates = validate_updates
                for rnd, (g, updates, sent, max_counts, report) in enumerate(rounds, 1):
                    for i, u in enumerate(updates):
                        row = {"cohort": name, "seed": seed, "round": rnd, "site": u.site,
                               "honest rejected": u.site in report.rejected,
                               "site ratio": report.site_ratios.get(u.site, np.nan),
                               "module ratio": max([n[u.site] / np.median(list(n.values()))
                                                    for m, n in report.norms.items() if u.site in n
                                                    and m in report.zscores] or [np.nan])}
                        for label, (kind, k) in CALIBRATION_ATTACKS.items():
                            received = {p: g[p] for p in u.params}
                            bad = SiteUpdate(u.site, attacked_update(received, u.params, kind, k), u.counts)
                            attacked = updates[:i] + [bad] + updates[i + 1:]
                            row[label] = u.site in validate_updates(g, attacked, sent=sent, max_counts=max_counts).rejected
                        rows.append(row)
                print(f"  {name} seed {seed}: {len(rounds)} rounds, {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def calibration_table(rows: list[dict]) -> pd.DataFrame:
    """Per cohort: false-rejection rate over honest site-rounds, detection rate per attack, largest honest ratios."""
    df = pd.DataFrame(rows)
    out = {}
    for name, g in df.groupby("cohort", sort=False):
        r = {"seeds": ",".join(str(s) for s in sorted(g["seed"].unique())), "site-rounds": len(g),
             "false rejection": f"{int(g['honest rejected'].sum())}/{len(g)}"}
        r.update({label: f"{g[label].mean():.1%}" for label in CALIBRATION_ATTACKS})
        r["max honest ratio (update)"] = f"{g['site ratio'].max():.2f}"
        r["max honest ratio (module)"] = f"{g['module ratio'].max():.2f}"
        out[name] = r
    return pd.DataFrame(out).T


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", default=None, help="comma list of seeds (default 0,1,2; --calibration: 0,1,2,3,4)")
    ap.add_argument("--attacker", default="Cleveland")
    ap.add_argument("--attacks", default="none,-1,-10,10,nan", help="comma list: none, nan or a factor k")
    ap.add_argument("--rules", default=",".join(RULES), help="comma list of aggregation rules")
    ap.add_argument("--calibration", action="store_true",
                    help="false-rejection and detection rates of the norm check per cohort (see the docstring)")
    ap.add_argument("--cohorts", default=",".join(COHORTS), help="--calibration: comma list of built-in cohorts")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # every rejection is logged; the table counts them
    t0 = time.perf_counter()
    if args.calibration:
        seeds = [int(s) for s in (args.seeds or "0,1,2,3,4").split(",")]
        rows = calibration_rows([c.strip() for c in args.cohorts.split(",")], seeds)
        print(f"\nnorm check, seeds {','.join(map(str, seeds))}: honest federations (default settings, 4 sites, every "
              "round); detection = each site in turn attacking, every round (attacked_update), validation rerun")
        print(calibration_table(rows).to_string())
        print(f"{time.perf_counter() - t0:.0f} s")
        return 0
    args.seeds = args.seeds or "0,1,2"
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
