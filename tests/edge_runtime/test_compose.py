"""Composed graphs are valid ONNX, built from the verified module files without the onnx package."""
import onnx
import pytest

from edge_runtime.compose import ModuleGraph, fields, node, value_info


@pytest.mark.parametrize("masked, trajectory", [(False, False), (True, False), (True, True), (False, True)])
def test_composed_graph_passes_the_onnx_checker(bundle, masked, trajectory):
    steps = ("rest", "demographics", "imaging")
    c = bundle._composed(steps, masked, trajectory)
    assert c.x_names == ("encoders.rest.x", "encoders.demographics.x", "encoders.imaging.x")
    model_bytes = bundle._compose_bytes(steps, masked, trajectory)
    m = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(m, full_check=True)
    names = [i.name for i in m.graph.input]
    assert names[0] == "init_state.batch" and ("mask.rest" in names) == masked
    assert [o.name for o in m.graph.output] == ["out.disease", "out.severity"]


def test_module_graph_reads_names_like_onnx_does(heart):
    raw = (heart.bundle / "encoders.rest.onnx").read_bytes()
    g = ModuleGraph.parse(raw)
    ref = onnx.load_from_string(raw)
    assert g.inputs == tuple(i.name for i in ref.graph.input)
    assert g.outputs == tuple(o.name for o in ref.graph.output)
    assert len(g.nodes) == len(ref.graph.node) and len(g.initializers) == len(ref.graph.initializer)
    assert all(n.name.startswith("encoders.rest.") for n in ref.graph.node)


def test_wire_helpers_round_trip():
    n = onnx.NodeProto.FromString(node("Softmax", ["a"], ["b"], "s", axis=-1))
    assert n.op_type == "Softmax" and n.attribute[0].i == -1
    v = onnx.ValueInfoProto.FromString(value_info("x", 1, ["batch", 7]))
    assert v.type.tensor_type.shape.dim[0].dim_param == "batch" and v.type.tensor_type.shape.dim[1].dim_value == 7
    assert list(fields(b"\x08\x96\x01")) == [(1, 0, 150)]
