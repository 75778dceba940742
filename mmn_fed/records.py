"""Flower record conversion for the protocol in ``mmn_fed.protocol``: the one module of ``mmn_fed``
that imports ``flwr`` (tests/test_layout.py holds it to that), so the model library stays usable without it."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from .protocol import JSON_KEY, from_json, to_json


def to_arrayrecord(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (contiguous copies where needed)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in params.items()})


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def json_record(obj: Any) -> ConfigRecord:
    """One JSON document in a ConfigRecord (the protocol's ``summary`` and ``records``)."""
    return ConfigRecord({JSON_KEY: to_json(obj)})


def from_json_record(record: ConfigRecord) -> Any:
    return from_json(str(record[JSON_KEY]))


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """MetricRecord of finite numbers (NaN, e.g. AUROC of a one-class site, is left out)."""
    return MetricRecord({k: v for k, v in values.items() if isinstance(v, int) or np.isfinite(v)})
