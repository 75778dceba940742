"""The federation's message protocol: message types, record names and config keys shared by the
ClientApp (a site) and the ServerApp. The one place both sides agree on.

Message types (Flower's ``<category>.<action>``):
- ``query.summary``: config {schema} -> site {name}, summary {json}: mergeable preprocessing summary.
- ``query.profile``: config {prep, model-config} -> site {name}, counts: samples per module the site holds.
- ``train``: arrays (the site's modules only), config -> arrays (same keys), counts, metrics, site.
- ``evaluate``: arrays, config -> metrics (``<task>/<metric>``), records {json: tidy records}, site.
- with ``secure-aggregation``: ``query.secagg_keys``, ``query.secagg_shares`` before ``train`` (whose message then
  carries a ``secagg`` record and whose reply carries ``secagg-masked`` instead of arrays and counts), and
  ``query.secagg_unmask`` after it (``clients.secagg``).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

SUMMARY = "query.summary"
PROFILE = "query.profile"
TRAIN = "train"
EVALUATE = "evaluate"

# run-config keys that travel to sites in every message config
SITE_SETTINGS = ("local-epochs", "lr", "mu", "batch-size", "weight-decay", "seed", "val-fraction", "balance-missingness",
                 # differential privacy at the site (clients.privacy; off while dp-noise-multiplier is 0)
                 "dp-clip", "dp-noise-multiplier", "dp-delta")


def to_arrayrecord(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def json_record(obj: Any) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(obj, sort_keys=True, allow_nan=True)})


def from_json_record(record: ConfigRecord) -> Any:
    return json.loads(str(record["json"]))


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """MetricRecord of finite numbers (NaN, e.g. AUROC of a one-class site, is left out)."""
    return MetricRecord({k: v for k, v in values.items() if isinstance(v, int) or np.isfinite(v)})
