"""`mmn-fed` command line. Subcommands from other packages are registered lazily by name so that
this module imports none of them (the layout's arrows point from simulations/server to mmn_fed)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path

from .settings import RunSettings, add_command, add_flags, centralized_names
from .training import TrainConfig

# name -> "module" exposing register(subparsers). Imported only when the command line needs it.
PLUGINS = {
    "simulate": "simulations.cli",
    "deploy-local": "server.engines.deployment",
    "export": "mmn_fed.export",
    "keygen": "mmn_fed.export",
    "site-key": "server.enrol",
    "enrol": "server.enrol",
    "revoke": "server.enrol",
    "sites": "server.enrol",
}


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model centrally; writes model.pt and metrics.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="heart", help="heart | support2 | PATH.csv (with --schema)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--test-fraction", type=float, default=0.2, help="stratified held-out test share")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="maximum epochs (early stopping on val-fraction)")
    add_flags(p, centralized_names())  # the run settings centralized training shares (docs/settings.md)
    p.add_argument("--shuffle-order", action="store_true", help="permute encoder order per batch")
    p.add_argument("--explain", action="store_true", help="also write IMC and CP tables and heatmaps")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)


def _train(args) -> int:
    import torch

    from .api import evaluate_frame, save_trained, stratify_key, train_centralized
    from .data import encode, load_dataset
    from .evaluation import write_metrics
    from .model import ModelConfig
    from .training import split_indices

    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    settings = RunSettings.from_args(args, centralized_names())
    df, schema = load_dataset(args.dataset, settings.schema or None)
    if settings.tasks:
        schema = schema.subset(tasks=[t.strip() for t in settings.tasks.split(",")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = split_indices(len(df), args.test_fraction, settings.seed, stratify_key(schema, df))
    train_df, test_df = df.iloc[train_idx].reset_index(drop=True), df.iloc[test_idx].reset_index(drop=True)
    mc = ModelConfig.from_settings(settings)
    tc = TrainConfig.from_settings(settings, epochs=args.epochs, shuffle_order=args.shuffle_order)
    t0 = time.perf_counter()

    def progress(rec):
        if not args.quiet:
            extra = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if k.startswith("val_"))
            print(f"\repoch {rec['epoch']:4d}  train_loss={rec['train_loss']:.4f}  {extra}   ", end="", flush=True)

    res = train_centralized(train_df, schema, mc, tc, progress=progress,
                            provenance={"dataset": args.dataset, "seed": settings.seed, "training": "centralized"})
    if not args.quiet:
        print()
    model_path = save_trained(out / "model.pt", res.trained)
    ctx = {"model": settings.model, "training": "centralized", "seed": settings.seed, "condition": "clean", "dataset": args.dataset}
    records = evaluate_frame(res.trained, test_df, ctx) if len(test_df) else []
    write_metrics(out / "metrics.json", records)
    summary = {r["task"] + ":" + r["metric"]: round(r["value"], 4) for r in records
               if r["state"] == "final" and r["combination"] == "all" and r["site"] == "all" and r["value"] == r["value"]}
    if args.explain and settings.model == "multimodn":
        from .interpret import cp, imc, plot_cp, plot_imc

        data = encode(res.trained.preprocessor, test_df)
        t_imc = imc(res.trained.model, data, res.trained.preprocessor.targets)
        t_imc.to_csv(out / "imc.csv", index=False)
        plot_imc(t_imc, out / "figures" / "imc.png")
        plot_imc(t_imc, out / "figures" / "imc_abs.png", value="mean_abs_delta")
        t_cp = cp(res.trained.model, data, res.trained.preprocessor.targets, row=0)
        t_cp.to_csv(out / "cp.csv", index=False)
        plot_cp(t_cp, out / "figures" / "cp.png")
    print(json.dumps({"model": str(model_path), "metrics": str(out / "metrics.json"), "best_epoch": res.fit_info["best_epoch"],
                      "seconds": round(time.perf_counter() - t0, 2), "test": summary}, indent=1))
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmn-fed", description="Federated MultiModN: train, simulate, export, deploy.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    add_command(sub)  # mmn-fed settings
    wanted = (argv or [None])[0]
    modules = dict.fromkeys(m for n, m in PLUGINS.items() if wanted in (None, n, "-h", "--help"))
    for module in modules:
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            continue  # that part of the toolkit is not present (yet)
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from edge_runtime.preprocessing import DataError
    from edge_runtime.schema import SchemaError

    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SchemaError, DataError, FileNotFoundError, ValueError) as e:
        print(f"mmn-fed {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
