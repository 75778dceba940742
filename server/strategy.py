"""Per-module FedAvg as a Flower message strategy: hooks that read like the protocol.

- ``configure_train``: each site gets only its modules (initial state, encoders of the modalities it holds,
  decoders of the tasks it has labels for), as learned from its ``query.profile`` reply.
- ``aggregate_train``: ``server.validation.validate_updates`` (always on: malformed, unexpected or outlying
  updates are rejected, logged and recorded; the round goes on with the others), then per-module averaging
  (``aggregation``: ``mean`` = ``server.aggregation.aggregate_modules``; ``trimmed-mean`` or ``median`` from
  ``server.robust``) and the optional server optimizer.
- ``configure_evaluate`` / ``aggregate_evaluate``: the same subsets, metrics per site and task. The round loop
  (``server.app``) folds each round's evaluation into the next round's train message, so ``configure_evaluate``
  sends the last round's only.
Every message's parameter bytes are logged against what whole-model FedAvg would send.

``SecureModularFedAvg`` is the same strategy under secure aggregation (``server.secagg``): the server only
learns each module's weighted sum over the sites holding it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.modules import module_of, select_modules
from mmn_fed.settings import SETTING

from .aggregation import ServerOptimizer, SiteUpdate, aggregate_modules, params_nbytes
from .robust import median_modules, trimmed_mean_modules
from .secagg import MASKED, SecAggError, SecureAggregationMixin, excluded_modules
from .validation import validate_updates

AGGREGATIONS = SETTING["aggregation"].choices  # declared with the setting (mmn_fed.settings)


@dataclass
class SiteInfo:
    """A node as the server knows it: its site name and the modules it trains (with counts)."""

    node_id: int
    name: str
    counts: dict[str, int]

    @property
    def modules(self) -> list[str]:
        return [m for m, c in self.counts.items() if c > 0]


@dataclass
class ModularFedAvg(Strategy):
    """Per-module weighted averaging over the sites holding each module. Node ids -> SiteInfo in ``sites``."""

    sites: dict[int, SiteInfo] = field(default_factory=dict)
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    comm: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # errors and rejected updates, per round
    aggregation: str = "mean"  # mean | trimmed-mean | median
    trim: float = 0.25  # trimmed-mean: share of the holders cut at each end, per coordinate
    _global: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation '{self.aggregation}' unknown; expected one of {', '.join(AGGREGATIONS)}")
        if self.aggregation == "trimmed-mean" and not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")

    # ---- training ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = R.from_arrayrecord(arrays)
        return self._messages(P.TRAIN, server_round, config, "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, losses, replies_metrics = [], {}, []
        for r in self._ok(replies, "train"):
            site = self.sites[r.metadata.src_node_id]
            params = R.from_arrayrecord(r.content[P.ARRAYS])
            self._log_bytes(server_round, site.name, "train", "up", params)
            updates.append(SiteUpdate(site.name, params, dict(r.content[P.COUNTS])))
            losses[site.name] = float(r.content[P.METRICS].get("train_loss", np.nan))
            replies_metrics.append(dict(r.content[P.METRICS]))
        if not updates:
            return None, None
        report = validate_updates(self._global, updates, sent={s.name: s.modules for s in self.sites.values()},
                                  max_counts={s.name: s.counts for s in self.sites.values()})
        self._record_rejections(server_round, report.rejected)
        metrics = {"sites": len(report.accepted), "rejected": len(report.rejected),
                   "train_loss": float(np.nanmean([losses[u.site] for u in report.accepted] or [np.nan]))}
        metrics.update({f"train_loss/{s}": v for s, v in losses.items()})
        metrics.update(_dp_metrics(replies_metrics))
        if not report.accepted:  # every reply rejected: the model stays as it was, the federation goes on
            log(WARNING, "round %d: every update was rejected; the model is unchanged", server_round)
            return R.to_arrayrecord(self._global), R.metric_record(metrics)
        averaged, totals = self.combine(report.accepted)
        new = self.optimizer.step(self._global, averaged, list(totals))
        return R.to_arrayrecord(new), R.metric_record(metrics)

    def combine(self, updates: list[SiteUpdate]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Per-module aggregation of validated updates with the configured rule."""
        if self.aggregation == "trimmed-mean":
            return trimmed_mean_modules(self._global, updates, trim=self.trim)
        if self.aggregation == "median":
            return median_modules(self._global, updates)
        return aggregate_modules(self._global, updates)

    def _record_rejections(self, server_round: int, rejected: Mapping[str, list[str]]) -> None:
        """Rejected updates join the round's failures (phase "validation"); already logged by server.validation."""
        for site, reasons in rejected.items():
            self.failures.append({"round": server_round, "phase": "validation", "site": site, "reason": "; ".join(reasons)})
            log(WARNING, "round %d: update of site '%s' rejected: %s", server_round, site, "; ".join(reasons))

    def round_failures(self, server_round: int) -> list[dict[str, Any]]:
        return [f for f in self.failures if str(f["round"]) == str(server_round)]

    # ---- evaluation ----------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = R.from_arrayrecord(arrays)
        return self._messages(P.EVALUATE, server_round, config, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message], folded: bool = False) -> MetricRecord | None:
        """Per site records kept in ``evaluations``; returns n-weighted means per task and metric. ``folded``: the
        replies are the next round's train replies, carrying this round's records (``P.EVALUATE_ROUND``; their
        failures are that round's train failures, recorded there)."""
        sums: dict[str, list[float]] = {}
        if folded:
            ok = sorted((r for r in replies if not r.has_error() and r.metadata.src_node_id in self.sites
                         and P.RECORDS in r.content), key=lambda r: self.sites[r.metadata.src_node_id].name)
        else:
            ok = self._ok(replies, "evaluate")
        for r in ok:
            site = self.sites[r.metadata.src_node_id]
            recs = R.from_json_record(r.content[P.RECORDS])
            self.evaluations.extend({**rec, "round": server_round, "site": site.name} for rec in recs)
            for rec in recs:
                if rec["value"] is not None and rec["value"] == rec["value"]:
                    s = sums.setdefault(f"{rec['task']}/{rec['metric']}", [0.0, 0.0])
                    s[0] += rec["value"] * rec["n"]
                    s[1] += rec["n"]
        return MetricRecord({k: s[0] / s[1] for k, s in sums.items() if s[1] > 0}) if sums else None

    def summary(self) -> None:
        log(INFO, "\t├── ModularFedAvg: %d sites, server optimizer %s", len(self.sites), self.optimizer.kind)
        for s in self.sites.values():
            log(INFO, "\t│   %s: %s", s.name, ", ".join(s.modules))

    # ---- helpers -------------------------------------------------------------------------
    def _messages(self, message_type: str, server_round: int, config: ConfigRecord, phase: str) -> list[Message]:
        out = []
        for node_id, site in sorted(self.sites.items(), key=lambda kv: kv[1].name):
            params = select_modules(self._global, site.modules)
            self._log_bytes(server_round, site.name, phase, "down", params)
            cfg = ConfigRecord({**dict(config), "server-round": server_round})
            content = RecordDict({P.ARRAYS: R.to_arrayrecord(params), P.CONFIG: cfg})  # one packed buffer
            out.append(Message(content, dst_node_id=node_id, message_type=message_type, group_id=str(server_round)))
        return out

    def _log_bytes(self, server_round: int, site: str, phase: str, direction: str, params: Mapping[str, np.ndarray]) -> None:
        self.comm.append({"round": server_round, "site": site, "phase": phase, "direction": direction,
                          "bytes": params_nbytes(params), "fedavg_bytes": params_nbytes(self._global),
                          "modules": sorted({module_of(k) for k in params})})

    def _ok(self, replies: Iterable[Message], phase: str) -> list[Message]:
        ok = []
        for r in replies:
            if r.has_error():
                site = self.sites.get(r.metadata.src_node_id)
                self.failures.append({"round": r.metadata.group_id, "phase": phase, "site": site.name if site else None,
                                      "reason": r.error.reason})
                log(WARNING, "%s: node %s replied with an error: %s", phase, r.metadata.src_node_id, r.error.reason)
            elif r.metadata.src_node_id not in self.sites:
                log(WARNING, "%s: reply from unknown node %s ignored", phase, r.metadata.src_node_id)
            else:
                ok.append(r)
        return sorted(ok, key=lambda r: self.sites[r.metadata.src_node_id].name)

    # ---- checkpoint state ------------------------------------------------------------------
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state(), "comm": json.dumps(self.comm),
                "evaluations": json.dumps(self.evaluations), "failures": json.dumps(self.failures, default=str)}

    def load_state(self, state: Mapping) -> None:
        self.optimizer.load_state(state["optimizer"])
        self.comm = json.loads(state["comm"])
        self.evaluations = json.loads(state["evaluations"])
        self.failures = json.loads(state.get("failures", "[]"))


