"""Flower record conversion for the protocol in ``mmn_fed.protocol``: the one module of ``mmn_fed``
that imports ``flwr`` (tests/test_layout.py holds it to that), so the model library stays usable without it."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from .protocol import JSON_KEY, from_json, to_json


PACKED = "packed"  # the one Array holding every tensor's bytes, one after the other
INDEX = "index"  # a JSON list [[name, dtype, shape], ...] as uint8: how to cut PACKED back into tensors


def to_arrayrecord(params: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord of two Arrays: ``packed`` (their bytes one after the other, each at an
    offset aligned to 8 bytes) and ``index`` (name, dtype, shape, offset of each). Flower moves every Array of a
    message as its own object (one request each between ClientApp, SuperNode and SuperLink, and the SuperNode
    waits 0.5 s for each object not yet there), so a reply of 43 tensors cost tens of seconds on the deployment
    engine; two Arrays cost two (docs/federation.md, "Round time"). ``from_arrayrecord`` reads it back (and
    reads the plain one-Array-per-name layout too)."""
    index, chunks, at = [], [], 0
    for k, v in params.items():
        a = np.asarray(v)
        pad = -at % 8
        chunks.append(b"\0" * pad)
        at += pad
        index.append([k, a.dtype.str, list(a.shape), at])
        b = a.tobytes()  # C order, whatever the array's layout
        chunks.append(b)
        at += len(b)
    packed = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return ArrayRecord({PACKED: Array(packed), INDEX: Array(np.frombuffer(to_json(index).encode(), dtype=np.uint8))})


def _index(record: ArrayRecord) -> list[tuple[str, str, tuple[int, ...], int]] | None:
    if not (INDEX in record.keys() and PACKED in record.keys()):
        return None
    return [(str(k), str(d), tuple(int(x) for x in s), int(o)) for k, d, s, o in
            from_json(record[INDEX].numpy().tobytes().decode())]


def layout(record: ArrayRecord) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, numpy dtype string, shape) of each tensor in ``record`` (packed or plain), without reading a value."""
    index = _index(record)
    if index is not None:
        return [(k, d, s) for k, d, s, _ in index]
    return [(k, np.dtype(record[k].dtype).str, tuple(int(d) for d in record[k].shape)) for k in record.keys()]


def names(record: ArrayRecord) -> list[str]:
    """The tensor names in ``record`` (packed or plain)."""
    return [k for k, _, _ in layout(record)]


def from_arrayrecord(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays (writable) from ``to_arrayrecord``'s packed layout or a plain ArrayRecord."""
    index = _index(record)
    if index is None:
        return {k: record[k].numpy() for k in record.keys()}
    buf = record[PACKED].numpy()  # a fresh uint8 array: the tensors below are writable views of it
    out = {}
    for name, dtype, shape, at in index:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if at < 0 or at + count * dt.itemsize > buf.size:
            raise ValueError(f"packed ArrayRecord: tensor '{name}' {dtype}{list(shape)} at byte {at} runs past the "
                             f"end of the data ({buf.size} bytes)")
        out[name] = np.frombuffer(buf, dtype=dt, count=count, offset=at).reshape(shape)
    return out


def json_record(obj: Any) -> ConfigRecord:
    """One JSON document in a ConfigRecord (the protocol's ``summary`` and ``records``)."""
    return ConfigRecord({JSON_KEY: to_json(obj)})


def from_json_record(record: ConfigRecord) -> Any:
    return from_json(str(record[JSON_KEY]))


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """MetricRecord of finite numbers (NaN, e.g. AUROC of a one-class site, is left out)."""
    return MetricRecord({k: v for k, v in values.items() if isinstance(v, int) or np.isfinite(v)})
