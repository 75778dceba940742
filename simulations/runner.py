"""Scenario runner: every (sweep point, model, training, seed) as one resumable job.

A job prepares the data of its point and seed (sites, per-site stratified train/test split, missingness
on the training rows, one test table per condition), trains through a *training backend*
(centralized / local / federated), evaluates every condition with ``mmn_fed.evaluation`` and writes
``runs/<key>/records.json``, the model file(s) and ``info.json``. A job whose ``info.json`` says done is
not redone. Jobs run in a process pool (one torch thread per process: these networks are tiny).
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .missingness import apply_rules
from .scenario import Scenario, ScenarioError
from .sites import assign_sites


# ---- plan -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    point: int
    values: tuple[tuple[str, Any], ...]  # sweep values at this point (dotted key, value)
    model: str
    training: str
    seed: int
    key: str  # directory name under runs/; changes whenever the point's configuration changes

    @property
    def sweep(self) -> dict[str, Any]:
        return dict(self.values)


def plan(scenario: Scenario) -> list[tuple[Job, Scenario]]:
    """Every job of the scenario, with the scenario at its sweep point."""
    jobs = []
    for i, (values, sc) in enumerate(scenario.points()):
        digest = hashlib.sha1(json.dumps(sc.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        for model in sc.run.models:
            for training in sc.run.training:
                for seed in sc.run.seeds:
                    key = f"p{i}-{model}-{training}-s{seed}-{digest}"
                    jobs.append((Job(i, tuple((k, _plain(v)) for k, v in values.items()), model, training, seed, key), sc))
    return jobs


def _plain(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def sweep_label(v: Any) -> Any:
    """A sweep value as it appears in records: lists become 'a+b'."""
    return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else v


# ---- data of one point and seed ---------------------------------------------------------------

@dataclass
class Prepared:
    train: pd.DataFrame  # training rows, scenario missingness applied
    train_sites: np.ndarray
    tests: dict[str, pd.DataFrame]  # condition -> test rows
    test_sites: np.ndarray
    site_order: list[str]
    holdout: list[str]
    time_edges: list[float] | None = None  # time series: bins of time since the first observation (metrics)
    condition_sites: dict[str, np.ndarray] | None = None  # time series: a condition may drop visits (rows)

    def sites_for(self, condition: str) -> np.ndarray:
        """The site of each test row of ``condition``."""
        return self.condition_sites[condition] if self.condition_sites else self.test_sites

    def site_frames(self) -> dict[str, pd.DataFrame]:
        """Training rows per training site (what each hospital holds)."""
        return {s: self.train[self.train_sites == s].reset_index(drop=True)
                for s in self.site_order if s not in self.holdout and (self.train_sites == s).any()}


@functools.lru_cache(maxsize=4)
def _load(builtin: str | None, csv: str | None) -> pd.DataFrame:
    from mmn_fed.data import load_builtin, read_table

    return load_builtin(builtin)[0] if builtin else read_table(csv)


def load_frame(sc: Scenario) -> pd.DataFrame:
    csv = str((sc.base_dir / sc.data.csv).resolve()) if sc.data.csv else None
    return _load(sc.data.builtin, csv)


def prepare(sc: Scenario, seed: int) -> Prepared:
    """Sites, per-site train/test split (seeded), missingness on training rows and per test condition."""
    from mmn_fed.api import stratify_key
    from mmn_fed.data import check_columns
    from mmn_fed.training import split_indices

    from . import timeseries as ts

    df = load_frame(sc)
    try:
        check_columns(sc.schema, df)
    except Exception as e:
        raise ScenarioError(f"data: {e}") from None
    try:  # a time series' subject keeps all its visits at one site
        sites = (assign_sites(df, sc.schema, sc.sites) if sc.schema.timeseries is None
                 else ts.subject_sites(df, sc.schema, sc.sites))
    except ValueError as e:
        raise ScenarioError(str(e)) from None
    order = list(dict.fromkeys(sorted(sites)))
    for i, r in enumerate(sc.rules):
        for s in r.sites or ():
            if s not in order:
                raise ScenarioError(f"missingness.{i}.sites: unknown site {s!r}; sites are {order}")
    for s in sc.test.holdout_sites:
        if s not in order:
            raise ScenarioError(f"test.holdout_sites: unknown site {s!r}; sites are {order}")
    holdout = list(sc.test.holdout_sites)
    if len(holdout) == len(order):
        raise ScenarioError("test.holdout_sites: every site is held out; nothing is left to train on")
    if sc.schema.timeseries is not None:
        return _prepare_timeseries(sc, seed, df, sites, order, holdout)
    strata = np.asarray(stratify_key(sc.schema, df)).astype(str) + "|" + sites.astype(str)
    keep, test = split_indices(len(df), sc.test.fraction, seed, strata)
    in_holdout = np.isin(sites, holdout)
    train_idx = keep[~in_holdout[keep]]
    test_idx = np.sort(np.concatenate([test, np.flatnonzero(in_holdout & ~np.isin(np.arange(len(df)), test))]))
    train_raw = df.iloc[train_idx].reset_index(drop=True)
    test_raw = df.iloc[test_idx].reset_index(drop=True)
    train_sites, test_sites = sites[train_idx], sites[test_idx]
    train = apply_rules(train_raw, sc.schema, sc.rules, train_sites, seed, "train")
    tests = {}
    for cond in sc.test.conditions:
        if cond == "clean":
            tests[cond] = test_raw
        else:
            tests[cond] = apply_rules(test_raw, sc.schema, sc.rules, test_sites, seed, "test",
                                      flip_mnar=cond == "mnar_flipped")
    return Prepared(train, train_sites, tests, test_sites, order, holdout)


def _prepare_timeseries(sc: Scenario, seed: int, df: pd.DataFrame, sites: np.ndarray, order: list[str],
                        holdout: list[str]) -> Prepared:
    """As ``prepare``, by subject: a seeded share of each site's subjects are test subjects (a deployment site's
    are all test subjects); modality rules on every visit row, then the visits the time mechanisms remove."""
    from . import timeseries as ts

    train_idx, test_idx = ts.split_subjects_by_site(df, sc.schema, sites, sc.test.fraction, seed)
    in_holdout = np.isin(sites, holdout)
    train_idx = train_idx[~in_holdout[train_idx]]
    test_idx = np.sort(np.concatenate([test_idx, np.flatnonzero(in_holdout & ~np.isin(np.arange(len(df)), test_idx))]))
    train_raw, test_raw = df.iloc[train_idx].reset_index(drop=True), df.iloc[test_idx].reset_index(drop=True)
    train, train_sites = ts.apply_time_rules(train_raw, sc.schema, sc.rules, sites[train_idx], seed, "train")
    tests, test_sites = {}, {}
    for cond in sc.test.conditions:
        if cond == "clean":
            tests[cond], test_sites[cond] = test_raw, sites[test_idx]
        else:
            tests[cond], test_sites[cond] = ts.apply_time_rules(test_raw, sc.schema, sc.rules, sites[test_idx], seed,
                                                                "test", flip=cond == "mnar_flipped")
    return Prepared(train, train_sites, tests, sites[test_idx], order, holdout,
                    ts.time_edges(sc.schema, df, sc.test.time_bins), test_sites)


def availability_tables(sc: Scenario) -> list[dict[str, Any]]:
    """Modality availability per site (with row counts) of the training rows and of each test condition, at
    the first and last sweep point (first seed): what the report shows, as JSON-ready tables."""
    from mmn_fed.audit import audit_frame
    from mmn_fed.data import fit_preprocessor

    from .missingness import availability

    points = sc.points()
    chosen = [points[0]] if len(points) == 1 else [points[0], points[-1]]
    out = []
    for values, psc in chosen:
        data = prepare(psc, psc.run.seeds[0])
        if psc.schema.timeseries is not None:
            out += _availability_timeseries(psc, data, values)
            continue
        prep = fit_preprocessor(psc.schema, pd.concat([data.train] + list(data.tests.values()), ignore_index=True))
        label = ", ".join(f"{k} = {v}" for k, v in values.items()) or "scenario"
        frames = [(f"training rows ({label})", data.train, data.train_sites)]
        frames += [(f"test rows, condition {cond} ({label})", frame, data.sites_for(cond)) for cond, frame in data.tests.items()]
        for i, (title, frame, sites) in enumerate(frames):
            tab = availability(prep, frame, sites)
            tab.insert(0, "rows", pd.Series(sites).value_counts().reindex(tab.index).to_numpy())
            entry = {"title": title, "table": tab.to_dict(orient="split")}
            if i == 0:  # what the sites' own audit of their training rows finds (mmn_fed.audit)
                entry["audit"] = audit_frame(psc.schema, frame, sites=sites,
                                             min_cell=psc.run.settings.audit_min_cell).to_dict()
            out.append(entry)
    return out


def _availability_timeseries(sc: Scenario, data: Prepared, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site: steps, subjects, steps per subject and each time-series modality's share of steps; the audit
    of the training steps (presence per step against each per-step label, as the federation's sites run it)."""
    from mmn_fed.audit import audit_frame
    from mmn_fed.sequences import STEP_ROW, build_sequences, row_schema

    from . import timeseries as ts

    label = ", ".join(f"{k} = {v}" for k, v in values.items()) or "scenario"
    frames = [(f"training steps ({label})", data.train, data.train_sites)]
    frames += [(f"test steps, condition {c} ({label})", f, data.sites_for(c)) for c, f in data.tests.items()]
    out = []
    for i, (title, frame, sites) in enumerate(frames):
        entry = {"title": title, "table": ts.availability(sc.schema, frame, sites).to_dict(orient="split")}
        if i == 0:
            steps = build_sequences(sc.schema, frame).steps
            step_sites = np.asarray(sites)[steps[STEP_ROW].to_numpy() - 1]
            entry["audit"] = audit_frame(row_schema(sc.schema), steps, sites=step_sites,
                                         min_cell=sc.run.settings.audit_min_cell).to_dict()
        out.append(entry)
    return out


