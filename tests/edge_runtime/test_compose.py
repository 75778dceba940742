"""Composed graphs are valid ONNX, built from the verified module files without the onnx package, and
predict what the bundle predicts."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.compose import BATCH_INPUT, ModuleGraph, ModuleIO, compose, fields, mask_input, node, value_info
from mmn_fed.data import encode
from mmn_fed.evaluation import predict_trajectory


STEPS = ("rest", "demographics", "imaging")


def module_io(bundle, name):
    """A module of the bundle as the runtime reads it: its file's graph and the manifest's input/output names."""
    spec = bundle.manifest["modules"][name]
    return ModuleIO(ModuleGraph.parse((bundle.path / spec["file"]).read_bytes()), tuple(spec["inputs"]),
                    tuple(spec["outputs"]))


@pytest.mark.parametrize("masked, trajectory", [(False, False), (True, False), (True, True), (False, True)])
def test_composed_graph_is_valid_onnx_and_predicts_what_the_bundle_predicts(heart, bundle, masked, trajectory):
    encs = [(x, module_io(bundle, f"encoders.{x}"), bundle.dims[x]) for x in STEPS]
    decs = [(t, module_io(bundle, f"decoders.{t}"), s["kind"], len(s["classes"]) if s["kind"] == "multiclass" else 1)
            for t, s in bundle.tasks.items()]
    model_bytes = compose(module_io(bundle, "init_state"), encs, decs, masked, trajectory)
    m = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(m, full_check=True)
    names = [i.name for i in m.graph.input]
    assert names[0] == BATCH_INPUT and ("mask.rest" in names) == masked
    assert [o.name for o in m.graph.output] == ["out.disease", "out.severity"]
    # rows holding exactly these modalities (with masks: some rows lack imaging)
    df = heart.df.iloc[:30].reset_index(drop=True).astype(object)
    for x, cols in bundle.schema.modalities.items():
        for c in cols:
            if x not in STEPS:
                df[c] = None
            elif x == "imaging" and masked:
                df.loc[::3, c] = None
    enc = bundle.preprocessor.encode({c: df[c].tolist() for c in bundle.schema.input_columns})
    keep = np.logical_and.reduce([enc.present[x] for x in STEPS[:2]])
    assert keep.all() and enc.present["imaging"].all() != masked
    feed = {BATCH_INPUT: np.array([len(df)], dtype=np.int64)}
    for x, io, _ in encs:
        feed[io.inputs[1]] = enc.features[x]
        if masked:
            feed[mask_input(x)] = enc.present[x].reshape(-1, 1)
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    out = dict(zip(["disease", "severity"], sess.run(["out.disease", "out.severity"], feed)))
    order = list(STEPS) + [x for x in bundle.order if x not in STEPS]
    pred = bundle.predict(df.to_dict("records"), order=order, explain=trajectory)
    assert pred.ok.all()
    torch_states, _ = predict_trajectory(heart.trained.model, encode(heart.trained.preprocessor, df, with_labels=False),
                                         heart.trained.preprocessor.targets, order=order)
    n, S = len(df), len(STEPS) + 1
    for t in ("disease", "severity"):
        got = out[t].reshape(S if trajectory else 1, n, -1)
        got = got[..., 0] if t == "disease" else got
        np.testing.assert_allclose(got[-1], pred.values[t], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[-1], torch_states[-1][t], rtol=0, atol=1e-5)
        if trajectory:
            for k in range(S):  # prior, +rest, +demographics, +imaging
                np.testing.assert_allclose(got[k], pred.trajectory[k].values[t], rtol=0, atol=1e-6)
                np.testing.assert_allclose(got[k], torch_states[k][t], rtol=0, atol=1e-5)


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
