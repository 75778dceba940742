"""`mmn-fed simulate [SCENARIO]`: run a scenario (a shipped name or a TOML file) and write its report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT = "default"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="run a simulation scenario (default: MNAR shift on heart) and write report.html",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run every (sweep point, model, training, seed) of a scenario; resumable. "
                    "Shipped scenarios: see --list.")
    p.add_argument("scenario", nargs="?", default=DEFAULT, help="shipped scenario name or path to a scenario TOML")
    p.add_argument("--out", help="output directory (default: runs/simulate/<scenario name>)")
    p.add_argument("--workers", type=int, help="parallel runs (default: run.workers, else one per CPU core)")
    p.add_argument("--engine", choices=["inprocess", "ray"], help="federation engine (default: the scenario's run.engine)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="engine ray on an existing Ray cluster (`ray start --head` on one machine, `ray start --address "
                        "HOST:PORT` on the others): its head's address; implies --engine ray (docs/federation.md)")
    p.add_argument("--seeds", type=int, help="override run.seeds with 0..N-1")
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    p.add_argument("--check", action="store_true", help="validate the scenario, print its plan and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--loso", action="store_true",
                   help="leave one site out instead: each site in turn is the external site of a federation of the "
                        "others (first seed; docs/evaluation.md)")
    p.add_argument("--rounds", type=int, help="with --loso: federated rounds (default: the scenario's)")
    p.set_defaults(func=simulate)


def simulate(args) -> int:
    from .scenario import Scenario, load, shipped

    if args.list:
        for name, path in shipped().items():
            sc = load(path)
            print(f"{name:<22} {sc.description}")
        return 0
    sc = load(args.scenario)
    if args.seeds:
        raw = sc.to_dict()
        raw.setdefault("run", {})["seeds"] = args.seeds
        sc = Scenario.from_dict(raw, sc.base_dir)
    if args.loso:
        from .loso import run

        out = Path(args.out or Path("runs") / "loso" / sc.name)
        print(json.dumps(run(sc, out, args.rounds), indent=1))
        return 0
    from .runner import plan, run_scenario

    jobs = plan(sc)
    if args.check:
        print(json.dumps({"scenario": sc.name, "points": len(sc.points()), "runs": len(jobs),
                          "rules": [r.describe() for r in sc.rules], "sites": sc.sites.describe()}, indent=1))
        return 0
    out = Path(args.out or Path("runs") / "simulate" / sc.name)
    summary = run_scenario(sc, out, workers=args.workers, progress=not args.quiet, engine=args.engine,
                           ray_address=args.ray_address)
    print(json.dumps({"out": str(out), **summary}, indent=1))
    return 0 if not summary["failed"] else 1