# ---- training backends ------------------------------------------------------------------------

@dataclass
class Trained:
    """One trained model and the test sites it answers for (None = every test row)."""

    trained: Any  # mmn_fed.model_io.TrainedModel
    label: str = ""  # '' for one global model; the site name for local models
    eval_sites: list[str] | None = None
    info: dict = field(default_factory=dict)


def _configs(sc: Scenario, model: str, seed: int):
    from mmn_fed.model import ModelConfig
    from mmn_fed.training import TrainConfig

    settings = sc.run.settings_for(model, seed)
    return ModelConfig.from_settings(settings), TrainConfig.from_settings(settings, epochs=sc.run.epochs,
                                                                          patience=sc.run.patience)


def train_centralized(sc: Scenario, data: Prepared, model: str, seed: int, run_dir: Path) -> list[Trained]:
    """One model on the pooled training rows of every training site."""
    from mmn_fed.api import train_centralized as fit_pooled

    mc, tc = _configs(sc, model, seed)
    frames = data.site_frames()
    pooled = pd.concat(list(frames.values()), ignore_index=True)
    if sc.schema.timeseries is not None:
        res = _fit_sequences(sc, pooled, mc, tc, {"training": "centralized", "seed": seed})
        return [Trained(res.trained, info={"best_epoch": res.fit_info["best_epoch"], "seconds": res.fit_info["seconds"]})]
    sites = np.concatenate([np.full(len(f), s, dtype=object) for s, f in frames.items()])  # audited per site
    res = fit_pooled(pooled, sc.schema, mc, tc, provenance={"scenario": sc.name, "training": "centralized", "seed": seed},
                     sites=sites)
    return [Trained(res.trained, info={"best_epoch": res.fit_info["best_epoch"], "seconds": res.fit_info["seconds"]})]


