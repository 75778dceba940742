"""Parameters travel packed (mmn_fed.records): one Array of bytes + one index, whatever the number of tensors.
Flower moves every Array as its own object, and on the deployment engine each object of a reply cost a request
and up to 0.5 s of the SuperNode's wait (docs/federation.md, "Round time")."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from mmn_fed import records as R


def _params():
    rng = np.random.default_rng(0)
    return {"init_state": rng.normal(size=8).astype(np.float32),
            "encoders.a.net.0.weight": rng.normal(size=(3, 5)).astype(np.float32),
            "flag": np.array([1, 0, 1], dtype=np.int8),  # 3 bytes: the next tensor starts at an aligned offset
            "counts": np.array([7, 9], dtype=np.int64),
            "empty": np.zeros((0, 4), dtype=np.float32),
            "scalar": np.array(2.5),
            "transposed": np.arange(12.0).reshape(3, 4).T}  # not C-contiguous


def test_packed_record_round_trips_every_dtype_and_shape_bit_for_bit():
    params = _params()
    back = R.from_arrayrecord(R.to_arrayrecord(params))
    assert list(back) == list(params)
    for k, v in params.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k
        assert back[k].flags.writeable and back[k].flags.aligned, k
    back["init_state"][0] = 99.0  # writable views of one buffer: no effect on the others
    assert back["encoders.a.net.0.weight"][0, 0] == params["encoders.a.net.0.weight"][0, 0]
    assert R.names(R.to_arrayrecord(params)) == list(params)
    assert [(k, s) for k, _, s in R.layout(R.to_arrayrecord(params))] == [(k, v.shape) for k, v in params.items()]


def test_a_record_is_five_flower_objects_whatever_the_number_of_tensors():
    few = R.to_arrayrecord(_params())
    many = R.to_arrayrecord({f"t{i}": np.full(4, i, dtype=np.float32) for i in range(200)})
    assert len(get_all_nested_objects(few)) == len(get_all_nested_objects(many)) == 5  # record, 2 Arrays, 2 chunks
    plain = ArrayRecord({f"t{i}": Array(np.full(4, i, dtype=np.float32)) for i in range(200)})
    assert len(get_all_nested_objects(plain)) > 200  # what one Array per tensor costs


def test_a_plain_record_is_still_read():
    params = {"a": np.ones(3, dtype=np.float32), "b": np.arange(4).reshape(2, 2)}
    plain = ArrayRecord({k: Array(v) for k, v in params.items()})
    back = R.from_arrayrecord(plain)
    assert all(np.array_equal(back[k], v) for k, v in params.items()) and R.names(plain) == ["a", "b"]


def test_an_index_pointing_past_the_data_is_refused_naming_the_tensor():
    rec = R.to_arrayrecord({"a": np.ones(4, dtype=np.float32), "encoders.b.w": np.ones(8, dtype=np.float32)})
    short = ArrayRecord({R.PACKED: Array(rec[R.PACKED].numpy()[:20]), R.INDEX: rec[R.INDEX]})
    with pytest.raises(ValueError, match="'encoders.b.w'"):
        R.from_arrayrecord(short)