def _dp_metrics(metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """Differential privacy (clients.privacy): the largest epsilon any site reports having spent."""
    eps = [float(m["dp_epsilon"]) for m in metrics if "dp_epsilon" in m]
    return {"dp_epsilon": max(eps)} if eps else {}


@dataclass
class SecureModularFedAvg(SecureAggregationMixin, ModularFedAvg):
    """Per-module FedAvg under secure aggregation (``server.secagg``): the server sums masked vectors and learns
    each module's weighted sum over the surviving sites that hold it, never one site's update. Validation can
    then only be structural (``SecAggServer.collect_masked``: modules and vector shapes); robust rules cannot
    apply (they need each site's values). Modules held by fewer than two sites are left out of the secure sum
    and stay as they are. If too few sites take part (below the threshold ``t = n - ceil(n/3)``), the round is
    logged and recorded in ``failures`` and the model is left unchanged. ``secagg_rounds``: per round,
    survivors, dropped, hidden modules, rejected sites and the protocol's bytes up and down."""

    secagg_rounds: list[dict[str, Any]] = field(default_factory=list)
    secagg_timeout: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aggregation != "mean":
            raise ValueError(f"aggregation '{self.aggregation}' needs each site's update: it cannot be combined "
                             "with secure aggregation (use 'mean')")
        self._secagg_failed = False

    def configure_train(self, server_round, arrays, config, grid):
        self._secagg = None
        try:
            msgs = super().configure_train(server_round, arrays, config, grid)
        except SecAggError as e:  # e.g. fewer sites than a secure sum needs
            log(WARNING, "round %d: secure aggregation could not start: %s", server_round, e)
            msgs = []
        self._secagg_failed = not msgs
        if self._secagg_failed:
            self.failures.append({"round": server_round, "phase": "secagg", "site": None,
                                  "reason": "secure aggregation could not start (too few sites); model unchanged"})
        else:
            left_out = excluded_modules(self._global, self._secagg.plan)
            if left_out:
                log(WARNING, "round %d: modules held by fewer than %d sites stay unchanged under secure aggregation: %s",
                    server_round, self.secagg_min_holders, ", ".join(left_out))
        return msgs

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = self._ok(replies, "train")  # records failed sites
        for r in ok:
            site = self.sites[r.metadata.src_node_id]
            if MASKED in r.content:  # masked vectors are keyed by module, uint64 (what the site really sent)
                rec = r.content[MASKED]
                self.comm.append({"round": server_round, "site": site.name, "phase": "train", "direction": "up",
                                  "bytes": int(sum(rec[m].numpy().nbytes for m in rec.keys())),
                                  "fedavg_bytes": params_nbytes(self._global), "modules": sorted(rec.keys())})
        if self._secagg_failed:
            return R.to_arrayrecord(self._global), MetricRecord({"sites": 0})
        if not ok:
            return None, None
        n_rounds = len(self.secagg_rounds)
        arrays, metrics = super().aggregate_train(server_round, ok)
        if arrays is None:  # too few sites survived to unmask: logged by the mixin
            self.failures.append({"round": server_round, "phase": "secagg", "site": None,
                                  "reason": "secure aggregation aborted (too few survivors); model unchanged"})
            return R.to_arrayrecord(self._global), MetricRecord({"sites": 0})
        if len(self.secagg_rounds) > n_rounds:
            self._record_rejections(server_round, {s: [r] for s, r in self.secagg_rounds[-1]["rejected"].items()})
        extra = _dp_metrics([dict(r.content[P.METRICS]) for r in ok if P.METRICS in r.content])
        return arrays, MetricRecord({**dict(metrics or {}), **extra})

    def state(self) -> dict:
        return {**super().state(), "secagg_rounds": json.dumps(self.secagg_rounds)}

    def load_state(self, state: Mapping) -> None:
        super().load_state(state)
        self.secagg_rounds = json.loads(state.get("secagg_rounds", "[]"))
