"""Secure aggregation, server side: the server relays keys and shares, sums masked vectors per module and
removes what is left of the masks. It ends up with each module's sum of ``count * value`` over the sites
that hold it and the sum of their counts (the per-module weighted average), never one site's update.

The protocol and its fixed-point error bound are described in ``mmn_fed.secagg`` and docs/security.md.

Integration with the per-module strategy (four exchanges per round; a site may drop at any point):

    plan = plan_round(global_params, {site: modules}, server_round)          # configure_train
    srv = SecAggServer(plan)
    adverts = srv.collect_adverts({site: reply of "query.secagg-keys"})      # -> broadcast to all
    inboxes = srv.route_shares({site: reply of "query.secagg-shares"})     # -> train message per site
    survivors = srv.collect_masked({site: masked vectors from "train"})      # aggregate_train
    result = srv.unmask({site: reply of "query.secagg-unmask"(survivors)})
    new_params = result.averaged(global_params)                              # carry forward the rest

``run_round`` runs the same exchanges in-process over simulated sites (tests, benchmarks).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.modules import group_by_module, module_of
from mmn_fed.secagg import (FRAC_BITS, KEYS_ACTION, MASKED, SECAGG, SHARES_ACTION, UNMASK_ACTION, RoundPlan, SecAggClient,
                            SecAggError, default_threshold, dequantize, pair_mask, pair_sign, prg, raw_public, self_seed,
                            shamir_combine)

from . import exchange

logger = logging.getLogger(__name__)

__all__ = ["RoundPlan", "SecAggError", "SecAggResult", "SecAggServer", "SecAggRound", "plan_round", "run_round"]


def plan_round(global_params: Mapping[str, np.ndarray], site_modules: Mapping[str, Sequence[str]], server_round: int,
               threshold: int | None = None, frac_bits: int = FRAC_BITS, min_holders: int = 2) -> RoundPlan:
    """The plan every site receives before step 1. Modules held by fewer than ``min_holders`` sites are
    left out (a sum over one site *is* that site's update): ``excluded_modules(global_params, plan)`` lists them."""
    layout = {m: tuple((k, tuple(np.shape(v))) for k, v in sorted(p.items()))
              for m, p in group_by_module(global_params).items()}
    sites = tuple(sorted(site_modules))
    holders = {m: [s for s in sites if m in site_modules[s]] for m in layout}
    shared = {m for m, h in holders.items() if len(h) >= min_holders}
    for s in sites:
        unknown = set(site_modules[s]) - set(layout)
        if unknown:
            raise SecAggError(f"site '{s}' is assigned modules absent from the global model: {sorted(unknown)}")
    t = default_threshold(len(sites)) if threshold is None else threshold
    if not 2 <= t <= len(sites):
        raise SecAggError(f"threshold {t} must be between 2 and the number of sites {len(sites)}")
    return RoundPlan(round=server_round, sites=sites,
                     modules={s: tuple(m for m in sorted(site_modules[s]) if m in shared) for s in sites},
                     layout={m: layout[m] for m in sorted(shared)}, threshold=t, frac_bits=frac_bits,
                     min_holders=min_holders)


def excluded_modules(global_params: Mapping[str, np.ndarray], plan: RoundPlan) -> list[str]:
    """Modules of the model that the plan leaves out of secure aggregation (too few holders)."""
    return sorted(set(group_by_module(global_params)) - set(plan.layout))


@dataclass
class SecAggResult:
    """What the server learns: per module, sum of count*value per parameter and the total count."""

    sums: dict[str, np.ndarray]  # parameter -> sum over surviving holders of count * value
    counts: dict[str, float]  # module -> sum of counts
    survivors: list[str]
    dropped: list[str]
    hidden: list[str] = field(default_factory=list)  # modules left masked (fewer than min_holders survivors)

    def averaged(self, global_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New parameters: each revealed module's weighted average; the rest carried forward unchanged."""
        out = {}
        for k, g in global_params.items():
            m = module_of(k) if k in self.sums else None
            if m is not None and self.counts.get(m, 0.0) > 0:
                out[k] = (self.sums[k] / self.counts[m]).astype(np.asarray(g).dtype)
            else:
                out[k] = np.array(g, copy=True)
        return out


class SecAggServer:
    """Server state of one round. Each method takes the replies that arrived; absent sites have dropped."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan
        self.adverts: dict[str, dict[str, bytes]] = {}
        self.members: list[str] = []  # sites whose shares were routed (step 2)
        self.masked: dict[str, dict[str, np.ndarray]] = {}
        self.rejected: dict[str, str] = {}  # site -> why its masked update was not used
        self.bytes_up = 0
        self.bytes_down = 0

    def collect_adverts(self, adverts: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Step 1: the public keys of the sites that answered, to broadcast to each of them."""
        self.adverts = {s: dict(a) for s, a in adverts.items() if s in self.plan.sites}
        self._need(len(self.adverts), "advertised keys")
        per_site = sum(len(v) for a in self.adverts.values() for v in a.values())
        self.bytes_up += per_site
        self.bytes_down += per_site * len(self.adverts)
        return self.adverts

    def route_shares(self, outboxes: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict[str, bytes]]:
        """Step 2: {destination: {source: ciphertext}} from the outboxes of the sites that answered."""
        self.members = sorted(s for s in outboxes if s in self.adverts)
        self._need(len(self.members), "shared keys")
        inboxes: dict[str, dict[str, bytes]] = {s: {} for s in self.members}
        for src in self.members:
            for dst, ct in outboxes[src].items():
                self.bytes_up += len(ct)
                if dst in inboxes:
                    inboxes[dst][src] = ct
                    self.bytes_down += len(ct)
        return inboxes

    def collect_masked(self, masked: Mapping[str, Mapping[str, np.ndarray]]) -> list[str]:
        """Step 3: keep well-formed masked vectors; returns the survivors to send to step 4."""
        for site, vecs in masked.items():
            if site not in self.members:
                continue
            expected = set(self.plan.modules.get(site, ()))
            problem = None
            if set(vecs) != expected:
                problem = f"site '{site}' sent masked modules {sorted(vecs)}, expected {sorted(expected)}"
            for m, v in vecs.items():
                if problem is None and (np.asarray(v).dtype != np.uint64 or np.shape(v) != (self.plan.size(m),)):
                    problem = f"site '{site}': masked vector of '{m}' is not uint64[{self.plan.size(m)}]"
            if problem:  # treated as dropped: its masks are removed with its reconstructed key
                self.rejected[site] = problem
                logger.warning("secure aggregation: rejected %s", problem)
                continue
            self.masked[site] = {m: np.asarray(v) for m, v in vecs.items()}
            self.bytes_up += sum(np.asarray(v).nbytes for v in vecs.values())
        survivors = sorted(self.masked)
        self._need(len(survivors), "sent masked updates")
        return survivors

    def unmask(self, replies: Mapping[str, Mapping[str, Mapping]]) -> SecAggResult:
        """Step 4: reconstruct survivors' self-mask seeds and dropped members' masking keys from at least
        t sites' shares, and strip the masks from each module's sum."""
        plan = self.plan
        survivors = sorted(self.masked)
        dropped = [s for s in self.members if s not in self.masked]
        replies = {s: r for s, r in replies.items() if s in survivors}
        self._need(len(replies), "answered the unmask request")
        self.bytes_up += sum(len(v) for r in replies.values() for d in r["b"].values() for v in d.values())
        self.bytes_up += sum(len(v) for r in replies.values() for v in r["s"].values())
        # reconstruct
        s_keys: dict[str, bytes] = {}
        for d in dropped:
            shares = {plan.index(j): int(r["s"][d], 16) for j, r in replies.items() if d in r["s"]}
            if len(shares) < plan.threshold:
                raise SecAggError(f"only {len(shares)} shares of dropped site '{d}'s key; need {plan.threshold}")
            s_keys[d] = shamir_combine(shares)
            if self.adverts[d]["s_pk"] != raw_public(s_keys[d]):
                raise SecAggError(f"the key reconstructed for dropped site '{d}' does not match its public key")
        sums, counts, hidden = {}, {}, []
        for m, params in plan.layout.items():
            alive = [s for s in plan.holders(m) if s in survivors]
            if not alive:
                continue
            if len(alive) < plan.min_holders:
                hidden.append(m)
                continue
            total = np.zeros(plan.size(m), dtype=np.uint64)
            for s in alive:
                total += self.masked[s][m]
                shares = {plan.index(j): int(r["b"][s][m], 16) for j, r in replies.items() if m in r["b"].get(s, {})}
                if len(shares) < plan.threshold:
                    raise SecAggError(f"only {len(shares)} shares of '{s}'s self-mask for '{m}'; need {plan.threshold}")
                total -= prg(self_seed(shamir_combine(shares), plan.round, m), plan.size(m))
                for d in plan.holders(m):
                    if d in s_keys:  # the mask that s agreed with dropped d is left in the sum: remove it
                        mask = pair_mask(s_keys[d], self.adverts[s]["s_pk"], plan.round, m, plan.size(m))
                        total = total - mask if pair_sign(s, d) > 0 else total + mask
            flat = dequantize(total, plan.frac_bits)
            counts[m] = float(flat[-1])
            pos = 0
            for name, shape in params:
                n = int(np.prod(shape, dtype=np.int64))
                sums[name] = flat[pos:pos + n].reshape(shape)
                pos += n
        return SecAggResult(sums, counts, survivors, dropped, hidden)

    def _need(self, n: int, what: str) -> None:
        if n < self.plan.threshold:
            raise SecAggError(f"only {n} sites {what}; the threshold is {self.plan.threshold}: the round is aborted")


# ---- in-process driver -----------------------------------------------------------------------------

Stage = str  # "keys" | "shares" | "masked" | "unmask": the step a site drops before


def run_round(global_params: Mapping[str, np.ndarray], site_params: Mapping[str, Mapping[str, np.ndarray]],
              site_counts: Mapping[str, Mapping[str, float]], server_round: int = 1,
              drop: Mapping[str, Stage] | None = None, threshold: int | None = None,
              frac_bits: int = FRAC_BITS, min_holders: int = 2,
              observe: Callable[[str, str, object], None] | None = None,
              timings: dict[str, float] | None = None) -> tuple[SecAggResult, SecAggServer]:
    """One full round over simulated sites in this process. ``drop[site] = stage`` makes a site vanish
    before that step; ``observe(stage, site, payload)`` sees every message a site sends the server;
    ``timings`` (if given) accumulates seconds spent by the sites ("sites") and by the server ("server")."""
    drop = dict(drop or {})
    see = observe or (lambda *a: None)
    clock = timings if timings is not None else {}
    clock.setdefault("sites", 0.0)
    clock.setdefault("server", 0.0)

    def timed(party: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        clock[party] += time.perf_counter() - t
        return out

    site_modules = {s: sorted({m for m in group_by_module(p)}) for s, p in site_params.items()}
    plan = plan_round(global_params, site_modules, server_round, threshold, frac_bits, min_holders)
    clients = {s: SecAggClient(s, plan) for s in plan.sites}
    srv = SecAggServer(plan)

    def alive(stage: str) -> list[str]:
        order = ["keys", "shares", "masked", "unmask"]
        return [s for s in plan.sites if s not in drop or order.index(drop[s]) > order.index(stage)]

    adverts = {}
    for s in alive("keys"):
        adverts[s] = timed("sites", clients[s].advertise_keys)
        see("keys", s, adverts[s])
    adverts = timed("server", srv.collect_adverts, adverts)
    outboxes = {}
    for s in alive("shares"):
        outboxes[s] = timed("sites", clients[s].share_keys, adverts)
        see("shares", s, outboxes[s])
    inboxes = timed("server", srv.route_shares, outboxes)
    masked = {}
    for s in alive("masked"):
        if s in inboxes:
            sent = {n for m in plan.modules[s] for n, _ in plan.layout[m]}
            params = {k: v for k, v in site_params[s].items() if k in sent}
            masked[s] = timed("sites", clients[s].mask_update, params, site_counts[s], inboxes[s])
            see("masked", s, masked[s])
    survivors = timed("server", srv.collect_masked, masked)
    replies = {}
    for s in alive("unmask"):
        if s in survivors:
            replies[s] = timed("sites", clients[s].unmask_shares, survivors)
            see("unmask", s, replies[s])
    return timed("server", srv.unmask, replies), srv


# ---- Flower glue: the exchanges of one round over a Grid -----------------------------------------------

class SecAggRound:
    """One secure round over a Flower ``Grid``, for the per-module strategy:

    - in ``configure_train``: ``records = SecAggRound(grid, {node_id: site}, plan).setup()`` runs steps 1-2
      (two query exchanges) and returns, per node, the ``secagg`` record to put in its train message;
    - in ``aggregate_train``: ``result = round.finish(replies)`` reads the masked vectors from the train
      replies and runs step 4 (one query exchange). ``result.averaged(global)`` is the new model.
    Nodes that fail or do not answer at any step count as dropped; too few survivors raise SecAggError
    (the round is lost, the previous model stays)."""

    def __init__(self, grid, node_sites: Mapping[int, str], plan: RoundPlan, timeout: float | None = None):
        self.grid = grid
        self.nodes = {int(n): s for n, s in node_sites.items() if s in plan.sites}
        self.plan = plan
        self.server = SecAggServer(plan)
        self.timeout = timeout
        self.inboxes: dict[str, dict[str, bytes]] = {}

    def _exchange(self, action: str, records: Mapping[int, ConfigRecord]) -> dict[str, ConfigRecord]:
        msgs = [Message(RecordDict({SECAGG: rec}), dst_node_id=n, message_type=f"query.{action}",
                        group_id=str(self.plan.round)) for n, rec in records.items()]
        out = {}
        for r in exchange.send_and_receive(self.grid, msgs, self.timeout):
            site = self.nodes.get(r.metadata.src_node_id)
            if site is not None and not r.has_error() and SECAGG in r.content:
                out[site] = r.content[SECAGG]
        return out

    def _record(self, site: str, **values) -> ConfigRecord:
        return ConfigRecord({"site": site, "plan": self.plan.to_json(), **values})

    def setup(self) -> dict[int, ConfigRecord]:
        """Steps 1-2. Returns {node_id: ConfigRecord} for the train messages of the round's members."""
        keys = self._exchange(KEYS_ACTION, {n: self._record(s) for n, s in self.nodes.items()})
        adverts = self.server.collect_adverts({s: {"c_pk": bytes(r["c_pk"]), "s_pk": bytes(r["s_pk"])}
                                               for s, r in keys.items()})
        public = json.dumps({s: [a["c_pk"].hex(), a["s_pk"].hex()] for s, a in adverts.items()})
        shares = self._exchange(SHARES_ACTION, {n: self._record(s, adverts=public)
                                                       for n, s in self.nodes.items() if s in adverts})
        outboxes = {s: {d: bytes.fromhex(c) for d, c in json.loads(str(r["outbox"])).items()} for s, r in shares.items()}
        self.inboxes = self.server.route_shares(outboxes)
        return {n: self._record(s, inbox=json.dumps({src: c.hex() for src, c in self.inboxes[s].items()}))
                for n, s in self.nodes.items() if s in self.inboxes}

    def finish(self, train_replies) -> SecAggResult:
        """Step 3 (read from the train replies) and step 4."""
        masked = {}
        for r in train_replies:
            site = self.nodes.get(r.metadata.src_node_id)
            if site is not None and not r.has_error() and MASKED in r.content:
                rec = r.content[MASKED]
                masked[site] = {m: rec[m].numpy() for m in rec.keys()}
        survivors = self.server.collect_masked(masked)
        replies = self._exchange(UNMASK_ACTION, {n: self._record(s, survivors=survivors)
                                                        for n, s in self.nodes.items() if s in survivors})
        return self.server.unmask({s: json.loads(str(r["shares"])) for s, r in replies.items()})


class SecureAggregationMixin:
    """Secure aggregation for the per-module strategy: ``class SecureModularFedAvg(SecureAggregationMixin,
    ModularFedAvg)``. Relies on the strategy's ``sites`` ({node_id: info with .name and .modules}),
    ``_global`` (set by its ``configure_train``) and ``optimizer`` (``.step(global, averaged, modules)``).
    The ClientApp needs ``clients.secagg.register_handlers(app)`` and ``@app.train(mods=[secagg_mod])``.
    Per round, ``secagg_rounds`` records survivors, dropped, hidden modules and bytes."""

    secagg_threshold: int | None = None
    secagg_min_holders: int = 2

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        plan = plan_round(self._global, {s.name: s.modules for s in self.sites.values()}, server_round,
                          threshold=self.secagg_threshold, min_holders=self.secagg_min_holders)
        self._secagg = SecAggRound(grid, {n: s.name for n, s in self.sites.items()}, plan,
                                   timeout=getattr(self, "secagg_timeout", None))
        try:
            extra = self._secagg.setup()  # steps 1-2: keys, encrypted shares
        except SecAggError as e:
            logger.warning("round %d: secure aggregation could not start: %s", server_round, e)
            return []
        for m in msgs:
            if m.metadata.dst_node_id in extra:
                m.content[SECAGG] = extra[m.metadata.dst_node_id]
        return [m for m in msgs if m.metadata.dst_node_id in extra]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if getattr(self, "_secagg", None) is None or not replies:
            return None, None
        try:
            result = self._secagg.finish(replies)  # step 3 from the train replies, step 4: unmask
        except SecAggError as e:
            logger.warning("round %d: secure aggregation aborted, model unchanged: %s", server_round, e)
            return None, None
        srv = self._secagg.server
        if not hasattr(self, "secagg_rounds"):
            self.secagg_rounds = []
        self.secagg_rounds.append({"round": server_round, "survivors": result.survivors, "dropped": result.dropped,
                                   "hidden": result.hidden, "rejected": dict(srv.rejected),
                                   "bytes_up": srv.bytes_up, "bytes_down": srv.bytes_down})
        new = self.optimizer.step(self._global, result.averaged(self._global), list(result.counts))
        losses = [float(r.content[P.METRICS].get("train_loss", np.nan)) for r in replies
                  if not r.has_error() and P.METRICS in r.content]
        metrics = {"sites": len(result.survivors), "train_loss": float(np.nanmean(losses)) if losses else float("nan")}
        return (R.to_arrayrecord(new),
                MetricRecord({k: v for k, v in metrics.items() if v == v}))
