"""Leave one site out: each hospital in turn is the external site. The others train a model federatively
(``server.engines.run_federation``, in-process) with the scenario's training missingness rules applied to their
rows; the left-out hospital's rows, as they are, are scored with ``mmn_fed.external.evaluate_site`` (the code
behind ``mmn-fed evaluate``). Writes ``<out>/<site>/<model>/{metrics.json,report.html}`` and one summary table
(``loso.csv``, ``loso.json``)."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .missingness import apply_rules
from .runner import _SET_BY_RUN_FEDERATION, load_frame
from .scenario import Scenario, ScenarioError
from .sites import assign_sites


def leave_one_site_out(sc: Scenario, out: str | Path, models: Sequence[str] | None = None, seed: int | None = None,
                       rounds: int | None = None, n_boot: int = 1000) -> pd.DataFrame:
    """One row per (external site, model): n, AUROC (or MSE) of the first task with its bootstrap interval,
    Brier, and the modalities whose presence differs from training (the audit comparison)."""
    from mmn_fed.evaluation import write_metrics
    from server.engines import run_federation
    from mmn_fed.external import evaluate_site, write_report
    from mmn_fed.model_io import model_id

    out = Path(out)
    df = load_frame(sc)
    sites = assign_sites(df, sc.schema, sc.sites)
    names = list(dict.fromkeys(sorted(sites)))
    if len(names) < 3:
        raise ScenarioError(f"leave-one-site-out needs at least 3 sites (2 to federate); the scenario has {names}")
    seed = sc.run.seeds[0] if seed is None else seed
    task = next(iter(sc.schema.tasks))
    primary = "mse" if sc.schema.tasks[task].kind == "regression" else "auroc"
    rows = []
    for held in names:
        train_rows = sites != held
        train = apply_rules(df[train_rows].reset_index(drop=True), sc.schema, sc.rules, sites[train_rows], seed, "train")
        train_sites = sites[train_rows]
        frames = {s: train[train_sites == s].reset_index(drop=True) for s in names if s != held}
        external = df[~train_rows].reset_index(drop=True)
        for model in models or sc.run.models:
            settings = asdict(sc.run.settings_for(model, seed))
            if rounds is not None:
                settings["num_server_rounds"] = rounds
            run_dir = out / _safe(held) / model
            logging.getLogger("flwr").setLevel(logging.WARNING)
            result = run_federation(sites=frames, schema=sc.schema, run_dir=run_dir / "federation", engine="inprocess",
                                    **{k: v for k, v in settings.items() if k not in _SET_BY_RUN_FEDERATION})
            trained = result.trained  # its provenance holds the federation's missingness audit
            ident = model_id(run_dir / "federation" / "model.pt")
            ev = evaluate_site(trained, external, site=held, identity=ident, n_boot=n_boot, seed=seed)
            for r in ev.records:
                r["training"] = "federated"
            write_metrics(run_dir / "metrics.json", ev.records)
            write_report(ev, run_dir, run_dir / "federation" / "model.pt", f"site {held} (left out)")
            top = {r["metric"]: r for r in ev.records
                   if r["task"] == task and r["subgroup"] == "all" and r["combination"] == "all"}
            rows.append({"site": held, "model": model, "n": top[primary]["n"], "task": task, "metric": primary,
                         "value": top[primary]["value"], "ci_low": top[primary]["ci_low"],
                         "ci_high": top[primary]["ci_high"], "brier": top.get("brier", {}).get("value", np.nan),
                         "presence_shift": "+".join(sorted({s["modality"] for s in ev.shifts if s["flag"]})) or "none",
                         "report": str(run_dir / "report.html")})
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "loso.csv", index=False)
    table.to_json(out / "loso.json", orient="records", indent=1)
    return table


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def format_table(table: pd.DataFrame) -> str:
    """The summary as a Markdown table (what ``mmn-fed simulate --loso`` prints)."""
    head = "| external site | model | n | metric [95% CI, patient bootstrap] | Brier | presence differs from training |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in table.to_dict(orient="records"):
        lines.append(f"| {r['site']} | {r['model']} | {r['n']} | {r['metric']} {r['value']:.3f} "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['brier']:.3f} | {r['presence_shift']} |")
    return "\n".join(lines)


def run(sc: Scenario, out: Path, rounds: int | None, n_boot: int = 1000) -> dict[str, Any]:
    table = leave_one_site_out(sc, out, rounds=rounds, n_boot=n_boot)
    print(format_table(table))
    return {"out": str(out), "table": str(out / "loso.csv")}