def train_local(sc: Scenario, data: Prepared, model: str, seed: int, run_dir: Path) -> list[Trained]:
    """One model per training site on its own rows, scored on that site's test rows only."""
    from mmn_fed.api import train_centralized as fit_pooled

    mc, tc = _configs(sc, model, seed)
    out = []
    for site, frame in data.site_frames().items():
        provenance = {"scenario": sc.name, "training": "local", "site": site, "seed": seed}
        res = (fit_pooled(frame, sc.schema, mc, tc, provenance=provenance) if sc.schema.timeseries is None
               else _fit_sequences(sc, frame, mc, tc, provenance))
        out.append(Trained(res.trained, site, [site], {"best_epoch": res.fit_info["best_epoch"]}))
    return out


def _fit_sequences(sc: Scenario, frame: pd.DataFrame, mc, tc, provenance: dict[str, Any]):
    """A time-series model on some sites' visit rows (``mmn_fed.sequences.train_sequences``)."""
    from mmn_fed.sequences import build_sequences, train_sequences

    return train_sequences(build_sequences(sc.schema, frame), sc.schema, mc, tc,
                           provenance={"scenario": sc.name, **provenance})


# run_federation's own arguments: the schema object (not a TOML path), and where it writes
_SET_BY_RUN_FEDERATION = ("schema", "data_dir", "run_dir")


