"""`mmn-fed` command line. ``train``, ``predict`` and ``evaluate`` (``mmn_fed.external``) are built in and ``export``/``keygen`` come from ``mmn_fed.export``;
subcommands of higher packages (``simulate``, ``deploy-local``, ``site-key``/``enrol``/``revoke``/``sites``)
register themselves as entry points of the group ``mmn_fed.commands`` in pyproject.toml (name ->
``module:register``, where ``register(subparsers)`` adds the command), so this module names none of them:
the layout's arrows point from simulations/server to mmn_fed. Only the module of the command asked for is
imported (``-h`` imports them all, to list them).

The base install (the clinic's: ``pip install mmn-fed``) has no torch, pandas or flwr: this module imports none
of them at the top, and a command whose extra is missing says which one to install (exit 2, one line)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Iterable

from .settings import RunSettings, add_command, add_flags, centralized_names

COMMANDS = "mmn_fed.commands"  # entry-point group of the subcommands of higher packages
OWN = ("train", "audit", "predict", "evaluate", "export", "keygen", "settings")


# The extras of pyproject.toml (top-level module -> extra) whose absence a command reports as "install the extra".
EXTRA_OF_MODULE = {"torch": "train", "pandas": "train", "onnx": "train", "scipy": "train", "sklearn": "train",
                   "matplotlib": "train", "flwr": "federation", "ray": "federation"}


class CommandUnavailable(RuntimeError):
    """A registered subcommand whose module cannot be imported (a missing package or dependency)."""


def missing_extra(command: str, error: BaseException | None) -> str | None:
    """The one-line message for ``command`` failing with ``error`` because an optional dependency is not
    installed (None if ``error`` is something else). mmn-fed's own commands need the 'train' extra; the
    commands of clients/server/simulations need 'federation' (which includes 'train')."""
    while error is not None and not isinstance(error, ImportError):
        error = error.__cause__
    if error is None:
        return None
    top = (getattr(error, "name", None) or "").split(".")[0]
    if top not in EXTRA_OF_MODULE:
        return None
    extra = "train" if command in OWN and EXTRA_OF_MODULE[top] == "train" else "federation"
    return (f"mmn-fed {command} needs the '{extra}' extra: pip install \"mmn-fed[{extra}]\" "
            f"(no module named '{top}')")


def _default_epochs() -> int | None:
    try:
        from .training import TrainConfig
    except ImportError:  # no 'train' extra: `mmn-fed train` is still listed; running it names the extra
        return None
    return TrainConfig.epochs


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model centrally; writes model.pt and metrics.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="heart",
                   help="a built-in (mmn_fed.data.BUILTIN: heart, support2, pbc, pbcseq, nycflights13_weather) or PATH.csv "
                        "(with --schema)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--test-fraction", type=float, default=0.2, help="stratified held-out test share")
    p.add_argument("--epochs", type=int, default=_default_epochs(), help="maximum epochs (early stopping on val-fraction)")
    add_flags(p, centralized_names())  # the run settings centralized training shares (docs/settings.md)
    p.add_argument("--shuffle-order", action="store_true", help="permute encoder order per batch")
    p.add_argument("--explain", action="store_true", help="also write IMC and CP tables and heatmaps")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)


def _train(args) -> int:
    import torch

    from .api import evaluate_frame, save_trained, stratify_key, train_centralized
    from .data import check_holdout, check_table, encode, load_dataset
    from .evaluation import write_metrics
    from .model import ModelConfig
    from .training import TrainConfig, split_indices

    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    settings = RunSettings.from_args(args, centralized_names())
    df, schema = load_dataset(args.dataset, settings.schema or None)
    if settings.tasks:
        schema = schema.subset(tasks=[t.strip() for t in settings.tasks.split(",")])
    if schema.timeseries is not None:
        return _train_sequences(args, settings, df, schema)
    check_table(schema, df)  # before any split: a refused table writes nothing, and its rows are the file's
    train_idx, test_idx = split_indices(len(df), args.test_fraction, settings.seed, stratify_key(schema, df))
    # iloc keeps each row's record number in the file (read_table's index): errors later still name the file's row
    train_df, test_df = df.iloc[train_idx], df.iloc[test_idx]
    if args.test_fraction > 0:
        check_holdout(schema, test_df, f"test split (--test-fraction {args.test_fraction:g})",
                      "give more rows or a larger --test-fraction (or --test-fraction 0: train on every row, no test metrics)")
    else:
        print("note: --test-fraction 0: no test split, metrics.json holds no test metrics", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.val_fraction <= 0:
        print(f"note: val-fraction 0: no validation split, no early stopping: all {args.epochs} epochs are trained",
              file=sys.stderr)
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
    plan = res.fit_info["missingness"]
    print(plan["summary"], file=sys.stderr)
    (out / "audit.json").write_text(json.dumps(plan, indent=1))
    model_path = save_trained(out / "model.pt", res.trained)
    ctx = {"model": settings.model, "training": "centralized", "seed": settings.seed, "condition": "clean",
           "dataset": args.dataset, "missingness": plan["mode"], "corrected": ",".join(plan["corrected"])}
    records = evaluate_frame(res.trained, test_df, ctx) if len(test_df) else []
    write_metrics(out / "metrics.json", records)
    summary = {r["task"] + ":" + r["metric"]: round(r["value"], 4) for r in records
               if r["state"] == "final" and r["combination"] == "all" and r["site"] == "all" and r["value"] == r["value"]}
    if args.explain and settings.model == "multimodn":
        from .interpret import write_explanations

        write_explanations(res.trained.model, encode(res.trained.preprocessor, test_df),
                           res.trained.preprocessor.targets, out, figures_dir=out / "figures")
    print(json.dumps({"model": str(model_path), "metrics": str(out / "metrics.json"), "best_epoch": res.fit_info["best_epoch"],
                      "seconds": round(time.perf_counter() - t0, 2), "test": summary}, indent=1))
    return 0


def _train_sequences(args, settings: RunSettings, df, schema) -> int:
    """``mmn-fed train`` on a time-series schema (docs/timeseries.md): test and validation splits by subject."""
    from .api import save_trained
    from .evaluation import write_metrics
    from .model import ModelConfig
    from .sequences import build_sequences, sequence_records, train_sequences
    from .training import TrainConfig

    if args.explain:
        raise SystemExit("error: --explain is not available for time-series schemas yet (docs/timeseries.md)")
    seqs = build_sequences(schema, df)
    for s in seqs.skipped:
        print(f"note: {s['rows']} row(s) not used: {s['reason']}", file=sys.stderr)
    train_idx, test_idx = seqs.holdout(schema.timeseries, args.test_fraction, settings.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mc = ModelConfig.from_settings(settings)
    tc = TrainConfig.from_settings(settings, epochs=args.epochs)
    t0 = time.perf_counter()
    res = train_sequences(seqs.subjects(train_idx), schema, mc, tc,
                          provenance={"dataset": args.dataset, "seed": settings.seed, "training": "centralized"})
    model_path = save_trained(out / "model.pt", res.trained)
    ctx = {"model": settings.model, "training": "centralized", "seed": settings.seed, "condition": "clean",
           "dataset": args.dataset}
    records = sequence_records(res.trained, schema, seqs.subjects(test_idx), ctx) if len(test_idx) else []
    write_metrics(out / "metrics.json", records)
    summary = {r["task"] + ":" + r["metric"]: round(r["value"], 4) for r in records if r["value"] == r["value"]}
    print(json.dumps({"model": str(model_path), "metrics": str(out / "metrics.json"), "best_epoch": res.fit_info["best_epoch"],
                      "subjects": {**res.fit_info["subjects"], "test": int(len(test_idx))}, "steps": int(len(seqs.steps)),
                      "seconds": round(time.perf_counter() - t0, 2), "test": summary}, indent=1))
    return 0


def _add_external(sub) -> None:
    p = sub.add_parser("predict", help="score a CSV with a model file (MultiModN or P-Fusion); one row out per row in",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Rows with bad values are reported (status, reason with the CSV line and column) "
                                   "and the others predicted. Output columns: --keep columns, per task the prediction "
                                   "(binary p(1); multiclass class and <task>_p_<class>; regression value), modalities, "
                                   "status, reason, warnings, model_id (sha256 of the model file, 16 hex). See "
                                   "docs/evaluation.md.")
    p.add_argument("model", help="model.pt")
    p.add_argument("--input", required=True, help="CSV in the training data's format")
    p.add_argument("--output", required=True, help="CSV to write (atomically; never the input)")
    p.add_argument("--keep", default="", help="comma-separated input columns to copy first (e.g. an id)")
    p.set_defaults(func=_predict)
    e = sub.add_parser("evaluate", help="external validation on a labelled site CSV: metrics.json + report.html",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="AUROC and Brier with bootstrap CIs over patients, calibration, per modality "
                                   "combination and subgroup, this site's missingness audit vs training's; "
                                   "--recalibrate writes model-recalibrated.pt. See docs/evaluation.md.")
    e.add_argument("model", help="model.pt")
    e.add_argument("--data", required=True, help="labelled CSV of the site")
    e.add_argument("--out", help="output directory (default: runs/evaluate/<data file name>)")
    e.add_argument("--site", help="site name in records and report (default: the data file's name)")
    e.add_argument("--subgroup", default="", help="comma-separated columns to break performance down by "
                                                  "(numeric ones in quartiles)")
    e.add_argument("--recalibrate", action="store_true", help="fit a Platt recalibration per binary task on these rows "
                                                              "and write model-recalibrated.pt")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.set_defaults(func=_evaluate)


def _split(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def _predict(args) -> int:
    from edge_runtime.cli import print_summary

    from .external import predict_csv

    s = predict_csv(args.model, args.input, args.output, keep=_split(args.keep))
    print_summary(s, args.output, s["model_id"])
    return 0


def _evaluate(args) -> int:
    import torch

    from .external import evaluate_csv

    torch.set_num_threads(1)
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    out = Path(args.out or Path("runs") / "evaluate" / Path(args.data).stem)
    res = evaluate_csv(args.model, args.data, out, _split(args.subgroup), args.recalibrate, args.bootstrap, args.seed,
                       args.site)
    for w in res.get("recalibration_warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps(res, indent=1))
    return 0


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="missingness audit of one table: does each modality's (and column's) presence "
                                     "depend on a task's label? writes audit.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="a built-in dataset name or a CSV")
    p.add_argument("--schema", help="schema TOML (required with a CSV)")
    p.add_argument("--min-cell", type=int, default=RunSettings().audit_min_cell,
                   help="tables with a count below this are reported as suppressed (as they would be at a site)")
    p.add_argument("--out", help="write the audit here (JSON); default: print only")
    p.add_argument("--all", action="store_true", help="print every test, not only the label-dependent ones")
    p.set_defaults(func=_audit)


def _audit(args) -> int:
    from .audit import audit_frame
    from .data import load_dataset

    df, schema = load_dataset(args.data, args.schema)
    if args.min_cell < 1:
        raise ValueError(f"--min-cell must be >= 1, got {args.min_cell}")
    found = audit_frame(schema, df, min_cell=args.min_cell, columns=True)
    where = f"per site ({schema.site_column})" if len(found.sites) > 1 or found.sites != ["all"] else "the whole table"
    print(f"missingness audit of {args.data}: {len(df)} rows, {where}; FDR {found.alpha:g}, smallest difference "
          f"{found.min_effect:g}, minimum cell count {found.min_cell}")
    lines = found.lines(only_flagged=not args.all)
    print("\n".join(lines) if lines else "no label-dependent presence found")
    suppressed = sum(f.suppressed for f in found.findings)
    if suppressed:
        print(f"{suppressed} table(s) suppressed (a count below {found.min_cell}); --min-cell 1 shows them on your own data")
    if found.flagged():
        print("label-dependent modalities (training with missingness = auto corrects them): "
              + ", ".join(f"{m} (against {t})" for m, t in found.flagged().items()))
    if args.out:
        print(f"wrote {found.write(args.out)}")
    return 0


def _reason(ep: EntryPoint, error: Exception) -> str:
    return (f"command '{ep.name}' is registered by entry point '{ep.value}' ({COMMANDS}) but cannot be loaded: "
            f"{type(error).__name__}: {error}")


def add_commands(sub, commands: Iterable[EntryPoint], wanted: str | None) -> None:
    """Register the entry-point ``commands`` that ``wanted`` needs (all of them when it is None or a help
    flag). One ``register`` may add several commands: each is called once. A command that cannot load raises
    ``CommandUnavailable`` when asked for, and stays listed as unavailable in the help."""
    everything = wanted in (None, "-h", "--help")
    failed: dict[str, Exception] = {}  # entry-point value -> why it cannot load
    loaded: set[str] = set()
    for ep in commands:
        if not everything and ep.name != wanted:
            continue
        if ep.value not in loaded and ep.value not in failed:
            try:
                register = ep.load()
            except (ImportError, AttributeError) as e:  # a missing package or dependency, or a stale entry point
                if not everything:
                    raise CommandUnavailable(_reason(ep, e)) from e
                failed[ep.value] = e
            else:
                loaded.add(ep.value)
                register(sub)
        if ep.value in failed and ep.name not in sub.choices:
            sub.add_parser(ep.name, help=f"(unavailable: {failed[ep.value]})")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmn-fed", description="Federated MultiModN: train, simulate, export, deploy.",
        epilog=f"More commands come from the '{COMMANDS}' entry points of the installed mmn-fed "
               "(pip install -e \".[all]\" after changing them in pyproject.toml).")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = (argv or [None])[0]
    _add_train(sub)
    _add_external(sub)
    _add_audit(sub)
    add_command(sub)  # mmn-fed settings
    if wanted in (None, "-h", "--help", "export", "keygen"):
        try:
            from .export import register
        except ImportError as e:  # no 'train' extra (torch, onnx)
            if wanted in ("export", "keygen"):
                raise CommandUnavailable(f"mmn_fed.export cannot be loaded: {type(e).__name__}: {e}") from e
            for name in ("export", "keygen"):
                sub.add_parser(name, help=f"(unavailable: {e})")
        else:
            register(sub)
    registered = list(entry_points(group=COMMANDS))
    if wanted not in OWN:
        add_commands(sub, registered, wanted)
    if wanted is not None and not wanted.startswith("-") and wanted not in sub.choices:
        known = ", ".join(dict.fromkeys([*OWN, *(ep.name for ep in registered)]))
        parser.error(f"unknown command '{wanted}' (known: {known}); the commands of other packages "
                     f"are the '{COMMANDS}' entry points of the installed mmn-fed: after changing them in "
                     "pyproject.toml, reinstall (pip install -e \".[all]\")")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from edge_runtime.preprocessing import DataError
    from edge_runtime.schema import SchemaError

    try:
        parser = build_parser(argv)
    except CommandUnavailable as e:
        print(missing_extra(argv[0], e) or f"mmn-fed {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ImportError as e:
        message = missing_extra(args.command, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except (SchemaError, DataError, FileNotFoundError, ValueError) as e:
        print(f"mmn-fed {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
