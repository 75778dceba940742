"""A malicious hospital on `heart`: how much each aggregation rule lets it degrade the federated model.

    python benchmarks/bench_robustness.py                  # 3 seeds x 10 rounds (~5 min on one core)
    python benchmarks/bench_robustness.py --rounds 5 --seeds 0

The 4 real hospitals are the sites, each training only the modules it holds (``mmn_fed.training``); one of
them (``--attacker``, Cleveland by default) sends ``global + factor * (its honest step)``: factor -1 is a
sign flip, -10 a boosted sign flip, 10 a scaled update. Rules: plain per-module mean, the always-on update
validation (``server.validation``) then the mean (what a default federation runs), trimmed mean and median
(``server.robust``; ``aggregation = "trimmed-mean" | "median"`` in the run config). Prints the pooled test
AUROC (mean and std over seeds) per rule and attack, and each rule's worst drop against its clean run:
the figures quoted in docs/security.md. ``HeartFederation`` is also the harness of tests/security.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch

from mmn_fed import load_builtin
from mmn_fed.data import encode, fit_preprocessor
from mmn_fed.evaluation import predict_final
from mmn_fed.metrics import auroc
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.modules import module_of
from mmn_fed.training import TrainConfig, module_counts, train_epochs
from server.aggregation import SiteUpdate


class HeartFederation:
    def __init__(self, seed: int = 0, state_size: int = 16, hidden: int = 16, test_fraction: float = 0.3):
        df, schema = load_builtin("heart")
        self.schema = schema.subset(tasks=["disease"])
        rng = np.random.default_rng(seed)
        train, test = {}, []
        for name, g in df.groupby(self.schema.site_column):
            g = g.reset_index(drop=True)
            idx = rng.permutation(len(g))
            cut = int(len(g) * test_fraction)
            test.append(g.iloc[idx[:cut]])
            train[str(name)] = g.iloc[idx[cut:]].reset_index(drop=True)
        self.prep = fit_preprocessor(self.schema, list(train.values()))
        self.data = {s: encode(self.prep, d) for s, d in train.items()}
        self.test = encode(self.prep, pd.concat(test, ignore_index=True))
        self.config = ModelConfig(state_size=state_size, hidden=hidden)
        self.seed = seed
        torch.manual_seed(seed)
        model = build_from_preprocessor(self.prep, self.config)
        self.initial = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        self.counts = {s: {m: c for m, c in module_counts(model, d).items() if c > 0} for s, d in self.data.items()}

    @property
    def sites(self) -> list[str]:
        return sorted(self.data)

    def local_update(self, site: str, global_params: Mapping[str, np.ndarray], server_round: int,
                     epochs: int = 1, lr: float = 3e-3) -> SiteUpdate:
        torch.manual_seed(1000 * server_round + self.sites.index(site))
        model = build_from_preprocessor(self.prep, self.config)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in global_params.items()})
        mods = set(self.counts[site])
        tc = TrainConfig(epochs=epochs, lr=lr, batch_size=32, seed=server_round)
        train_epochs(model, self.schema, self.data[site], tc, epochs,
                     torch.Generator().manual_seed(1000 * server_round + self.sites.index(site)),
                     trainable=lambda n: module_of(n) in mods)
        state = model.state_dict()
        params = {k: state[k].detach().numpy().copy() for k in global_params if module_of(k) in mods}
        return SiteUpdate(site, params, dict(self.counts[site]))

    def run(self, rounds: int, aggregate: Callable, attack: Callable[[SiteUpdate, Mapping], SiteUpdate] | None = None,
            attacker: str | None = None) -> dict[str, np.ndarray]:
        g = {k: v.copy() for k, v in self.initial.items()}
        for r in range(1, rounds + 1):
            ups = [self.local_update(s, g, r) for s in self.sites]
            if attack is not None:
                ups = [attack(u, g) if u.site == attacker else u for u in ups]
            g, _ = aggregate(g, ups)
        return g

    def auroc(self, params: Mapping[str, np.ndarray]) -> float:
        model = build_from_preprocessor(self.prep, self.config)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
        with torch.no_grad():
            pred = predict_final(model, self.test, self.prep.targets)["disease"]
        y = self.test.y["disease"].numpy()
        ok = self.test.y_present["disease"].numpy().astype(bool)
        p = pred[ok]
        return auroc(y[ok], p[:, 1] if p.ndim == 2 else p)


def scaled(factor: float):
    """An attacker that sends global + factor * (its honest step): factor -10 = boosted sign flip."""
    def attack(u: SiteUpdate, g: Mapping[str, np.ndarray]) -> SiteUpdate:
        return SiteUpdate(u.site, {k: (g[k] + factor * (v - g[k])).astype(v.dtype) for k, v in u.params.items()},
                          u.counts)
    return attack


def validated_mean(g, ups):
    """Always-on validation, then plain per-module weighted averaging."""
    from server.aggregation import aggregate_modules
    from server.validation import validate_updates

    return aggregate_modules(g, validate_updates(g, ups).accepted)


def robustness_table(seeds=(0, 1, 2), rounds: int = 10, attacker: str = "Cleveland",
                     factors=(-1.0, -10.0, 10.0), **model) -> list[dict]:
    """Pooled-test AUROC on heart, clean and with ``attacker`` sending scaled updates, per aggregation rule."""
    from server.aggregation import aggregate_modules
    from server.robust import median_modules, trimmed_mean_modules

    rules = {"mean": aggregate_modules, "validated mean": validated_mean, "trimmed mean": trimmed_mean_modules,
             "median": median_modules}
    rows = []
    for seed in seeds:
        fed = HeartFederation(seed=seed, **model)
        for name, rule in rules.items():
            rows.append({"seed": seed, "rule": name, "attack": "none", "auroc": fed.auroc(fed.run(rounds, rule))})
            for f in factors:
                rows.append({"seed": seed, "rule": name, "attack": f"x{f:g}",
                             "auroc": fed.auroc(fed.run(rounds, rule, scaled(f), attacker))})
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging
    import time

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    ap.add_argument("--attacker", default="Cleveland")
    ap.add_argument("--factors", default="-1,-10,10", help="comma list of attack factors")
    args = ap.parse_args(argv)
    logging.getLogger("server.validation").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = robustness_table(seeds=[int(x) for x in args.seeds.split(",")], rounds=args.rounds, attacker=args.attacker,
                            factors=[float(x) for x in args.factors.split(",")])
    df = pd.DataFrame(rows)
    table = df.groupby(["rule", "attack"])["auroc"].agg(["mean", "std"]).unstack("attack")
    clean = df[df.attack == "none"].set_index(["seed", "rule"])["auroc"]
    drops = df[df.attack != "none"].assign(drop=lambda d: [clean[(s, r)] - a for s, r, a in zip(d.seed, d.rule, d.auroc)])
    worst = drops.groupby(["rule", "attack"])["drop"].mean().unstack("attack").max(axis=1).rename("worst mean drop")
    print(f"pooled test AUROC on heart, attacker {args.attacker}, {args.rounds} rounds, seeds {args.seeds}")
    print(table.round(3).to_string())
    print("\nworst AUROC drop against the rule's own clean run (mean over seeds, worst attack):")
    print(worst.round(3).to_string())
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
