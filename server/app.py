"""Flower ServerApp: federated preprocessing, then rounds of per-module FedAvg with federated evaluation,
a checkpoint after every round (resumed from when the run directory already holds one), and the final
model + metrics.json + history written to the run directory.

The round loop is ours rather than ``Strategy.start`` because it checkpoints and resumes; the strategy's
hooks do the protocol and ``server.aggregation`` does the arithmetic.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from edge_runtime.preprocessing import Preprocessor, merge_summaries
from edge_runtime.schema import Schema
from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.api import missingness_record
from mmn_fed.audit import AuditResult, audit
from mmn_fed.correction import resolve, resolve_sequences
from mmn_fed.data import check_summary, encode, load_builtin
from mmn_fed.evaluation import evaluate, write_metrics
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import build_from_preprocessor, save_model
from mmn_fed.sequences import TS_ENCODER, build_sequences, data_records, encode_sequences, row_schema
from mmn_fed.settings import RunSettings

from . import exchange
from .aggregation import ServerOptimizer
from .strategy import ModularFedAvg, SecureModularFedAvg, SiteInfo

app = ServerApp()


class FederationError(RuntimeError):
    """The federation cannot proceed (no nodes, a checkpoint from another configuration, ...)."""


@dataclass(frozen=True)
class FederationConfig(RunSettings):
    """The run settings (declared, parsed and checked in ``mmn_fed.settings``; docs/settings.md) and what the
    server builds from them."""

    def model_config(self, ts: Schema | None = None) -> ModelConfig:
        """The architecture; a time-series run (``ts``: its schema) of MultiModN uses the time-series encoder."""
        mc = ModelConfig.from_settings(self)
        return replace(mc, encoder=TS_ENCODER) if ts is not None and mc.kind == "multimodn" else mc

    def strategy(self) -> ModularFedAvg:
        """The per-module strategy these settings ask for (secure or plaintext, with its aggregation rule)."""
        self.check()
        kw = dict(optimizer=ServerOptimizer(kind=self.server_optimizer, lr=self.server_lr), aggregation=self.aggregation,
                  trim=self.trim)
        if self.secure_aggregation:
            return SecureModularFedAvg(**kw, secagg_timeout=self.timeout)
        return ModularFedAvg(**kw)


def load_schema(cfg: FederationConfig) -> Schema:
    if cfg.schema:
        schema = Schema.from_toml(cfg.schema)
    elif cfg.data_dir and (Path(cfg.data_dir) / "schema.json").exists():
        schema = Schema.from_dict(json.loads((Path(cfg.data_dir) / "schema.json").read_text()))
    else:
        schema = load_builtin(cfg.dataset)[1]
    if cfg.tasks:
        schema = schema.subset(tasks=[t.strip() for t in cfg.tasks.split(",")])
    return schema


def test_frames(cfg: FederationConfig) -> dict[str, pd.DataFrame]:
    """Held-out test rows per site (simulation only: listed in the data directory's sites.json)."""
    if not cfg.data_dir:
        return {}
    manifest = json.loads((Path(cfg.data_dir) / "sites.json").read_text())
    return {t["name"]: pd.read_csv(Path(cfg.data_dir) / t["file"], low_memory=False) for t in manifest.get("test", [])}


# ---- the run ------------------------------------------------------------------------------

@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FederationConfig.from_run_config(context.run_config)  # types and ranges: SettingsError names the setting
    cfg.check()  # the cross-field rules, once, before waiting for nodes or sending any message
    run_server(grid, cfg)


def wait_for_nodes(grid: Grid, cfg: FederationConfig) -> list[int]:
    end = time.monotonic() + cfg.node_wait
    while True:
        nodes = sorted(grid.get_node_ids())
        if nodes and len(nodes) >= cfg.min_nodes:
            return nodes
        if time.monotonic() > end:
            raise FederationError(f"{len(nodes)} node(s) connected after {cfg.node_wait:.0f} s; need {max(cfg.min_nodes, 1)}")
        time.sleep(1.0)


def send(grid: Grid, nodes: list[int], message_type: str, config: Mapping[str, Any],
         timeout: float) -> tuple[dict[int, Message], dict[int, str]]:
    """One message to each node: (node -> reply, node -> why it failed: its error, or no reply)."""
    msgs = [Message(RecordDict({P.CONFIG: ConfigRecord(dict(config))}), dst_node_id=n, message_type=message_type,
                    group_id="0") for n in nodes]
    got = exchange.send_and_receive(grid, msgs, timeout)
    # the SuperLink answers for a node it lost (Flower's NODE_UNAVAILABLE) with an error reply whose sender is
    # not that node: keep only the nodes' own replies, and say what the SuperLink said about the others
    replies = {r.metadata.src_node_id: r for r in got if r.metadata.src_node_id in nodes}
    stray = sorted({r.error.reason for r in got if r.metadata.src_node_id not in nodes and r.has_error()})
    lost = "no reply" + (f" (the SuperLink: {'; '.join(stray)})" if stray else "")
    failed = {n: (lost if n not in replies else replies[n].error.reason if replies[n].has_error() else
                  "an empty reply") for n in nodes if n not in replies or not replies[n].has_content()}
    return {n: r for n, r in replies.items() if n not in failed}, failed


def query(grid: Grid, nodes: list[int], message_type: str, config: Mapping[str, Any], timeout: float) -> dict[int, Message]:
    replies, failed = send(grid, nodes, message_type, config, timeout)
    if failed:
        raise FederationError(f"{message_type} failed on node(s): {failed}")
    return replies


@dataclass
class Summaries:
    """The sites' answers to the summary query: usable replies (node -> reply) and the sites excluded
    (site name -> reason; ``node <id>`` when a node failed before it could say its name)."""

    replies: dict[int, Message]
    excluded: dict[str, str]

    @property
    def nodes(self) -> list[int]:
        return sorted(self.replies)


def check_quorum(valid: int, excluded: Mapping[str, str], cfg: FederationConfig, when: str) -> None:
    """Stop the run when fewer than ``quorum`` sites are usable (``when``: before round 1, in round k)."""
    if valid < cfg.quorum:
        why = f"; excluded: {dict(excluded)}" if excluded else ""
        raise FederationError(f"{when}: {valid} valid site(s), fewer than quorum = {cfg.quorum}{why}")


def collect_summaries(grid: Grid, nodes: list[int], schema: Schema, cfg: FederationConfig) -> Summaries:
    """Ask every node for its summary. A site whose data is unusable (it replies with its name and the
    reason; ``clients.app.summary``) or whose node fails is excluded and logged with the reason; the run goes
    on with the others if at least ``quorum`` remain (else ``FederationError`` naming the excluded)."""
    replies, failed = send(grid, nodes, P.SUMMARY, {"schema": json.dumps(schema.to_dict()), P.SETTINGS: cfg.site_record()},
                           cfg.timeout)
    excluded = {f"node {n}": reason for n, reason in failed.items()}
    ok = {}
    for n, r in replies.items():
        site = r.content[P.SITE]
        if "error" in site:
            excluded[str(site["name"])] = str(site["error"])
        else:
            ok[n] = r
            if site.get("absent"):
                log(INFO, "site '%s' holds no column of modality(ies) %s: it trains the other modules", site["name"],
                    site["absent"])
    for name, reason in sorted(excluded.items()):
        log(WARNING, "site '%s' excluded: %s", name, reason)
    check_quorum(len(ok), excluded, cfg, "before round 1")
    return Summaries(ok, excluded)


def federated_preprocessing(found: Summaries, schema: Schema) -> tuple[Preprocessor, AuditResult, dict[str, str]]:
    """Sites send mergeable summaries and missingness-audit counts of their training rows (never rows); the
    server merges the summaries of the usable sites (``collect_summaries``) and tests each site's
    presence-vs-label tables (``mmn_fed.audit``). Also returns a digest of each site's summary (site name ->
    sha256), which tells a resumed run whether a site's data changed."""
    ordered = sorted(found.replies.values(), key=lambda r: str(r.content[P.SITE]["name"]))
    summaries = {str(r.content[P.SITE]["name"]): R.from_json_record(r.content[P.SUMMARY_RECORD]) for r in ordered}
    merged = merge_summaries(list(summaries.values()))
    rows = row_schema(schema) if schema.timeseries is not None else schema  # time series: the step table's schema
    check_summary(rows, merged, f" pooled over {len(ordered)} site(s)")  # one-class pooled labels: stop before round 1
    prep = Preprocessor.from_summary(rows, merged)
    found = audit({str(r.content[P.SITE]["name"]): R.from_json_record(r.content[P.AUDIT_RECORD]) for r in ordered})
    digests = {name: hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()
               for name, s in summaries.items()}
    return prep, found, digests


def check_site_data(run_dir: Path, found: Summaries, schema: Schema) -> None:
    """Before resuming: each site that answers must summarize the same training rows as when the run began
    (``run_dir/site_data.json``); a changed site is refused by name (the checkpoint, audit and preprocessing
    were computed from the old rows). A site that is absent now is not compared."""
    path = run_dir / "site_data.json"
    if not path.exists():  # a run directory from before this check
        return
    before = json.loads(path.read_text())
    _, _, now = federated_preprocessing(found, schema)
    changed = sorted(n for n, d in now.items() if before.get(n) != d)
    if changed:
        raise FederationError(
            f"{run_dir}: the training data of site(s) {changed} changed since this run began (their summaries differ "
            f"from {path.name}); its checkpoint was trained on the old rows. Use a new run directory, or restore the data")


def missingness_plan(run_dir: Path, cfg: FederationConfig, found: AuditResult | None, schema: Schema,
                     ts: Schema | None = None) -> dict[str, Any]:
    """Decide (``missingness`` setting + the audit) which modalities the sites balance; log it and write
    ``run_dir/audit.json`` (read back when the run resumes, so a resumed run corrects the same modalities)."""
    path = run_dir / "audit.json"
    if found is None:  # resuming: the decision made before round 1
        return json.loads(path.read_text()) if path.exists() else missingness_record(cfg.missingness, {}, None)
    if ts is not None:  # the audit of the steps, and the visit rate (mmn_fed.correction.resolve_sequences)
        plan = missingness_record(cfg.missingness, resolve_sequences(cfg.missingness, found, row_schema(ts)), found)
    else:
        plan = missingness_record(cfg.missingness, resolve(cfg.missingness, found, schema), found)
    for line in found.lines(only_flagged=True):
        log(INFO, "missingness audit: %s", line)
    log(INFO, "%s", plan["summary"])
    _write_json(path, plan)
    return plan


def _ts_config(ts: Schema | None) -> dict[str, str]:
    """The message config entry that makes sites train on sequences (none for a static table)."""
    return {P.TIMESERIES: json.dumps(ts.to_dict())} if ts is not None else {}


def profile_sites(grid: Grid, nodes: list[int], prep_json: str, cfg: FederationConfig,
                  ts: Schema | None = None) -> dict[int, SiteInfo]:
    replies = query(grid, nodes, P.PROFILE, {"prep": prep_json, "model-config": json.dumps(cfg.model_config(ts).to_dict()),
                                             P.SETTINGS: cfg.site_record(), **_ts_config(ts)}, cfg.timeout)
    sites = {n: SiteInfo(n, str(r.content[P.SITE]["name"]), {k: int(v) for k, v in r.content[P.COUNTS].items()})
             for n, r in replies.items()}
    names = [s.name for s in sites.values()]
    if len(set(names)) != len(names):
        raise FederationError(f"two nodes claim the same site name: {sorted(names)}")
    return sites


def run_server(grid: Grid, cfg: FederationConfig) -> dict[str, Any]:
    torch.set_num_threads(1)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    exchange.timings.take()  # this run's phases only
    schema = load_schema(cfg)
    ts = schema if schema.timeseries is not None else None  # sites train sequences; a time-series encoder
    ckpt = load_checkpoint(run_dir / "checkpoint.pt", cfg)
    strategy = cfg.strategy()
    summaries = collect_summaries(grid, wait_for_nodes(grid, cfg), schema, cfg)  # sites with unusable data excluded
    nodes = summaries.nodes
    _write_json(run_dir / "excluded.json", summaries.excluded)
    if ckpt:
        prep_json, params, start, history = ckpt["prep"], ckpt["params"], ckpt["round"] + 1, json.loads(ckpt["history"])
        best = (ckpt["best"]["score"], ckpt["best"]["round"], ckpt["best"]["params"])
        strategy.load_state(ckpt["strategy"])
        torch.set_rng_state(ckpt["rng"])
        check_site_data(run_dir, summaries, schema)
        log(INFO, "resuming %s after round %d", run_dir, ckpt["round"])
    else:
        fitted, found, digests = federated_preprocessing(summaries, schema)
        _write_json(run_dir / "site_data.json", digests)
        prep_json = json.dumps(fitted.to_dict(), sort_keys=True)
        torch.manual_seed(cfg.seed)
        model = build_from_preprocessor(Preprocessor.from_dict(json.loads(prep_json)), cfg.model_config(ts), ts)
        params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        start, history = 1, []
        best = (-float("inf"), 0, params)
    prep = Preprocessor.from_dict(json.loads(prep_json))
    plan = missingness_plan(run_dir, cfg, None if ckpt else found, prep.schema, ts)
    strategy.sites = profile_sites(grid, nodes, prep_json, cfg, ts)
    # what each site can train and its aggregation weights (time series: observed steps), whatever the engine
    _write_json(run_dir / "profile.json", {s.name: s.counts for s in strategy.sites.values()})
    strategy.summary()
    tests = test_frames(cfg)
    config = ConfigRecord({"prep": prep_json, "model-config": json.dumps(cfg.model_config(ts).to_dict()),
                           P.SETTINGS: cfg.site_record(), P.CORRECTION: json.dumps(plan["corrected"]),
                           **_ts_config(ts)})
    stopped = should_stop(start - 1, best[1], cfg.patience_rounds)  # a resumed run that had stopped stays stopped

    def complete(rnd: int, new: dict[str, np.ndarray], entry: dict[str, Any], eval_metrics) -> bool:
        """Round ``rnd``'s federated evaluation has come: score, keep-best, early stop, history, checkpoint.
        True when the run stops after this round."""
        nonlocal best
        entry["federated_eval"] = dict(eval_metrics or {})
        if tests:
            entry["test"] = {f"{r['task']}/{r['metric']}": r["value"] for r in
                             held_out_records(new, prep, cfg, tests, per_combination=False, ts=ts)
                             if r["site"] == "all" and r["state"] == "final"}
        score = validation_score(entry["federated_eval"], prep.schema)
        if score > best[0]:
            best = (score, rnd, new)
        entry["validation_score"] = score
        entry["best_round"] = best[1]
        stop = should_stop(rnd, best[1], cfg.patience_rounds)
        if stop:
            entry["stopped"] = {"after_round": rnd, "patience_rounds": cfg.patience_rounds, "best_round": best[1]}
        history.append(entry)
        shown = {**entry["train"], **entry["federated_eval"], **entry.get("test", {})}
        if len(strategy.sites) > 8:  # the per-site losses stay in history.json; a line per round stays readable
            shown = {k: v for k, v in shown.items() if not k.startswith("train_loss/")}
        log(INFO, "round %d: %s", rnd, {k: round(v, 4) for k, v in shown.items() if v == v})
        save_checkpoint(run_dir / "checkpoint.pt", cfg, rnd, new, prep_json, strategy, history, best)
        return stop

    # One message per site per round: round r's train message carries the model after round r-1 and asks the
    # sites to score it first (P.EVALUATE_ROUND), so round r-1 is scored, kept or stopped on when round r's
    # replies come; the last round's model gets an evaluate message of its own. A round is checkpointed once
    # scored: a crash in between re-runs it (seeded by (seed, round, site): the same update).
    pending: tuple[int, dict[str, np.ndarray], dict[str, Any], float] | None = None  # aggregated, not yet scored
    for rnd in range(start, cfg.num_server_rounds + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        if pending:
            pending[2]["seconds"] = t0 - pending[3]
        replies = train_phase(grid, strategy, rnd, params, config, cfg.timeout, evaluate_round=pending[0] if pending else None)
        if pending:
            stopped = complete(*pending[:3], strategy.aggregate_evaluate(pending[0], replies, folded=True))
            pending = None
            if stopped:  # this round's updates are not used (docs/federation.md, "Round time")
                log(INFO, "round %d's updates discarded: the run stops after round %d", rnd, rnd - 1)
                break
        params, entry = aggregate_round(strategy, rnd, replies, cfg.quorum)
        pending = (rnd, params, entry, t0)
    if pending:  # the last round trained: its own evaluate message
        scored = evaluate_phase(grid, strategy, pending[0], pending[1], config, cfg.timeout)
        pending[2]["seconds"] = time.perf_counter() - pending[3]
        stopped = complete(*pending[:3], scored)
    last = history[-1]["round"] if history else 0
    if stopped:
        log(INFO, "stopped after round %d: no improvement for %d rounds; final model = round %d", last,
            last - best[1], best[1] if cfg.keep_best else last)
    selection = {"rounds_run": last, "max_rounds": cfg.num_server_rounds, "stopped_early": bool(stopped),
                 "patience_rounds": cfg.patience_rounds, "best_round": best[1],
                 "best_validation_score": best[0] if best[1] else None, "keep_best": cfg.keep_best,
                 "final_round": last}
    if cfg.keep_best and best[1] > 0:
        log(INFO, "final model: round %d (best federated validation score %.4f)", best[1], best[0])
        params = best[2]
        selection["final_round"] = best[1]
    return finish(run_dir, cfg, params, prep, strategy, history, tests, selection, plan, ts, summaries.excluded)


def train_phase(grid: Grid, strategy: ModularFedAvg, rnd: int, params: dict[str, np.ndarray], config: ConfigRecord,
                timeout: float, evaluate_round: int | None = None) -> list[Message]:
    """Round ``rnd``'s train message to every site (each its modules of ``params``) and their replies. With
    ``evaluate_round`` k (``params`` = the model after round k), the sites score ``params`` before training."""
    if evaluate_round is not None:
        config = ConfigRecord({**dict(config), P.EVALUATE_ROUND: evaluate_round})
    return exchange.send_and_receive(grid, strategy.configure_train(rnd, R.to_arrayrecord(params), config, grid), timeout)


def evaluate_phase(grid: Grid, strategy: ModularFedAvg, rnd: int, params: dict[str, np.ndarray], config: ConfigRecord,
                   timeout: float):
    """An evaluate message of ``params`` (the model after round ``rnd``) to every site: the federated evaluation."""
    replies = exchange.send_and_receive(grid, strategy.configure_evaluate(rnd, R.to_arrayrecord(params), config, grid), timeout)
    return strategy.aggregate_evaluate(rnd, replies)


def aggregate_round(strategy: ModularFedAvg, rnd: int, replies: list[Message],
                    quorum: int = 1) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Aggregate round ``rnd``'s train replies per module: (new params, history entry without its evaluation).
    Fewer than ``quorum`` accepted updates stop the run (``FederationError`` with the round's failures)."""
    received = sum(1 for r in replies if not r.has_error())
    arrays, train_metrics = strategy.aggregate_train(rnd, replies)
    if arrays is None:
        raise FederationError(f"round {rnd}: no site returned an update; failures: {strategy.round_failures(rnd)}")
    if received < quorum:  # updates rejected by validation count: the site is up (docs/federation.md, "Faults")
        failures = {f["site"]: f["reason"] for f in strategy.round_failures(rnd) if f["phase"] != "validation"}
        raise FederationError(f"round {rnd}: {received} site(s) returned an update, fewer than quorum = {quorum}; "
                              f"failures: {failures}")
    params = R.from_arrayrecord(arrays)
    moved = lambda d: sum(c["bytes"] for c in strategy.comm if c["round"] == rnd and c["direction"] == d)  # noqa: E731
    entry = {"round": rnd, "seconds": None, "train": dict(train_metrics or {}),
             "federated_eval": {}, "bytes_down": moved("down"), "bytes_up": moved("up"),
             "rejected": {f["site"]: f["reason"] for f in strategy.round_failures(rnd) if f["phase"] == "validation"},
             "failures": [f for f in strategy.round_failures(rnd) if f["phase"] != "validation"]}
    secagg = [r for r in getattr(strategy, "secagg_rounds", []) if r["round"] == rnd]
    if secagg:
        entry["secagg"] = secagg[-1]
    return params, entry


def should_stop(rnd: int, best_round: int, patience: int) -> bool:
    """Early stopping across rounds: after round ``rnd``, the best round is ``patience`` or more rounds old.
    Never before a first scored round (``best_round`` 0), never when ``patience`` is 0."""
    return patience > 0 and best_round > 0 and rnd - best_round >= patience


def validation_score(eval_metrics, schema: Schema) -> float:
    """Higher is better; -inf if unavailable. Minus the Brier score of the classification tasks, a mean
    weighted by their task weights; each task's Brier is n-weighted over the sites, which makes it exactly the
    Brier score of all validation rows pooled (the mean of a per-row loss, unlike AUROC). A schema with
    regression tasks only: the first one's -MSE. Why Brier and not the per-site AUROC: docs/federation.md,
    "How many rounds"."""
    metrics = dict(eval_metrics or {})
    ok = lambda v: v is not None and v == v  # noqa: E731  (NaN: no labelled validation row for that task)
    cls = [(t.weight, metrics.get(f"{t.name}/brier")) for t in schema.tasks.values() if t.kind != "regression"]
    cls = [(w, float(v)) for w, v in cls if ok(v) and w > 0]
    if cls:
        return -sum(w * v for w, v in cls) / sum(w for w, _ in cls)
    if any(t.kind != "regression" for t in schema.tasks.values()):
        return -float("inf")
    v = metrics.get(f"{next(iter(schema.tasks.values())).name}/mse")
    return -float(v) if ok(v) else -float("inf")


def global_model(params: Mapping[str, np.ndarray], prep: Preprocessor, cfg: FederationConfig,
                 ts: Schema | None = None) -> torch.nn.Module:
    model = build_from_preprocessor(prep, cfg.model_config(ts), ts)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in params.items()})
    model.eval()
    return model


def held_out_records(params, prep: Preprocessor, cfg: FederationConfig, tests: Mapping[str, pd.DataFrame],
                 per_combination: bool = True, ts: Schema | None = None) -> list[dict[str, Any]]:
    """Global model on held-out rows: pooled (site 'all') and per site, per modality combination (``ts``, a
    time-series run: over the test subjects' steps)."""
    model = global_model(params, prep, cfg, ts)
    ctx = {"model": cfg.model, "training": "federated", "seed": cfg.seed, "condition": "clean"}
    if ts is not None:  # time series: over the test subjects' steps, pooled and per site
        dyn = ts.timeseries.step_modalities
        out = []
        for name, df in {"all": pd.concat(list(tests.values()), ignore_index=True), **tests}.items():
            data = encode_sequences(prep, build_sequences(ts, df), dyn)
            out += data_records(model, prep, data, {**ctx, "site": name})
            if not per_combination:
                break
        return out
    pooled = pd.concat(list(tests.values()), ignore_index=True)
    records = evaluate(model, prep.schema, prep.targets, encode(prep, pooled), {**ctx, "site": "all"},
                       per_combination=per_combination)
    if per_combination:
        for name, df in tests.items():
            records += evaluate(model, prep.schema, prep.targets, encode(prep, df), {**ctx, "site": name},
                                per_state=False, per_combination=True)
    return records


def finish(run_dir: Path, cfg: FederationConfig, params, prep: Preprocessor, strategy: ModularFedAvg,
           history: list[dict], tests: Mapping[str, pd.DataFrame], selection: Mapping[str, Any],
           plan: Mapping[str, Any], ts: Schema | None = None, excluded: Mapping[str, str] | None = None) -> dict[str, Any]:
    model = global_model(params, prep, cfg, ts)
    save_model(run_dir / "model.pt", model, prep, cfg.model_config(ts),
               {"federated": asdict(cfg)}, {"training": "federated", "sites": sorted(s.name for s in strategy.sites.values()),
                                            "excluded": dict(excluded or {}),
                                            "rounds": selection["rounds_run"], "final_round": selection["final_round"],
                                            "seed": cfg.seed, "missingness": dict(plan)},
               extra={"timeseries_schema": ts.to_dict()} if ts is not None else None)
    last = max((e["round"] for e in strategy.evaluations), default=0)
    records = [r for r in strategy.evaluations if r["round"] == last]
    if tests:
        records = held_out_records(params, prep, cfg, tests, ts=ts) + records
    corrected = ",".join(plan["corrected"])
    records = [{**r, "missingness": cfg.missingness, "corrected": corrected} for r in records]
    write_metrics(run_dir / "metrics.json", records)
    _write_json(run_dir / "history.json", history)
    _write_json(run_dir / "comm.json", strategy.comm)
    _write_json(run_dir / "evaluation.json", strategy.evaluations)
    _write_json(run_dir / "failures.json", strategy.failures)  # failed sites and rejected updates, per round
    _write_json(run_dir / "selection.json", selection)  # rounds run, early stop, the round the final model is
    _write_json(run_dir / "timing.json", exchange.timings.take())  # each phase: sent, replies (server.exchange)
    if isinstance(strategy, SecureModularFedAvg):
        _write_json(run_dir / "secagg.json", strategy.secagg_rounds)
    return {"run_dir": str(run_dir), "history": history}


# ---- checkpoints ---------------------------------------------------------------------------

def save_checkpoint(path: Path, cfg: FederationConfig, rnd: int, params, prep_json: str, strategy: ModularFedAvg,
                    history: list[dict], best: tuple) -> None:
    """Atomically (write then rename) everything needed to continue after round ``rnd``."""
    st = strategy.state()
    opt = st["optimizer"]
    payload = {
        "format": "mmn-fed-checkpoint", "round": rnd, "config": json.dumps(cfg.fingerprint(), sort_keys=True),
        "params": {k: torch.from_numpy(np.asarray(v).copy()) for k, v in params.items()},
        "prep": prep_json, "history": json.dumps(history), "rng": torch.get_rng_state(),
        "best": {"score": float(best[0]), "round": int(best[1]),
                 "params": {k: torch.from_numpy(np.asarray(v).copy()) for k, v in best[2].items()}},
        "strategy": {"optimizer": {"kind": opt["kind"], "steps": opt["steps"],
                                   "m": {k: torch.from_numpy(v) for k, v in opt["m"].items()},
                                   "v": {k: torch.from_numpy(v) for k, v in opt["v"].items()}},
                     **{k: v for k, v in st.items() if k != "optimizer"}},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, cfg: FederationConfig) -> dict | None:
    if not path.exists():
        return None
    ck = torch.load(path, weights_only=True)
    if ck.get("format") != "mmn-fed-checkpoint":
        raise FederationError(f"{path} is not an mmn-fed checkpoint")
    changes = cfg.fingerprint_changes(json.loads(ck["config"]))  # settings a checkpoint left out count as defaults
    if changes:
        raise FederationError(f"{path} was written with other settings ({'; '.join(changes)}); use a new run directory "
                              "or the same settings")
    ck["params"] = {k: v.numpy() for k, v in ck["params"].items()}
    ck["best"]["params"] = {k: v.numpy() for k, v in ck["best"]["params"].items()}
    opt = ck["strategy"]["optimizer"]
    opt["m"] = {k: v.numpy() for k, v in opt["m"].items()}
    opt["v"] = {k: v.numpy() for k, v in opt["v"].items()}
    return ck


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)