def train_federated(sc: Scenario, data: Prepared, model: str, seed: int, run_dir: Path) -> list[Trained]:
    """Per-module federated averaging over the training sites (rounds chosen by the run settings: keep-best and
    early stopping on the sites' validation rows by default, at most ``rounds``)."""
    from server.engines import run_federation

    logging.getLogger("flwr").setLevel(logging.WARNING)  # after flwr's import, which sets its own level
    settings = sc.run.settings_for(model, seed)
    result = run_federation(sites=data.site_frames(), schema=sc.schema, run_dir=run_dir / "federation",
                            engine=sc.run.engine, ray_address=sc.run.ray_address or None,
                            **{k: v for k, v in asdict(settings).items() if k not in _SET_BY_RUN_FEDERATION})
    sel = result.extra.get("selection", {})
    return [Trained(result.trained, info={"rounds": sel.get("rounds_run", settings.num_server_rounds),
                                          "final_round": sel.get("final_round"), "seconds": round(result.seconds, 2)})]


BACKENDS: dict[str, Callable[..., list[Trained]]] = {
    "centralized": train_centralized, "local": train_local, "federated": train_federated,
}


# ---- one job ----------------------------------------------------------------------------------

def evaluate_job(sc: Scenario, job: Job, data: Prepared, models: list[Trained]) -> list[dict[str, Any]]:
    from mmn_fed.data import encode
    from mmn_fed.evaluation import evaluate

    records = []
    extra = {"scenario": sc.name, "point": job.point, **{k: sweep_label(v) for k, v in job.values}}
    for t in models:
        prep = t.trained.preprocessor
        for cond, frame in data.tests.items():
            test_sites = data.sites_for(cond)
            rows = np.ones(len(frame), dtype=bool) if t.eval_sites is None else np.isin(test_sites, t.eval_sites)
            if not rows.any():
                continue
            plan = t.trained.metadata.get("provenance", {}).get("missingness") or {}
            ctx = {"model": job.model, "training": job.training, "seed": job.seed, "condition": cond,
                   "site": t.label or "all", "missingness": plan.get("mode", ""),
                   "corrected": ",".join(plan.get("corrected", {})), **extra}
            if sc.schema.timeseries is not None:  # over the test subjects' steps, and per time since their first
                from .timeseries import evaluate_sequences

                records += evaluate_sequences(t.trained, sc.schema, frame[rows].reset_index(drop=True), ctx,
                                              data.time_edges)
                continue
            tensors = encode(prep, frame[rows].reset_index(drop=True))
            sites = test_sites[rows].astype(str) if t.eval_sites is None else None
            records += evaluate(t.trained.model, sc.schema, prep.targets, tensors, ctx, sites=sites)
    return records


def run_job(sc: Scenario, job: Job, out: Path) -> dict[str, Any]:
    """Run one job (in a worker); returns its info dict (also written to runs/<key>/info.json)."""
    import torch

    from mmn_fed.api import save_trained
    from mmn_fed.evaluation import write_metrics

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round logs would drown the progress bar
    run_dir = out / "runs" / job.key
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"key": job.key, "point": job.point, "sweep": {k: sweep_label(v) for k, v in job.values},
                            "model": job.model, "training": job.training, "seed": job.seed}
    try:
        data = prepare(sc, job.seed)
        models = BACKENDS[job.training](sc, data, job.model, job.seed, run_dir)
        records = evaluate_job(sc, job, data, models)
        write_metrics(run_dir / "records.json", records)
        for t in models:
            save_trained(run_dir / (f"model-{t.label}.pt" if t.label else "model.pt"), t.trained)
        if (sc.run.explain and job.model == "multimodn" and models[0].eval_sites is None
                and sc.schema.timeseries is None):  # IMC / CP of static rows; a time series' trajectory is per step
            _explain(models[0].trained, data, run_dir)
        info.update(status="done", models=[t.info for t in models])
    except ScenarioError:
        raise
    except Exception as e:  # a failed job is reported, the others go on
        info.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    info["seconds"] = round(time.perf_counter() - t0, 2)
    (run_dir / "info.json").write_text(json.dumps(info, indent=1, default=str))
    return info


