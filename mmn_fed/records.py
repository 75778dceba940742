"""Flower record conversion for the protocol in ``mmn_fed.protocol``: the one module of ``mmn_fed``
that imports ``flwr`` (tests/test_layout.py holds it to that), so the model library stays usable without it."""
from __future__ import annotations

import io
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from .protocol import JSON_KEY, from_json, to_json

_NUMPY = "numpy.ndarray"  # Flower's SType.NUMPY: ``Array.data`` is the array in .npy format (``np.save``)


@lru_cache(maxsize=4096)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The .npy header ``np.save`` writes before a C-ordered array of this dtype and shape (computed once per
    dtype and shape: a model has a few dozen)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    header = buf.getvalue()
    if len(header) > 65535 + 10:  # cannot happen for version 1.0; np.save would switch to 2.0
        raise ValueError(f"no .npy 1.0 header for shape {shape}")
    return header


def to_array(value: np.ndarray) -> Array:
    """One array as Flower's ``Array(ndarray)`` would hold it (the same .npy bytes, so ``Array.numpy()`` and every
    Flower component read it as usual), without ``np.save``'s per-call cost (~0.1 ms per array)."""
    a = np.ascontiguousarray(value)
    if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.byteorder not in ("=", "|", "<"):
        return Array(a)  # rare dtypes: Flower's own path
    return Array(dtype=str(a.dtype), shape=tuple(int(d) for d in a.shape), stype=_NUMPY,
                 data=_npy_header(a.dtype.str, tuple(a.shape)) + a.tobytes())


def from_array(array: Array) -> np.ndarray:
    """``array.numpy()`` (a writable copy), without ``np.load``'s per-call cost (~0.25 ms per array) when the bytes
    are a plain C-ordered .npy of ``array``'s dtype and shape; any other content goes through ``array.numpy()``."""
    if array.stype == _NUMPY:
        try:
            dt = np.dtype(array.dtype)
            shape = tuple(int(d) for d in array.shape)
            header = _npy_header(dt.str, shape)
        except (TypeError, ValueError):
            return array.numpy()
        data = array.data
        if not dt.hasobject and len(data) == len(header) + dt.itemsize * int(np.prod(shape)) and data.startswith(header):
            return np.frombuffer(data, dtype=dt, offset=len(header)).reshape(shape).copy()
    return array.numpy()


def pack(params: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """Each parameter converted once: a server sending the same modules to many sites packs them once per round
    and builds every site's ArrayRecord from these (``select``)."""
    return {k: to_array(v) for k, v in params.items()}


def select(packed: Mapping[str, Array], keys) -> ArrayRecord:
    """An ArrayRecord of the already packed ``keys``. The Array objects are shared, not rebuilt (``ArrayRecord(dict)``
    would rebuild every Array from its fields): nothing in a message's life changes an Array in place."""
    record = ArrayRecord()
    for k in keys:
        record[k] = packed[k]
    return record


def to_arrayrecord(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (contiguous copies where needed)."""
    return select(pack(params), params.keys())


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: from_array(record[k]) for k in record.keys()}


def json_record(obj: Any) -> ConfigRecord:
    """One JSON document in a ConfigRecord (the protocol's ``summary`` and ``records``)."""
    return ConfigRecord({JSON_KEY: to_json(obj)})


def from_json_record(record: ConfigRecord) -> Any:
    return from_json(str(record[JSON_KEY]))


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """MetricRecord of finite numbers (NaN, e.g. AUROC of a one-class site, is left out)."""
    return MetricRecord({k: v for k, v in values.items() if isinstance(v, int) or np.isfinite(v)})
