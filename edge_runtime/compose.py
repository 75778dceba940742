"""Compose per-module ONNX graphs into one graph per modality pattern, without the onnx package.

The bundle ships one ONNX file per module (initial state, each encoder, each decoder) so a module can be
replaced alone; running them as separate sessions chained from Python costs ~2x a fused graph at batch 1.
So at load time the runtime splices the verified module graphs into one graph for each pattern of
modalities it meets (on demand, cached). Every tensor name inside a module file is already prefixed with
the module's name at export (``encoders.rest.state``), and each module appears at most once in a composed
graph (the trajectory decodes all states in one stacked call, like ``MultiModN.forward_stacked``), so
composing is concatenation plus a few glue nodes: no renaming. The edge must not need the onnx package
(~20 MB, protobuf), so this file reads and writes the few protobuf fields it needs with the stdlib.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Sequence

# ---- protobuf wire format (only what ONNX ModelProto / GraphProto need) ----------------------------

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not the protobuf message expected."""


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise WireError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 70:
            raise WireError("varint too long")


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value): ints for varint/fixed, bytes for length-delimited."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _read_varint(buf, i)
        fno, wt = key >> 3, key & 7
        if wt == _VARINT:
            v, i = _read_varint(buf, i)
        elif wt == _LEN:
            size, i = _read_varint(buf, i)
            if i + size > n:
                raise WireError("truncated field")
            v, i = buf[i:i + size], i + size
        elif wt == _I64:
            v, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wt == _I32:
            v, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise WireError(f"unsupported wire type {wt}")
        if i > n:
            raise WireError("truncated field")
        yield fno, wt, v


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf encodes negative ints
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_len(fno: int, payload: bytes) -> bytes:
    return _varint(fno << 3 | _LEN) + _varint(len(payload)) + payload


def f_str(fno: int, s: str) -> bytes:
    return f_len(fno, s.encode())


def f_int(fno: int, n: int) -> bytes:
    return _varint(fno << 3 | _VARINT) + _varint(n)


# ---- ONNX pieces ------------------------------------------------------------------------------------
FLOAT, STRING, INT64, BOOL, DOUBLE = 1, 8, 7, 9, 11
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS, _ATTR_STRINGS = 1, 2, 7, 8


def node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, domain: str = "",
         **attrs: int | float | list[int] | list[str]) -> bytes:
    """A NodeProto; ``domain`` e.g. 'ai.onnx.ml'; list attributes of str are STRINGS, of int INTS."""
    out = b"".join(f_str(1, x) for x in inputs) + b"".join(f_str(2, x) for x in outputs)
    out += f_str(3, name) + f_str(4, op)
    if domain:
        out += f_str(7, domain)
    for k, v in attrs.items():
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            a = f_str(1, k) + b"".join(f_str(9, x) for x in v) + f_int(20, _ATTR_STRINGS)
        elif isinstance(v, list):
            a = f_str(1, k) + b"".join(f_int(8, x) for x in v) + f_int(20, _ATTR_INTS)
        elif isinstance(v, float):
            a = f_str(1, k) + _varint(2 << 3 | _I32) + struct.pack("<f", v) + f_int(20, _ATTR_FLOAT)
        else:
            a = f_str(1, k) + f_int(3, v) + f_int(20, _ATTR_INT)
        out += f_len(5, a)
    return out


def tensor(name: str, dtype: int, dims: Sequence[int], raw: bytes) -> bytes:
    return b"".join(f_int(1, d) for d in dims) + f_int(2, dtype) + f_str(8, name) + f_len(9, raw)


def value_info(name: str, dtype: int, dims: Sequence[int | str] | None) -> bytes:
    tt = f_int(1, dtype)
    if dims is not None:
        shape = b"".join(f_len(1, f_int(1, d) if isinstance(d, int) else f_str(2, d)) for d in dims)
        tt += f_len(2, shape)
    return f_str(1, name) + f_len(2, f_len(1, tt))


