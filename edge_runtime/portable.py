"""Preprocessing as an ONNX graph: raw columns in, each modality's features and presence mask out.

The bundle's preprocessing (docs/schema.md: missing codes, mean imputation, standardization, one-hot of the
categories seen in fitting) is written here as standard ``ai.onnx`` and ``ai.onnx.ml`` operators, so that any
ONNX Runtime host (C, C#, Java, JavaScript, mobile) runs a bundle from the manifest's column list alone, and the
Python runtime runs the same graph (``Bundle.encode``): the edge has one preprocessing implementation.
Training keeps its numpy implementation (``Preprocessor.encode``); tests/edge_runtime/test_portable.py holds the
two to the same features over missing codes, unknown categories, NaN and partial modalities.

Inputs, one 1-D tensor of the batch's length per input column of the schema, named ``col.<column>``:

- numeric column: ``double``, NaN where the value is missing. The graph also treats the column's numeric
  missing codes and +-inf as missing, then standardizes with the training mean and SD and fills missing with 0.
- categorical column: ``string``, the category as text as ``canonical_category`` writes it (trimmed; an
  integral number without decimals: '1.0' -> '1'), '' where missing. A value that is not one of the training
  categories (a missing code, an unknown category) one-hot encodes to zeros and counts as missing.

Outputs per modality: ``x.<modality>`` float (B, d), the encoder's input, and ``mask.<modality>`` bool (B, 1),
true where any of its columns is present. Parsing text to numbers, recognizing missing words and reporting bad
values stay in the host (``Preprocessor.parse``): they are validation, and each host reads its own formats.
The graph is built with the stdlib protobuf writer of compose.py: the edge needs no onnx package to rebuild it
for a bundle exported before graphs were shipped.
"""
from __future__ import annotations

import struct
from typing import Sequence

from .compose import (BOOL, DOUBLE, FLOAT, INT64, STRING, ModuleGraph, ModuleIO, feature_output, mask_input,
                      model_bytes, node, tensor, value_info)
from .preprocessing import Preprocessor, _is_number  # the parser's own test of "a number"
from .schema import canonical_category

PREPROCESS = "preprocess"  # the preprocessing graph's module name in the manifest (file preprocess.onnx)
PORTABLE = "portable.onnx"  # the whole model from raw columns, for other hosts (manifest key "portable")
ML_DOMAIN, ML_OPSET = "ai.onnx.ml", 2  # LabelEncoder with keys_strings / values_int64s / default_int64
DEFAULT_IR = 8


def column_input(column: str) -> str:
    return f"col.{column}"


def input_spec(prep: Preprocessor, modalities: Sequence[str]) -> list[dict[str, str]]:
    """The graph's inputs as the manifest lists them: name, column and element type ('double' or 'string')."""
    out = []
    for m in modalities:
        for c in prep.schema.modalities[m]:
            e = {"name": column_input(c), "column": c,
                 "type": "string" if prep.columns[c]["kind"] == "categorical" else "double"}
            words = sorted({canonical_category(v) for v in prep.schema.missing_codes.get(c, ()) if not _is_number(v)})
            if e["type"] == "double" and words:  # text codes the host reads as missing (numeric codes: the graph)
                e["missing"] = words
            out.append(e)
    return out


def _double(name: str, values: Sequence[float], dims: Sequence[int] = ()) -> tuple[int, bytes]:
    return 5, tensor(name, DOUBLE, dims, struct.pack(f"<{len(values)}d", *values))


def _int64(name: str, values: Sequence[int], dims: Sequence[int]) -> tuple[int, bytes]:
    return 5, tensor(name, INT64, dims, struct.pack(f"<{len(values)}q", *values))


