"""Site policy: the hospital's own rules, read from its own TOML file and enforced at the site, before anything
leaves it. No run config can change them: the file's path comes from the SuperNode's node config
(``policy = "/etc/hospital/mmn-policy.toml"``), which only the site sets. Without the key, no policy (every
message is answered as before).

The file (every key optional; an unknown key is refused, naming the file)::

    require_secure_aggregation = true   # a train message not under secure aggregation is refused
    min_noise_multiplier = 1.0          # DP: dp-noise-multiplier below this is refused
    epsilon_ceiling = 8.0               # DP: epsilon this site may spend over all runs (ledger next to the file)
    min_cell = 10                       # smallest count behind any number that leaves in the clear
    allowed_tasks = ["disease"]         # decoders this site trains/evaluates
    allowed_modalities = ["clinical"]   # encoders this site trains/evaluates
    allowed_columns = ["age", "sex"]    # columns whose statistics may leave (schema of a summary message)
    max_rounds = 50                     # most training rounds per run
    accepted_versions = ["0.1.*"]       # mmn-fed versions of the server (fnmatch patterns)

How each rule is enforced (``policy_mod``, an app-level ClientApp mod, so it wraps every handler, outside the
DP and secure-aggregation mods):
- refusals (``Policy.refusals``): the message is answered with a Flower error reply whose reason starts
  ``site policy of '<site>' refuses <message type>:``; the server logs it naming the site and records it in
  ``failures.json`` (train/evaluate: the round goes on with the other sites). The summary query (before round
  1) is answered as a site with unusable data is (``P.SITE`` with ``error``): the server excludes the site by
  name (``excluded.json``) and the others federate.
- the privacy budget (``Ledger``): before a DP train reply leaves, the round's Renyi-DP is appended to
  ``<policy>.ledger.jsonl``; a run's epsilon comes from its rounds' summed RDP (Balle et al. 2020, as
  ``clients.privacy``), runs compose by adding epsilons (and deltas). A round that would take the total over
  ``epsilon_ceiling`` is refused.
- small cells (``suppress_*``): the missingness audit runs with ``audit-min-cell`` raised to ``min_cell``; the
  preprocessing summary loses category/label counts below ``min_cell`` and numeric statistics over fewer
  values (marker: ``summary["suppressed"]``); the profile drops modules with fewer samples (the server then
  never sends them); evaluation records on fewer rows are removed; the train metric ``n`` too.

flwr is imported only inside ``policy_mod``: ``mmn-fed site check`` uses this module without Flower.
"""
from __future__ import annotations

import fnmatch
import json
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mmn_fed import protocol as P

POLICY_KEY = "policy"  # node config key: path of the site's policy TOML
VERSION_KEY = "mmn-fed-version"  # key of the server's mmn-fed version in the settings record (mmn_fed.settings)
REFUSED = "site policy"  # every refusal's reason starts with this
SUPPRESSED = "suppressed"  # marker key in a suppressed summary


class PolicyError(ValueError):
    """A policy file that cannot be read or holds an unknown key or a wrong value (names the file and key)."""