@dataclass(frozen=True)
class ModuleGraph:
    """The parts of one module's ONNX file that composition copies."""

    ir_version: int
    opsets: tuple[tuple[str, int], ...]
    nodes: tuple[bytes, ...]
    initializers: tuple[tuple[int, bytes], ...]  # (field number, payload): dense and sparse
    value_infos: tuple[bytes, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    functions: tuple[bytes, ...]
    input_infos: tuple[bytes, ...] = ()  # the ValueInfoProto of each input, in ``inputs`` order

    @classmethod
    def parse(cls, model: bytes) -> "ModuleGraph":
        ir, opsets, graph, functions = 0, [], None, []
        for fno, wt, v in fields(model):
            if fno == 1 and wt == _VARINT:
                ir = int(v)
            elif fno == 8 and wt == _LEN:
                dom, ver = "", 0
                for f2, w2, v2 in fields(v):  # type: ignore[arg-type]
                    if f2 == 1 and w2 == _LEN:
                        dom = v2.decode()  # type: ignore[union-attr]
                    elif f2 == 2 and w2 == _VARINT:
                        ver = int(v2)
                opsets.append((dom, ver))
            elif fno == 7 and wt == _LEN:
                graph = v
            elif fno == 25 and wt == _LEN:
                functions.append(v)
        if graph is None:
            raise WireError("no graph in ONNX model")
        nodes, inits, vinfos, inputs, outputs, infos = [], [], [], [], [], {}
        for fno, wt, v in fields(graph):  # type: ignore[arg-type]
            if wt != _LEN:
                continue
            if fno == 1:
                nodes.append(v)
            elif fno in (5, 15):
                inits.append((fno, v))
            elif fno == 13:
                vinfos.append(v)
            elif fno in (11, 12):
                name = next((v2.decode() for f2, w2, v2 in fields(v) if f2 == 1 and w2 == _LEN), "")  # type: ignore
                (inputs if fno == 11 else outputs).append(name)
                if fno == 11:
                    infos[name] = v
        init_names = {_tensor_name(p) for _, p in inits}
        inputs = [x for x in inputs if x not in init_names]  # old IRs list initializers as inputs too
        return cls(ir, tuple(sorted(opsets)), tuple(nodes), tuple(inits), tuple(vinfos), tuple(inputs),
                   tuple(outputs), tuple(functions), tuple(infos[x] for x in inputs))


def _tensor_name(payload: bytes) -> str:
    for fno, wt, v in fields(payload):
        if fno == 8 and wt == _LEN:
            return v.decode()  # type: ignore[union-attr]
        if fno == 1 and wt == _LEN:  # SparseTensorProto.values (a TensorProto) carries the name
            return _tensor_name(v)  # type: ignore[arg-type]
    return ""


def model_bytes(ir_version: int, opsets: Sequence[tuple[str, int]], graph_name: str, nodes: Sequence[bytes],
                initializers: Sequence[tuple[int, bytes]], inputs: Sequence[bytes], outputs: Sequence[bytes],
                value_infos: Sequence[bytes] = (), functions: Sequence[bytes] = ()) -> bytes:
    g = b"".join(f_len(1, n) for n in nodes) + f_str(2, graph_name)
    g += b"".join(f_len(fno, t) for fno, t in initializers)
    g += b"".join(f_len(11, x) for x in inputs) + b"".join(f_len(12, x) for x in outputs)
    g += b"".join(f_len(13, x) for x in value_infos)
    m = f_int(1, ir_version) + f_str(2, "mmn-edge") + f_len(7, g)
    m += b"".join(f_len(8, (f_str(1, d) if d else b"") + f_int(2, v)) for d, v in opsets)
    m += b"".join(f_len(25, fn) for fn in functions)
    return m


# ---- one graph per pattern -------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleIO:
    """A module's graph and the names of its inputs and outputs (as the manifest lists them)."""

    graph: ModuleGraph
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


BATCH_INPUT = "init_state.batch"
STATE_INPUT, STATE_OUTPUT = "mmn.state.in", "mmn.state.out"  # a streaming step's graph (``init=None``)


def mask_input(modality: str) -> str:
    return f"mask.{modality}"


def output_name(task: str) -> str:
    return f"out.{task}"


def feature_output(modality: str) -> str:
    """The preprocessing graph's output of a modality's features (float (B, d)); its mask is ``mask_input``."""
    return f"x.{modality}"


def compose(init: ModuleIO | None, encoders: Sequence[tuple[str, ModuleIO, int]],
            decoders: Sequence[tuple[str, ModuleIO, str, int]], masked: bool, trajectory: bool,
            state_size: int = 0, pre: ModuleIO | None = None) -> bytes:
    """One ONNX model: initial state, then ``encoders`` in order [(modality, module, feature dim)], then
    ``decoders`` [(task, module, kind, output size)] on the final state (or on all states stacked when ``trajectory``).

    Inputs: ``init_state.batch`` (int64 [1]), each encoder's x, and with ``masked`` a bool (B, 1)
    ``mask.<modality>`` per encoder: a masked-out sample keeps its state (``where(mask, new, state)``).
    Outputs ``out.<task>``: p(1) for binary (sigmoid), class probabilities (softmax), raw value for regression;
    shape (B, k), or (S*B, k) with states stacked first-major when ``trajectory``.
    ``init=None`` (streaming, edge_runtime/streaming.py): the state is the input ``mmn.state.in`` (B,
    ``state_size``) instead of the initial state, and the new state is one more output, ``mmn.state.out``.
    ``pre`` (the preprocessing graph, edge_runtime/portable.py): its raw-column inputs are the model's inputs,
    its ``x.<modality>`` outputs feed the encoders and its ``mask.<modality>`` outputs are the masks (and outputs
    too), and the batch size is the first column's length: a model any ONNX Runtime host runs from raw columns.
    """
    modules = ([pre] if pre is not None else []) + ([init] if init is not None else [])
    modules += [e for _, e, _ in encoders] + [d for _, d, _, _ in decoders]
    opsets: dict[str, int] = {}
    for m in modules:  # the default domain from the modules' export; 'ai.onnx.ml' from preprocessing
        for dom, ver in m.graph.opsets:
            if opsets.setdefault(dom, ver) != ver:
                raise WireError(f"modules were exported with different opsets for domain '{dom or 'ai.onnx'}' "
                                f"({opsets[dom]} and {ver}); re-export the bundle")
    nodes: list[bytes] = []  # kept in topological order, as ONNX requires
    inputs: list[bytes] = []
    if pre is not None:
        nodes.extend(pre.graph.nodes)
        inputs.extend(pre.graph.input_infos)
    if init is not None:
        if pre is not None:  # the batch size from the first column: hosts feed raw columns only
            nodes.append(node("Shape", [pre.inputs[0]], [BATCH_INPUT], "mmn.batch"))
        else:
            inputs.append(value_info(BATCH_INPUT, INT64, [1]))
        nodes.extend(init.graph.nodes)
        state = init.outputs[0]
    else:
        inputs.append(value_info(STATE_INPUT, FLOAT, ["batch", state_size]))
        state = STATE_INPUT
    states = [state]
    for k, (m, enc, dim) in enumerate(encoders):
        s_in, x_in = enc.inputs
        if pre is not None:
            nodes.append(node("Identity", [feature_output(m)], [x_in], f"mmn.wire.x.{m}"))
        else:
            inputs.append(value_info(x_in, FLOAT, ["batch", dim]))
        nodes.append(node("Identity", [state], [s_in], f"mmn.wire.{m}"))
        nodes.extend(enc.graph.nodes)
        new = enc.outputs[0]
        if masked:
            mask = mask_input(m)
            if pre is None:
                inputs.append(value_info(mask, BOOL, ["batch", 1]))
            nodes.append(node("Where", [mask, new, state], [f"mmn.state.{k + 1}"], f"mmn.mask.{m}"))
            new = f"mmn.state.{k + 1}"
        state = new
        states.append(state)
    if trajectory and len(states) > 1:
        nodes.append(node("Concat", states, ["mmn.states"], "mmn.stack", axis=0))
        state = "mmn.states"
    outputs = []
    if pre is not None:  # which modalities each row had: a host reports rows with none, and the applied steps
        outputs += [value_info(mask_input(m), BOOL, ["batch", 1]) for m, _, _ in encoders]
    if init is None:
        nodes.append(node("Identity", [state], [STATE_OUTPUT], "mmn.state.out"))
        outputs.append(value_info(STATE_OUTPUT, FLOAT, ["batch", state_size]))
    for t, dec, kind, k in decoders:
        nodes.append(node("Identity", [state], [dec.inputs[0]], f"mmn.wire.{t}"))
        nodes.extend(dec.graph.nodes)
        op = {"binary": "Sigmoid", "multiclass": "Softmax"}.get(kind, "Identity")
        attrs = {"axis": -1} if op == "Softmax" else {}
        nodes.append(node(op, [dec.outputs[0]], [output_name(t)], f"mmn.post.{t}", **attrs))
        outputs.append(value_info(output_name(t), FLOAT, ["stacked" if trajectory else "batch", k]))
    return model_bytes(
        max(m.graph.ir_version for m in modules), sorted(opsets.items()), "mmn_composed", nodes,
        [i for m in modules for i in m.graph.initializers], inputs, outputs,
        [v for m in modules for v in m.graph.value_infos], [f for m in modules for f in m.graph.functions],
    )
