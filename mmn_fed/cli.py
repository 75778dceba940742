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
    p.add_argument("--schema", help="schema TOML (required with a CSV; overrides a built-in's schema)")
    p.add_argument("--model", choices=["multimodn", "pfusion"], default="multimodn")
    p.add_argument("--tasks", help="comma-separated subset of the schema's tasks (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--test-fraction", type=float, default=0.2, help="stratified held-out test share")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=0, help="0 = auto (32..256 by data size)")
    p.add_argument("--state-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
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
    from .training import TrainConfig, split_indices

    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    df, schema = load_dataset(args.dataset, args.schema)
    if args.tasks:
        schema = schema.subset(tasks=[t.strip() for t in args.tasks.split(",")])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = split_indices(len(df), args.test_fraction, args.seed, stratify_key(schema, df))
    train_df, test_df = df.iloc[train_idx].reset_index(drop=True), df.iloc[test_idx].reset_index(drop=True)
    mc = ModelConfig(kind=args.model, state_size=args.state_size, hidden=args.hidden)
    tc = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                     shuffle_order=args.shuffle_order)
    t0 = time.perf_counter()

    def progress(rec):
        if not args.quiet:
            extra = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if k.startswith("val_"))
            print(f"\repoch {rec['epoch']:4d}  train_loss={rec['train_loss']:.4f}  {extra}   ", end="", flush=True)

    res = train_centralized(train_df, schema, mc, tc, progress=progress,
                            provenance={"dataset": args.dataset, "seed": args.seed, "training": "centralized"})
    if not args.quiet:
        print()
    model_path = save_trained(out / "model.pt", res.trained)
    ctx = {"model": args.model, "training": "centralized", "seed": args.seed, "condition": "clean", "dataset": args.dataset}
    records = evaluate_frame(res.trained, test_df, ctx) if len(test_df) else []
    write_metrics(out / "metrics.json", records)
    summary = {r["task"] + ":" + r["metric"]: round(r["value"], 4) for r in records
               if r["state"] == "final" and r["combination"] == "all" and r["site"] == "all" and r["value"] == r["value"]}
    if args.explain and args.model == "multimodn":
        from .interpret import write_explanations

        write_explanations(res.trained.model, encode(res.trained.preprocessor, test_df),
                           res.trained.preprocessor.targets, out, figures_dir=out / "figures")
    print(json.dumps({"model": str(model_path), "metrics": str(out / "metrics.json"), "best_epoch": res.fit_info["best_epoch"],
                      "seconds": round(time.perf_counter() - t0, 2), "test": summary}, indent=1))
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmn-fed", description="Federated MultiModN: train, simulate, export, deploy.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
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
