"""The federation's message protocol: message types, record names and config keys shared by the
ClientApp (a site) and the ServerApp. The one place both sides agree on; flwr-free (records are built
from these names in ``mmn_fed.records``, the one module of ``mmn_fed`` that imports Flower).

Message types (Flower's ``<category>.<action>``):
- every message's config carries ``settings``: the site-scope run settings (``mmn_fed.settings``).
- ``query.summary``: config {schema} -> site {name}, summary {json}: mergeable preprocessing summary.
- ``query.profile``: config {prep, model-config} -> site {name}, counts: samples per module the site holds.
- ``train``: arrays (the site's modules only), config -> arrays (same keys), counts, metrics, site. When the
  config holds ``evaluate-round`` k, the received arrays are the global model after round k and the site scores
  them before training: the reply also carries ``records`` (as ``evaluate``'s). The server folds each round's
  federated evaluation into the next round's train message (one message per site per round, not two).
- ``evaluate``: arrays, config -> metrics (``<task>/<metric>``), records {json: tidy records}, site. Sent once,
  for the last round's model.
- arrays travel packed: one Array of bytes and one index (``mmn_fed.records.to_arrayrecord``).
- with ``secure-aggregation``: ``query.secagg_keys``, ``query.secagg_shares`` before ``train`` (whose message then
  carries a ``secagg`` record and whose reply carries ``secagg-masked`` instead of arrays and counts), and
  ``query.secagg_unmask`` after it (names and arithmetic in ``mmn_fed.secagg``).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

SUMMARY_ACTION, PROFILE_ACTION = "summary", "profile"  # ClientApp query handlers: ``@app.query(action)``
SUMMARY = f"query.{SUMMARY_ACTION}"
PROFILE = f"query.{PROFILE_ACTION}"
TRAIN = "train"
EVALUATE = "evaluate"

# record names in a message's RecordDict
CONFIG = "config"  # server -> site: the message's settings (ConfigRecord)
ARRAYS = "arrays"  # both ways: parameters of the modules sent (ArrayRecord)
COUNTS = "counts"  # site -> server: samples per module (MetricRecord)
METRICS = "metrics"  # site -> server: numbers (MetricRecord)
RECORDS = "records"  # site -> server: tidy evaluation records (JSON in a ConfigRecord)
SITE = "site"  # site -> server: {name, rows}
SUMMARY_RECORD = "summary"  # site -> server: preprocessing summary (JSON in a ConfigRecord)
AUDIT_RECORD = "audit"  # site -> server: missingness audit counts (mmn_fed.audit.presence_counts; JSON)
JSON_KEY = "json"  # the key under which a ConfigRecord carries one JSON document

# config keys (server -> site, in every message's config record)
TIMESERIES = "timeseries"  # JSON schema with [timeseries] (mmn_fed.sequences): sites train on sequences
CORRECTION = "correction"  # JSON {modality: task}: the modalities to balance (mmn_fed.correction); {} = none
SETTINGS = "settings"  # the site-scope run settings: a versioned JSON record (mmn_fed.settings.SiteSettings)
EVALUATE_ROUND = "evaluate-round"  # train only: score the received model (the global one after that round) first


def to_json(obj: Any) -> str:
    """The JSON text of a document carried in a record (sorted keys; NaN allowed, as metrics may hold it)."""
    return json.dumps(obj, sort_keys=True, allow_nan=True)


def from_json(text: str) -> Any:
    return json.loads(text)


def digest(text: str) -> str:
    """Short content hash of a JSON text (sites cache a preprocessor under it)."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]