def _explain(trained, data: Prepared, run_dir: Path) -> None:
    """IMC over the clean test rows and CP of the first of them holding every modality (tables only: the
    report draws the heatmaps of the one run it shows)."""
    from mmn_fed.data import encode
    from mmn_fed.interpret import write_explanations

    frame = data.tests.get("clean", next(iter(data.tests.values())))
    write_explanations(trained.model, encode(trained.preprocessor, frame), trained.preprocessor.targets, run_dir)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _run_in_worker(raw: dict, base_dir: str, job: Job, out: str) -> dict[str, Any]:
    sc = Scenario.from_dict(raw, base_dir)
    return run_job(sc, job, Path(out))


# ---- the whole scenario -----------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool = True, stream=sys.stderr):
        self.total, self.done, self.enabled, self.stream, self.t0 = total, 0, enabled, stream, time.perf_counter()

    def update(self, label: str, step: int = 1) -> None:
        self.done += step
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / max(self.total, 1))
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else 0
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} runs "
                          f"{el:5.0f}s elapsed, ~{eta:4.0f}s left  {label[:40]:<40}")
        self.stream.flush()
        if self.done >= self.total:
            self.stream.write("\n")


def run_scenario(sc: Scenario, out: str | Path, workers: int | None = None, progress: bool = True,
                 engine: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Run (or resume) every job, then write metrics.json, results.csv, figures/ and report.html.
    ``engine`` / ``ray_address`` override the scenario's ``run.engine`` / ``run.ray_address`` (an address
    implies engine ``ray``)."""
    from mmn_fed.evaluation import read_metrics, write_metrics

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if ray_address:
        engine = engine or "ray"
    if (engine and engine != sc.run.engine) or (ray_address and ray_address != sc.run.ray_address):
        raw = sc.to_dict()
        raw.setdefault("run", {})["engine"] = engine or sc.run.engine
        if ray_address:
            raw["run"]["ray_address"] = ray_address
        sc = Scenario.from_dict(raw, sc.base_dir)
    (out / "scenario.json").write_text(json.dumps(sc.to_dict(), indent=1, default=str))
    jobs = plan(sc)
    for _, point_sc in {j.point: (j, s) for j, s in jobs}.values():
        prepare(point_sc, point_sc.run.seeds[0])  # fail fast on data-level scenario errors, before any training
    from .report import AVAILABILITY, write_report

    (out / AVAILABILITY).write_text(json.dumps(availability_tables(sc), indent=1))
    todo, infos = [], {}
    for job, psc in jobs:
        info_path = out / "runs" / job.key / "info.json"
        if info_path.exists():
            info = json.loads(info_path.read_text())
            if info.get("status") == "done":
                infos[job.key] = info
                continue
        todo.append((job, psc))
    n_workers = workers if workers is not None else (sc.run.workers or os.cpu_count() or 1)
    n_workers = max(1, min(n_workers, len(todo) or 1))
    bar = Progress(len(jobs), progress)
    bar.done = len(infos)
    # Ray starts its own processes: run those jobs here, one at a time.
    local = [(j, s) for j, s in todo if n_workers == 1 or (j.training == "federated" and s.run.engine == "ray")]
    in_main = {j.key for j, _ in local}
    pooled = [(j, s) for j, s in todo if j.key not in in_main]
    t0 = time.perf_counter()
    if pooled:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_worker_init) as ex:
            futs = {ex.submit(_run_in_worker, s.to_dict(), str(s.base_dir), j, str(out)): j for j, s in pooled}
            for f in cf.as_completed(futs):
                info = f.result()
                infos[info["key"]] = info
                bar.update(f"{futs[f].key} {info['status']}")
    for j, s in local:
        info = run_job(s, j, out)
        infos[info["key"]] = info
        bar.update(f"{j.key} {info['status']}")
    records = []
    for job, _ in jobs:
        path = out / "runs" / job.key / "records.json"
        if infos.get(job.key, {}).get("status") == "done" and path.exists():
            records += read_metrics(path)
    write_metrics(out / "metrics.json", records)
    pd.DataFrame(records).to_csv(out / "results.csv", index=False)
    statuses = [infos[j.key] for j, _ in jobs if j.key in infos]
    summary = {"jobs": len(jobs), "done": sum(i["status"] == "done" for i in statuses),
               "failed": [f"{i['key']}: {i['reason']}" for i in statuses if i["status"] == "failed"],
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    summary["report"] = str(write_report(sc, out, records, infos, summary))
    return summary