def preprocess_graph(prep: Preprocessor, modalities: Sequence[str], opset: int, ir_version: int = DEFAULT_IR) -> bytes:
    """The ONNX model of the preprocessing of ``modalities`` (see the module docstring)."""
    nodes: list[bytes] = []

    def unsqueeze(x: str, out: str) -> bytes:  # axes became an input in opset 13
        return (node("Unsqueeze", [x, "pre.axis1"], [out], out) if opset >= 13
                else node("Unsqueeze", [x], [out], out, axes=[1]))

    inits: list[tuple[int, bytes]] = [_double("pre.zero", [0.0]), _int64("pre.axis1", [1], [1]),
                                      _int64("pre.minus1", [-1], [])]
    inputs, outputs = [], []
    k = 0
    for m in modalities:
        blocks, presents = [], []
        for c in prep.schema.modalities[m]:
            st, col, p = prep.columns[c], column_input(c), f"pre.{k}"
            k += 1
            if st["kind"] == "categorical":
                cats = [str(v) for v in st["categories"]]
                inputs.append(value_info(col, STRING, ["batch"]))
                if not cats:  # no category was seen in fitting: never present, no features
                    continue
                nodes.append(node("LabelEncoder", [col], [f"{p}.slot"], f"{p}.slot", domain=ML_DOMAIN,
                                  keys_strings=cats, values_int64s=list(range(len(cats))), default_int64=-1))
                inits.append(_int64(f"{p}.range", list(range(len(cats))), [1, len(cats)]))
                nodes += [unsqueeze(f"{p}.slot", f"{p}.slot2"),
                          node("Equal", [f"{p}.slot2", f"{p}.range"], [f"{p}.hot"], f"{p}.hot"),
                          node("Cast", [f"{p}.hot"], [f"{p}.x"], f"{p}.x", to=FLOAT),
                          node("Greater", [f"{p}.slot", "pre.minus1"], [f"{p}.present"], f"{p}.present")]
            else:
                inputs.append(value_info(col, DOUBLE, ["batch"]))
                nodes += [node("IsNaN", [col], [f"{p}.nan"], f"{p}.nan"),
                          node("IsInf", [col], [f"{p}.inf"], f"{p}.inf"),
                          node("Or", [f"{p}.nan", f"{p}.inf"], [f"{p}.miss0"], f"{p}.miss0")]
                missing = f"{p}.miss0"
                codes = sorted({float(v) for v in prep.schema.missing_codes.get(c, ()) if _is_number(v)})
                for j, code in enumerate(codes):
                    inits.append(_double(f"{p}.code{j}", [code]))
                    nodes += [node("Equal", [col, f"{p}.code{j}"], [f"{p}.is{j}"], f"{p}.is{j}"),
                              node("Or", [missing, f"{p}.is{j}"], [f"{p}.miss{j + 1}"], f"{p}.miss{j + 1}")]
                    missing = f"{p}.miss{j + 1}"
                inits += [_double(f"{p}.mean", [float(st["mean"])]), _double(f"{p}.std", [float(st["std"])])]
                nodes += [node("Sub", [col, f"{p}.mean"], [f"{p}.c"], f"{p}.c"),
                          node("Div", [f"{p}.c", f"{p}.std"], [f"{p}.z"], f"{p}.z"),
                          node("Where", [missing, "pre.zero", f"{p}.z"], [f"{p}.filled"], f"{p}.filled"),
                          node("Cast", [f"{p}.filled"], [f"{p}.f"], f"{p}.f", to=FLOAT),
                          unsqueeze(f"{p}.f", f"{p}.x"),
                          node("Not", [missing], [f"{p}.present"], f"{p}.present")]
            blocks.append(f"{p}.x")
            presents.append(f"{p}.present")
        x, mask = feature_output(m), mask_input(m)
        if not blocks:  # no category of its columns was seen in fitting: no features, never present
            q = f"pre.{m}"
            inits.append(_int64(f"{q}.zero", [0], [1]))
            nodes += [node("Shape", [column_input(prep.schema.modalities[m][0])], [f"{q}.n"], f"{q}.n"),
                      node("Concat", [f"{q}.n", f"{q}.zero"], [f"{q}.shape0"], f"{q}.shape0", axis=0),
                      node("ConstantOfShape", [f"{q}.shape0"], [x], f"{q}.x"),  # float zeros (B, 0)
                      node("Concat", [f"{q}.n", "pre.axis1"], [f"{q}.shape1"], f"{q}.shape1", axis=0),
                      node("ConstantOfShape", [f"{q}.shape1"], [f"{q}.zeros"], f"{q}.zeros"),
                      node("Cast", [f"{q}.zeros"], [mask], f"{q}.mask", to=BOOL)]
            outputs += [value_info(x, FLOAT, ["batch", 0]), value_info(mask, BOOL, ["batch", 1])]
            continue
        nodes.append(node("Concat", blocks, [x], f"pre.{m}.x", axis=1) if len(blocks) > 1
                     else node("Identity", blocks, [x], f"pre.{m}.x"))
        seen = presents[0]
        for j, q in enumerate(presents[1:]):
            nodes.append(node("Or", [seen, q], [f"pre.{m}.seen{j}"], f"pre.{m}.seen{j}"))
            seen = f"pre.{m}.seen{j}"
        nodes.append(unsqueeze(seen, mask))
        outputs += [value_info(x, FLOAT, ["batch", prep.modality_dims[m]]), value_info(mask, BOOL, ["batch", 1])]
    return model_bytes(ir_version, [("", opset), (ML_DOMAIN, ML_OPSET)], "mmn_preprocessing", nodes, inits,
                       inputs, outputs)


def preprocess_module(graph: bytes, modalities: Sequence[str]) -> ModuleIO:
    """The preprocessing graph as a module for ``compose`` (inputs: its columns; outputs: x and mask per modality)."""
    g = ModuleGraph.parse(graph)
    return ModuleIO(g, g.inputs, tuple(n for m in modalities for n in (feature_output(m), mask_input(m))))

