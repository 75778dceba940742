"""Per-module FedAvg as a Flower message strategy: hooks that read like the protocol.

- ``configure_train``: each site gets only its modules (initial state, encoders of the modalities it holds,
  decoders of the tasks it has labels for), as learned from its ``query.profile`` reply.
- ``aggregate_train``: ``server.aggregation.aggregate_modules`` (+ the optional server optimizer).
- ``configure_evaluate`` / ``aggregate_evaluate``: the same subsets, metrics per site and task.
Every message's parameter bytes are logged against what whole-model FedAvg would send.
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

from clients import protocol as P
from mmn_fed.modules import module_of, select_modules

from .aggregation import ServerOptimizer, SiteUpdate, aggregate_modules, params_nbytes


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
    _global: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ---- training ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = P.from_arrayrecord(arrays)
        return self._messages(P.TRAIN, server_round, config, "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, losses = [], {}
        for r in self._ok(replies, "train"):
            site = self.sites[r.metadata.src_node_id]
            params = P.from_arrayrecord(r.content["arrays"])
            self._log_bytes(server_round, site.name, "train", "up", params)
            updates.append(SiteUpdate(site.name, params, dict(r.content["counts"])))
            losses[site.name] = float(r.content["metrics"].get("train_loss", np.nan))
        if not updates:
            return None, None
        averaged, totals = aggregate_modules(self._global, updates)
        new = self.optimizer.step(self._global, averaged, list(totals))
        metrics = {"sites": len(updates), "train_loss": float(np.nanmean(list(losses.values())))}
        metrics.update({f"train_loss/{s}": v for s, v in losses.items()})
        return P.to_arrayrecord(new), P.metric_record(metrics)

    # ---- evaluation ----------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = P.from_arrayrecord(arrays)
        return self._messages(P.EVALUATE, server_round, config, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per site records kept in ``evaluations``; returns n-weighted means per task and metric."""
        sums: dict[str, list[float]] = {}
        for r in self._ok(replies, "evaluate"):
            site = self.sites[r.metadata.src_node_id]
            recs = P.from_json_record(r.content["records"])
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
            content = RecordDict({"arrays": P.to_arrayrecord(params), "config": cfg})
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
                log(WARNING, "%s: node %s replied with an error: %s", phase, r.metadata.src_node_id, r.error.reason)
            elif r.metadata.src_node_id not in self.sites:
                log(WARNING, "%s: reply from unknown node %s ignored", phase, r.metadata.src_node_id)
            else:
                ok.append(r)
        return sorted(ok, key=lambda r: self.sites[r.metadata.src_node_id].name)

    # ---- checkpoint state ------------------------------------------------------------------
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state(), "comm": json.dumps(self.comm),
                "evaluations": json.dumps(self.evaluations)}

    def load_state(self, state: Mapping) -> None:
        self.optimizer.load_state(state["optimizer"])
        self.comm = json.loads(state["comm"])
        self.evaluations = json.loads(state["evaluations"])