@dataclass(frozen=True)
class Policy:
    path: str = ""
    require_secure_aggregation: bool = False
    min_noise_multiplier: float = 0.0
    epsilon_ceiling: float | None = None
    min_cell: int = 1
    allowed_tasks: tuple[str, ...] | None = None
    allowed_modalities: tuple[str, ...] | None = None
    allowed_columns: tuple[str, ...] | None = None
    max_rounds: int | None = None
    accepted_versions: tuple[str, ...] | None = None

    # ---- the rules, one function each ------------------------------------------------------------
    def check_version(self, server_version: str | None) -> str | None:
        from mmn_fed import __version__

        if self.accepted_versions is None:
            return None
        if not server_version:
            return (f"the server sent no mmn-fed version (this site runs mmn-fed {__version__}; accepted server "
                    f"versions: {list(self.accepted_versions)})")
        if not any(fnmatch.fnmatchcase(server_version, p) for p in self.accepted_versions):
            return (f"the server runs mmn-fed {server_version}, this site runs mmn-fed {__version__}; accepted "
                    f"server versions: {list(self.accepted_versions)}")
        return None

    def check_secure_aggregation(self, message_type: str, under_secagg: bool) -> str | None:
        if self.require_secure_aggregation and message_type == P.TRAIN and not under_secagg:
            return "secure aggregation is required and this train message is not under secure aggregation"
        return None

    def check_noise(self, message_type: str, noise_multiplier: float) -> str | None:
        if message_type == P.TRAIN and noise_multiplier < self.min_noise_multiplier:
            return (f"differential privacy with noise multiplier >= {self.min_noise_multiplier:g} is required; "
                    f"dp-noise-multiplier = {noise_multiplier:g}")
        return None

    def check_rounds(self, message_type: str, server_round: int | None) -> str | None:
        if self.max_rounds is not None and message_type == P.TRAIN and server_round is not None \
                and server_round > self.max_rounds:
            return f"round {server_round} is past this site's max_rounds = {self.max_rounds}"
        return None

    def check_modules(self, modules: Iterable[str]) -> str | None:
        """The modules of a train/evaluate message: every encoder's modality and decoder's task allowed."""
        bad = [m for m in sorted(set(modules)) if not self.module_allowed(m)]
        return f"module(s) {bad} are outside the allowed tasks/modalities" if bad else None

    def check_columns(self, columns: Iterable[str]) -> str | None:
        if self.allowed_columns is None:
            return None
        bad = sorted(set(columns) - set(self.allowed_columns))
        return f"column(s) {bad} are not in this site's allowed_columns" if bad else None

    def check_tasks(self, tasks: Iterable[str]) -> str | None:
        if self.allowed_tasks is None:
            return None
        bad = sorted(set(tasks) - set(self.allowed_tasks))
        return f"task(s) {bad} are not in this site's allowed_tasks" if bad else None

    def module_allowed(self, module: str) -> bool:
        kind, _, name = module.partition(".")
        if kind == "encoders" and self.allowed_modalities is not None:
            return name in self.allowed_modalities
        if kind == "decoders" and self.allowed_tasks is not None:
            return name in self.allowed_tasks
        return True

    # ---- small-cell suppression --------------------------------------------------------------------
    def suppress_summary(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        return suppress_summary(summary, self.min_cell)

    def suppress_counts(self, counts: Mapping[str, float]) -> dict[str, float]:
        """Profile counts: modules with fewer than ``min_cell`` samples (or outside the allowed tasks and
        modalities) are left out, so the server never sends them; zeros stay out too (nothing to train)."""
        return {m: c for m, c in counts.items() if c >= self.min_cell and self.module_allowed(m)}

    def suppress_records(self, records: list[dict]) -> list[dict]:
        """Evaluation records computed on fewer than ``min_cell`` rows are removed."""
        return [r for r in records if r.get("n") is None or int(r["n"]) >= self.min_cell]

    @property
    def ledger_path(self) -> Path:
        p = Path(self.path)
        return p.with_name(p.stem + ".ledger.jsonl")


_LISTS = ("allowed_tasks", "allowed_modalities", "allowed_columns", "accepted_versions")


def parse_policy(data: Mapping[str, Any], path: str = "") -> Policy:
    """A Policy from a TOML mapping; an unknown key or a wrong type raises PolicyError naming file and key."""
    known = {f.name for f in fields(Policy)} - {"path"}
    where = path or "policy"
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {"path": path}
    for k, v in data.items():
        if k in _LISTS:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise PolicyError(f"{where}: {k} must be a list of strings, got {v!r}")
            values[k] = tuple(v)
        elif k == "require_secure_aggregation":
            if not isinstance(v, bool):
                raise PolicyError(f"{where}: {k} must be true or false, got {v!r}")
            values[k] = v
        elif k in ("min_cell", "max_rounds"):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PolicyError(f"{where}: {k} must be an integer >= 1, got {v!r}")
            values[k] = v
        else:  # min_noise_multiplier, epsilon_ceiling
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise PolicyError(f"{where}: {k} must be a number >= 0, got {v!r}")
            values[k] = float(v)
    return Policy(**values)


_CACHE: dict[tuple[str, int], Policy] = {}


def load_policy(path: str | Path) -> Policy:
    """The policy at ``path`` (cached by modification time)."""
    p = Path(path)
    try:
        key = (str(p), p.stat().st_mtime_ns)
    except OSError as e:
        raise PolicyError(f"site policy file {p} cannot be read: {e}") from None
    if key not in _CACHE:
        try:
            data = tomllib.loads(p.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise PolicyError(f"site policy file {p} is not valid TOML: {e}") from None
        _CACHE[key] = parse_policy(data, str(p))
    return _CACHE[key]


def suppress_summary(summary: Mapping[str, Any], min_cell: int) -> dict[str, Any]:
    """A preprocessing summary with no count between 1 and ``min_cell - 1``: such category (and label) counts
    are removed, a numeric column (or regression target) over fewer values becomes ``{"kind": "empty"}``.
    ``summary["suppressed"]`` = {min_cell, cells: how many were removed} (merge_summaries ignores it)."""
    if min_cell <= 1:
        return dict(summary)
    n_rows = int(summary.get("n_rows", 0))
    if 0 < n_rows < min_cell:
        raise PolicyError(f"only {n_rows} training row(s) here, below the policy's min_cell = {min_cell}")
    out: dict[str, Any] = {k: v for k, v in summary.items() if k not in ("columns", "targets")}
    cells = 0
    for section in ("columns", "targets"):
        new = {}
        for c, s in summary.get(section, {}).items():
            if s.get("kind") == "categorical":
                kept = {k: v for k, v in s["counts"].items() if not 0 < int(v) < min_cell}
                cells += len(s["counts"]) - len(kept)
                new[c] = {**s, "counts": kept}
            elif s.get("kind") == "numeric" and 0 < int(s["count"]) < min_cell:
                cells += 1
                new[c] = {"kind": "empty"}
            else:
                new[c] = dict(s)
        out[section] = new
    out[SUPPRESSED] = {"min_cell": int(min_cell), "cells": cells}
    return out


# ---- the privacy ledger -----------------------------------------------------------------------------

@dataclass
class Ledger:
    """Append-only JSON lines, one per DP train round answered: {run, round, delta, rdp (this round's RDP at
    clients.privacy.DEFAULT_ORDERS), time}. A run's epsilon: its rounds' RDP summed (a round sent twice counts
    once), converted at its delta; the site's total: the sum over runs."""

    path: Path
    entries: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path) -> "Ledger":
        p = Path(path)
        entries = []
        if p.exists():
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:  # fail closed: an unreadable ledger spends nothing more
                    raise PolicyError(f"privacy ledger {p}, line {i}: not JSON; fix or restore it") from None
        return cls(p, entries)

    def run_rdp(self, run: str) -> np.ndarray:
        from .privacy import DEFAULT_ORDERS

        by_round = {e["round"]: e["rdp"] for e in self.entries if e["run"] == run}
        return np.sum([np.asarray(v, np.float64) for v in by_round.values()], axis=0) if by_round \
            else np.zeros(len(DEFAULT_ORDERS))

    def run_epsilon(self, run: str) -> float:
        from .privacy import rdp_to_epsilon

        deltas = [e["delta"] for e in self.entries if e["run"] == run]
        return rdp_to_epsilon(self.run_rdp(run), min(deltas))[0] if deltas else 0.0

    def runs(self) -> list[str]:
        return list(dict.fromkeys(e["run"] for e in self.entries))

    def total(self, exclude: str | None = None) -> float:
        return sum(self.run_epsilon(r) for r in self.runs() if r != exclude)

    def append(self, run: str, server_round: int, delta: float, rdp: np.ndarray) -> None:
        entry = {"run": run, "round": server_round, "delta": delta, "rdp": [float(x) for x in rdp], "time": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
        self.entries.append(entry)


def check_budget(policy: Policy, ledger: Ledger, run: str, server_round: int, noise_multiplier: float,
                 delta: float, modules: int) -> tuple[str | None, np.ndarray]:
    """(reason or None, this round's RDP). The round releases ``modules`` Gaussian mechanisms (as
    ``clients.privacy.privacy_mod``); refused if the site's epsilon over all runs would pass the ceiling."""
    from .privacy import gaussian_rdp, rdp_to_epsilon

    step = modules * gaussian_rdp(noise_multiplier)
    if policy.epsilon_ceiling is None:
        return None, step
    if noise_multiplier <= 0:
        return (f"a privacy budget (epsilon_ceiling = {policy.epsilon_ceiling:g}) is set and this run has no "
                "differential privacy (dp-noise-multiplier = 0)"), step
    earlier = [e for e in ledger.entries if e["run"] == run and e["round"] != server_round]
    rdp = np.sum([np.asarray(e["rdp"]) for e in earlier], axis=0) + step if earlier else step
    this_run = rdp_to_epsilon(rdp, min([delta, *(e["delta"] for e in earlier)]))[0]
    others = ledger.total(exclude=run)
    if others + this_run > policy.epsilon_ceiling:
        return (f"privacy budget: this round would bring the epsilon spent by this site to {others + this_run:.3g} "
                f"(earlier runs {others:.3g} + this run {this_run:.3g} at delta {delta:g}), above its "
                f"epsilon_ceiling = {policy.epsilon_ceiling:g} (ledger {ledger.path})"), step
    return None, step


# ---- what a message asks -------------------------------------------------------------------------------

def message_modules(content) -> list[str]:
    from mmn_fed import records as R
    from mmn_fed.modules import module_of

    return sorted({module_of(k) for k in R.names(content[P.ARRAYS])}) if P.ARRAYS in content else []


def _schema_of(config) -> Any:
    from edge_runtime.schema import Schema

    if "schema" in config:
        return Schema.from_dict(json.loads(str(config["schema"])))
    if "prep" in config:
        return Schema.from_dict(json.loads(str(config["prep"]))["schema"])
    return None


def refusals(policy: Policy, message_type: str, content, run: str, ledger: Ledger | None = None
             ) -> tuple[list[str], np.ndarray | None]:
    """Every rule a message breaks (reasons) and, for an accepted DP train message under a budget, the
    round's RDP to append to the ledger."""
    from mmn_fed.secagg import SECAGG
    from mmn_fed.settings import SiteSettings

    config = content[P.CONFIG] if P.CONFIG in content else {}
    reasons = []
    server_version = None
    if P.SETTINGS in config:
        try:
            server_version = json.loads(str(config[P.SETTINGS])).get(VERSION_KEY)
        except (json.JSONDecodeError, AttributeError):
            server_version = None
    if P.SETTINGS in config:  # the secure-aggregation steps carry no settings: their train message does
        reasons.append(policy.check_version(server_version))
    settings = SiteSettings.from_config(config) if P.SETTINGS in config else SiteSettings()
    server_round = int(config["server-round"]) if "server-round" in config else None
    reasons.append(policy.check_secure_aggregation(message_type, SECAGG in content))
    reasons.append(policy.check_noise(message_type, settings.dp_noise_multiplier))
    reasons.append(policy.check_rounds(message_type, server_round))
    if message_type in (P.TRAIN, P.EVALUATE):
        reasons.append(policy.check_modules(message_modules(content)))
    if message_type == P.SUMMARY:  # the statistics of every schema column and label would leave
        schema = _schema_of(config)
        if schema is not None:
            reasons.append(policy.check_columns([*schema.input_columns, *(t.column for t in schema.tasks.values())]))
            reasons.append(policy.check_tasks(schema.tasks))
    step = None
    if message_type == P.TRAIN and policy.epsilon_ceiling is not None and not any(reasons):
        reason, step = check_budget(policy, ledger or Ledger.read(policy.ledger_path), run, server_round or 0,
                                    settings.dp_noise_multiplier, settings.dp_delta,
                                    max(1, len(message_modules(content))))
        reasons.append(reason)
    return [r for r in reasons if r], step


# ---- Flower glue ----------------------------------------------------------------------------------------

def _site_name(context) -> str:
    try:
        from .site import site_source

        return site_source(context.node_config, context.run_config).name
    except Exception:  # noqa: BLE001  (a name for the message only)
        return str(context.node_config.get("site-name") or context.node_id)


def _run_key(context) -> str:
    """Flower's run id; in-process runs all have id 1, so the run directory joins it."""
    return f"{context.run_id}:{context.run_config.get('run-dir', '')}"


def _tighten_audit(content, min_cell: int) -> None:
    """Raise ``audit-min-cell`` in the message's settings record to the policy's ``min_cell``."""
    from flwr.app import ConfigRecord

    config = content[P.CONFIG]
    record = json.loads(str(config[P.SETTINGS]))
    values = record.setdefault("values", {})
    values["audit-min-cell"] = max(int(values.get("audit-min-cell", 1)), min_cell)
    content[P.CONFIG] = ConfigRecord({**dict(config), P.SETTINGS: json.dumps(record, sort_keys=True)})


def policy_mod(msg, context, call_next):
    """App-level ClientApp mod: with node config ``policy`` set, refuse a message that breaks the site's policy
    (error reply naming the site and the rules) and suppress small cells in what the reply carries."""
    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

    from mmn_fed import records as R

    path = context.node_config.get(POLICY_KEY)
    if not path:
        return call_next(msg, context)
    message_type = msg.metadata.message_type
    site = _site_name(context)

    def refuse(reasons: list[str]) -> Message:
        reason = f"{REFUSED} of '{site}' refuses {message_type}: " + "; ".join(reasons)
        if message_type == P.SUMMARY:  # before round 1: the site's name and the reason, so the server excludes it
            return Message(RecordDict({P.SITE: ConfigRecord({"name": site, "rows": 0, "error": reason})}), reply_to=msg)
        return Message(Error(code=403, reason=reason), reply_to=msg)

    try:
        policy = load_policy(str(path))
        ledger = Ledger.read(policy.ledger_path) if policy.epsilon_ceiling is not None else None
        reasons, step = refusals(policy, message_type, msg.content, _run_key(context), ledger)
    except Exception as e:  # noqa: BLE001  (fail closed: an unreadable policy or ledger answers nothing)
        return refuse([f"{type(e).__name__}: {e}"])
    if reasons:
        return refuse(reasons)
    if step is not None:  # spent before the reply leaves (a failure after this over-counts: the safe side)
        cfg = msg.content[P.CONFIG]
        from mmn_fed.settings import SiteSettings

        ledger.append(_run_key(context), int(cfg["server-round"]), SiteSettings.from_config(cfg).dp_delta, step)
    if P.CONFIG in msg.content and P.SETTINGS in msg.content[P.CONFIG] and policy.min_cell > 1:
        _tighten_audit(msg.content, policy.min_cell)
    reply = call_next(msg, context)
    if reply.has_error() or policy.min_cell <= 1 and policy.allowed_modalities is None and policy.allowed_tasks is None:
        return reply
    content = reply.content
    try:
        if P.SUMMARY_RECORD in content:
            content[P.SUMMARY_RECORD] = R.json_record(policy.suppress_summary(R.from_json_record(content[P.SUMMARY_RECORD])))
        if message_type == P.PROFILE and P.COUNTS in content:
            content[P.COUNTS] = MetricRecord(policy.suppress_counts(dict(content[P.COUNTS])))
        if P.RECORDS in content:
            kept = policy.suppress_records(R.from_json_record(content[P.RECORDS]))
            content[P.RECORDS] = R.json_record(kept)
            tasks = {r["task"] for r in kept}
            if P.METRICS in content:  # per-task metrics of the suppressed tasks go too (train's own stay)
                content[P.METRICS] = MetricRecord({k: v for k, v in dict(content[P.METRICS]).items()
                                                   if "/" not in k or k.split("/")[0] in tasks})
        if message_type == P.TRAIN and P.METRICS in content:
            metrics = dict(content[P.METRICS])
            if "n" in metrics and 0 < metrics["n"] < policy.min_cell:
                del metrics["n"]
                content[P.METRICS] = MetricRecord(metrics)
    except PolicyError as e:
        return refuse([str(e)])
    return reply
