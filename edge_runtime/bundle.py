"""Load a verified bundle, describe it, predict from raw rows.

    bundle = load_bundle("bundle/", trust_key="signer.pub")
    bundle.describe()
    preds = bundle.predict([{"age": 63, "sex": "Male", "cp": "typical angina"}], explain=True)

Each sample runs the initial state, then the encoders of the modalities it has (in the bundle's order, or
``order``), then the decoders: exactly ``MultiModN.forward`` with per-sample masking. Module graphs are
composed into one ONNX graph per pattern of modalities (see compose.py) and sessions are cached, so a batch
costs one session call: a batch whose rows share a pattern runs the encoders of that pattern only; a mixed
batch runs the union of its patterns with ``where(mask, new, state)`` per encoder.
"""
from __future__ import annotations

import csv
import gc
import itertools
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping as _MappingABC
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, TextIO

import numpy as np
import onnxruntime as ort

from .compose import (BATCH_INPUT, ModuleGraph, ModuleIO, WireError, compose, feature_output, mask_input,
                      output_name)
from .portable import PREPROCESS, column_input, input_spec, preprocess_graph, preprocess_module
from .preprocessing import DataError, EncodedInputs, Preprocessor, TextColumn
from .trust import BundleError, VerifiedBundle, read_manifest, verify_bundle

DEFAULT_CHUNK = 1024  # rows per session call: bounds memory (~25 MB of working set) for any input size
MAX_CACHED_SESSIONS = 64
UNVERIFIED_NOTE = ("bundle NOT verified (--allow-unsigned): its signature was not checked, so anyone could have "
                   "written its manifest and its predictions are not attested; file hashes were checked (this "
                   "catches corruption only)")


def session_options() -> ort.SessionOptions:
    """Small-device settings: one thread, sequential, no CPU memory arena, no spinning."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


@dataclass
class Step:
    """The prediction after one step of the sequence (the paper's CP): ``name`` is 'prior' or '+<modality>'.
    ``applied[i]`` tells whether row i's state changed at this step (its modality was present)."""

    name: str
    applied: np.ndarray
    values: dict[str, np.ndarray]


@dataclass
class Predictions:
    """Per-task predictions for n input rows, in input order.

    values[task]: binary -> p(1) (n,); multiclass -> class probabilities (n, k) over ``classes(task)``;
    regression -> value in the label's units (n,). NaN where ``ok`` is False, with ``reasons[i]`` saying why.
    ``warnings[i]``: non-fatal issues of row i (e.g. an unknown category, treated as missing).
    ``used[i]``: the modalities that row i's prediction used. ``notes``: issues of the whole input
    (e.g. ignored columns). ``trajectory``: with explain=True, the prediction after every step.
    """

    tasks: dict[str, dict[str, Any]]
    values: dict[str, np.ndarray]
    ok: np.ndarray
    reasons: list[str]
    warnings: list[str]
    used: list[str]
    notes: list[str] = field(default_factory=list)
    trajectory: list[Step] | None = None

    def __len__(self) -> int:
        return len(self.ok)

    def classes(self, task: str) -> list[str]:
        return list(self.tasks[task].get("classes", []))

    def label(self, task: str) -> list[str | None]:
        """Multiclass: the most probable class per row (None where not predicted)."""
        if self.tasks[task]["kind"] != "multiclass":
            raise ValueError(f"task '{task}' is {self.tasks[task]['kind']}; label() is for multiclass tasks")
        cls = self.classes(task)
        idx = np.argmax(np.nan_to_num(self.values[task], nan=-1.0), axis=1)
        return [cls[j] if ok else None for j, ok in zip(idx, self.ok)]

    def columns(self, explain: bool = False) -> list[str]:
        cols: list[str] = []
        for t, spec in self.tasks.items():
            cols.append(t)
            if spec["kind"] == "multiclass":
                cols.extend(f"{t}_p_{c}" for c in spec["classes"])
        if explain and self.trajectory:
            cols.extend(f"{t}@{s.name}" for s in self.trajectory for t in self.tasks)
        return cols + ["modalities", "warnings", "reason"]

    def to_columns(self, explain: bool = False) -> list[list[str]]:
        """The output as columns of strings, in the order of ``columns()``: what the CLI writes (built column by
        column: one list per output column, no dict per row)."""
        ok = np.asarray(self.ok, dtype=bool)

        def numbers(values: np.ndarray, shown: np.ndarray) -> list[str]:
            text = list(map(_FORMAT, values.tolist()))  # _fmt's text, without a Python call per value
            for i in np.flatnonzero(~shown | ~np.isfinite(values)).tolist():
                text[i] = ""
            return text

        out: list[list[str]] = []
        for t, spec in self.tasks.items():
            v = np.asarray(self.values[t])
            if spec["kind"] == "multiclass":
                out.append([c or "" for c in self.label(t)])
                out += [numbers(v[:, j], ok) for j in range(len(spec["classes"]))]
            else:
                out.append(numbers(v, ok))
        if explain and self.trajectory:
            for s in self.trajectory:
                shown = ok if s.name == "prior" else ok & s.applied.astype(bool)
                for t, spec in self.tasks.items():
                    v = np.asarray(s.values[t])
                    if spec["kind"] == "multiclass":
                        best = np.argmax(v, axis=1).tolist()
                        out.append([spec["classes"][j] if sh else "" for j, sh in zip(best, shown)])
                    else:
                        out.append(numbers(v, shown))
        return out + [list(self.used), list(self.warnings), list(self.reasons)]

    def to_rows(self, explain: bool = False) -> list[dict[str, str]]:
        """One dict of strings per row, keyed by ``columns()`` (``to_columns``, row by row)."""
        names = self.columns(explain)
        return [dict(zip(names, values)) for values in zip(*self.to_columns(explain))]

    @classmethod
    def concat(cls, parts: Sequence["Predictions"]) -> "Predictions":
        first = parts[0]
        traj = None
        if first.trajectory is not None:
            traj = [Step(s.name, np.concatenate([p.trajectory[k].applied for p in parts]),  # type: ignore[index]
                         {t: np.concatenate([p.trajectory[k].values[t] for p in parts]) for t in s.values})  # type: ignore[index]
                    for k, s in enumerate(first.trajectory)]
        notes = list(dict.fromkeys(n for p in parts for n in p.notes))
        return cls(first.tasks, {t: np.concatenate([p.values[t] for p in parts]) for t in first.tasks},
                   np.concatenate([p.ok for p in parts]), [r for p in parts for r in p.reasons],
                   [w for p in parts for w in p.warnings], [u for p in parts for u in p.used], notes, traj)


_FORMAT = "{:.8g}".format


def _fmt(v: float) -> str:
    return "" if not math.isfinite(v) else _FORMAT(float(v))


@dataclass
class _Composed:
    session: ort.InferenceSession
    x_names: tuple[str, ...]
    outputs: list[str]
    run: Any = None  # the session's run without the Python wrapper's per-call input checks (see _composed)


def session_runner(sess: ort.InferenceSession, binding: bool = True) -> Any:
    """``run(output_names, feed)`` of ``sess``. At batch 1 the public ``InferenceSession.run``'s input
    validation is ~20% of a call; our feeds are built from the graph's own names and dtypes, so with
    ``binding`` this calls onnxruntime's (private) binding ``sess._sess`` directly when this onnxruntime
    has it, and falls back to the public ``run`` otherwise (same results: tests/edge_runtime/test_parity.py)."""
    raw = getattr(sess, "_sess", None) if binding else None
    if raw is not None and hasattr(raw, "run"):
        options = ort.RunOptions()
        return lambda outputs, feed: raw.run(outputs, feed, options)
    return sess.run


class Bundle:
    """A verified bundle, ready to predict. Build with ``load_bundle``."""

    #: False: run sessions through onnxruntime's public API only (``session_runner``); set before predicting.
    use_binding: bool = True

    def __init__(self, verified: VerifiedBundle):
        m = verified.manifest
        self.path = verified.path
        self.manifest = m
        self.signed_by = verified.signed_by
        self.preprocessor = validate_manifest(m, self.path)
        self.order: list[str] = list(m["order"])
        self.tasks: dict[str, dict[str, Any]] = {t: dict(s) for t, s in m["tasks"].items()}
        modules = m["modules"]
        self.schema = self.preprocessor.schema
        self.dims = self.preprocessor.modality_dims
        self._modules: dict[str, ModuleIO] = {}
        for name in ["init_state"] + [f"encoders.{x}" for x in self.order] + [f"decoders.{t}" for t in self.tasks]:
            spec = modules.get(name)
            if spec["file"] not in verified.files:
                raise BundleError(f"manifest of {self.path} has no file for module '{name}'")
            try:
                graph = ModuleGraph.parse(verified.files[spec["file"]])
            except WireError as e:
                raise BundleError(f"{spec['file']} is not a readable ONNX model: {e}") from None
            io = ModuleIO(graph, tuple(spec["inputs"]), tuple(spec["outputs"]))
            if set(io.inputs) != set(graph.inputs) or not set(io.outputs) <= set(graph.outputs):
                raise BundleError(f"{spec['file']}: graph inputs {graph.inputs} / outputs {graph.outputs} do not match "
                                  f"the manifest ({list(io.inputs)} / {list(io.outputs)})")
            if name.startswith("encoders."):
                x = name.split(".", 1)[1]
                declared = spec.get("shapes", {}).get(io.inputs[-1], [None, self.dims[x]])[-1]
                if len(io.inputs) != 2 or declared != self.dims[x]:
                    raise BundleError(f"{spec['file']} takes {declared} features but the preprocessing makes "
                                      f"{self.dims[x]} for modality '{x}'")
            self._modules[name] = io
        self._pre_graph, self.preprocess_shipped = self._preprocess_graph(verified)
        self._pre: _Composed | None = None  # its session (made below, once the options are set)
        self._kinds = {t: s["kind"] for t, s in self.tasks.items()}
        self._task_names = list(self.tasks)
        self._batch: dict[int, np.ndarray] = {}  # the int64 batch-size input, reused per size
        self._options = session_options()
        self._sessions: OrderedDict[tuple, _Composed] = OrderedDict()
        known = set(self.schema.input_columns) | {t.column for t in self.schema.tasks.values()}
        self._expected_other = known | ({self.schema.site_column} if self.schema.site_column else set())
        self._pre_session()  # at load: a graph this onnxruntime cannot run is a refusal, not a failing predict

    def _preprocess_graph(self, verified: VerifiedBundle) -> tuple[bytes, bool]:
        """The bundle's preprocessing graph (portable.py) and whether the bundle ships it. A bundle exported
        before graphs were shipped gets the same graph built here from its signed manifest's statistics."""
        spec = self.manifest["modules"].get(PREPROCESS)
        if spec is None:
            return preprocess_graph(self.preprocessor, self.order, int(self.manifest.get("opset") or 17)), False
        data = verified.files.get(spec["file"])
        if data is None:
            raise BundleError(f"manifest of {self.path} has no file for module '{PREPROCESS}'")
        want = [e["name"] for e in input_spec(self.preprocessor, self.order)]
        try:
            graph = ModuleGraph.parse(data)
        except WireError as e:
            raise BundleError(f"{spec['file']} is not a readable ONNX model: {e}") from None
        if sorted(graph.inputs) != sorted(want) or list(spec["inputs"]) != want:
            raise BundleError(f"{spec['file']}: graph inputs {list(graph.inputs)[:10]} do not match the manifest's "
                              f"columns {want[:10]}")
        return data, True

    def encode(self, table: Mapping[str, Sequence], on_error: str = "collect") -> EncodedInputs:
        """Raw columns -> per-modality features and presence: the host parses and validates
        (``Preprocessor.parse``), the bundle's preprocessing graph does the rest, as on any other host."""
        parsed = self.preprocessor.parse(table, on_error)
        n = len(parsed.valid)
        if n == 0:
            return EncodedInputs({x: np.zeros((0, self.dims[x]), np.float32) for x in self.order},
                                 {x: np.zeros(0, dtype=bool) for x in self.order}, parsed.issues, parsed.valid)
        pre = self._pre_session()
        feed = {}
        for name, c in zip(pre.x_names, self.schema.input_columns):
            v = parsed.columns[c]
            if c in parsed.slots:  # categories: the graph gets the known ones only (the host reported the others)
                v = np.where(parsed.slots[c] >= 0, v, "")
            feed[name] = v
        outs = (pre.run if self.use_binding else pre.session.run)(pre.outputs, feed)  # made at load: binding now
        features = {x: outs[2 * k] for k, x in enumerate(self.order)}
        present = {x: outs[2 * k + 1].reshape(n) for k, x in enumerate(self.order)}
        return EncodedInputs(features, present, parsed.issues, parsed.valid)

    def _pre_session(self) -> _Composed:
        pre = self._pre
        if pre is None:
            try:
                sess = ort.InferenceSession(self._pre_graph, self._options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's InvalidGraph / Fail are not RuntimeErrors
                raise BundleError(f"the preprocessing graph of {self.path} does not load in onnxruntime "
                                  f"{ort.__version__}: {e}") from None
            names = [n for x in self.order for n in (feature_output(x), mask_input(x))]
            missing = sorted(set(names) - {o.name for o in sess.get_outputs()})
            if missing:
                raise BundleError(f"the preprocessing graph of {self.path} has no output(s) {missing[:6]}")
            pre = self._pre = _Composed(sess, tuple(column_input(c) for c in self.schema.input_columns), names)
            pre.run = session_runner(sess, self.use_binding)
        return pre

    def portable_model(self) -> bytes:
        """One ONNX model for any host: raw columns in (``col.<column>``), the prediction after the prior and
        after each step out (``out.<task>``, (1 + steps) * rows, stacked step-major), modalities masked per row."""
        return compose_portable(preprocess_module(self._pre_graph, self.order), self._modules, self.order, self.tasks)

    # ---- description --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Modalities (columns, feature size), tasks (kind, classes), files and sizes, provenance, trust."""
        m = self.manifest
        return {
            "model_id": m.get("model_id"),
            "release": m.get("release", 0),  # bundles exported before release numbers: 0
            "format_version": m.get("format_version"),
            "signed_by": self.signed_by,
            "modalities": {x: {"columns": list(self.schema.modalities[x]), "features": self.dims[x]} for x in self.order},
            "order": list(self.order),
            "tasks": {t: {k: v for k, v in s.items() if k in ("kind", "classes")} for t, s in self.tasks.items()},
            "files": {f: e["bytes"] for f, e in m["files"].items()},
            "total_bytes": sum(e["bytes"] for e in m["files"].values()),
            "opset": m.get("opset"),
            "provenance": m.get("provenance", {}),
            "model_card": m.get("model_card"),
            "portable": "portable" in m,  # portable.onnx: the whole model from raw columns (docs/edge.md)
        }

    # ---- composed sessions --------------------------------------------------------------------------
    def _composed(self, steps: tuple[str, ...], masked: bool, trajectory: bool) -> _Composed:
        key = (steps, masked, trajectory)
        c = self._sessions.get(key)
        if c is not None:
            self._sessions.move_to_end(key)
            return c
        try:
            sess = ort.InferenceSession(self._compose_bytes(steps, masked, trajectory), self._options,
                                        providers=["CPUExecutionProvider"])
        except Exception as e:  # WireError, and onnxruntime's errors (InvalidGraph, Fail: not RuntimeErrors)
            raise BundleError(f"the modules of {self.path} do not compose for modalities {list(steps)}: {e}") from None
        c = _Composed(sess, tuple(self._modules[f"encoders.{x}"].inputs[1] for x in steps),
                      [output_name(t) for t in self.tasks])
        c.run = session_runner(sess, self.use_binding)
        self._sessions[key] = c
        if len(self._sessions) > MAX_CACHED_SESSIONS:
            self._sessions.popitem(last=False)
        return c

    def _compose_bytes(self, steps: tuple[str, ...], masked: bool, trajectory: bool) -> bytes:
        encs = [(x, self._modules[f"encoders.{x}"], self.dims[x]) for x in steps]
        return compose(self._modules["init_state"], encs, _decoders(self._modules, self.tasks), masked, trajectory)

    def run(self, features: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray],
            order: Sequence[str] | None = None, trajectory: bool = False):
        """Pre-encoded inputs (``Preprocessor.encode`` output: float32 (n, d) and bool (n,) per modality)
        -> ({task: prediction array}, trajectory or None). Rows with no modality get the prior's prediction.
        The trajectory is a list of (step name, applied mask, {task: array}) over 'prior' and every modality."""
        order = self.order if order is None else list(order)
        n = len(next(iter(present.values())))
        if n == 1:  # fast path: the composed graph of this row's modalities, no masks
            steps = tuple([x for x in order if present[x][0]])
            masked = False
        else:  # encoders of the modalities any row has; masks only if rows differ
            counts = [np.count_nonzero(present[x]) for x in order]
            steps = tuple(x for x, c in zip(order, counts) if c)
            masked = any(0 < c < n for c in counts)
        c = self._composed(steps, masked, trajectory)
        batch = self._batch.get(n)
        if batch is None:
            batch = np.array([n], dtype=np.int64)
            if n <= 4096:
                self._batch[n] = batch
        feed: dict[str, np.ndarray] = {BATCH_INPUT: batch}
        for x, name in zip(steps, c.x_names):
            a = features[x]
            feed[name] = a if a.dtype == np.float32 else np.asarray(a, dtype=np.float32)
            if masked:
                feed[mask_input(x)] = np.asarray(present[x], dtype=bool).reshape(n, 1)
        outs = c.run(c.outputs, feed)
        if not trajectory:
            return {t: self._finish(t, o) for t, o in zip(self._task_names, outs)}, None
        S = len(steps) + 1
        result = {t: self._finish(t, o.reshape(S, n, -1)) for t, o in zip(self.tasks, outs)}
        traj = [("prior", np.ones(n, dtype=bool), {t: v[0] for t, v in result.items()})]
        k = 0
        for x in order:
            if x in steps:
                k += 1
            traj.append((f"+{x}", np.asarray(present[x], dtype=bool), {t: v[k] for t, v in result.items()}))
        return {t: v[-1] for t, v in result.items()}, traj

    def _finish(self, task: str, out: np.ndarray) -> np.ndarray:
        kind = self._kinds[task]
        if kind == "multiclass":
            return out
        if kind == "binary":
            return out[..., 0]
        spec = self.tasks[task]  # regression: de-standardize in float64, as training standardized targets
        return out[..., 0].astype(np.float64) * spec["std"] + spec["mean"]

    # ---- raw rows -----------------------------------------------------------------------------------
    def predict(self, rows: Any, explain: bool = False, order: Sequence[str] | None = None,
                chunk_size: int = DEFAULT_CHUNK, min_modalities: int = 1) -> Predictions:
        """Predict from raw rows in the training data's format: a list of dicts, a dict of columns, or a
        CSV path. Rows are processed ``chunk_size`` at a time. A bad row gets NaN predictions and a reason;
        other rows are unaffected. Rows with fewer than ``min_modalities`` modalities present are not
        predicted (default 1: no prediction from the prior alone). ``explain`` adds the trajectory."""
        order = self._check_order(order)
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if isinstance(rows, (str, Path)):
            parts = [self._predict_chunk(cols, pre, explain, order, min_modalities, notes)
                     for cols, pre, notes in read_csv_chunks(rows, chunk_size, self.column_notes)]
        else:
            table, pre = to_columns(rows)
            n = len(pre)
            notes = self.column_notes(list(table), n)
            parts = [self._predict_chunk({c: v[i:i + chunk_size] for c, v in table.items()}, pre[i:i + chunk_size],
                                         explain, order, min_modalities, notes)
                     for i in range(0, n, chunk_size)]
            if not parts:
                parts = [self._predict_chunk({}, [], explain, order, min_modalities, notes)]
        if len(parts) == 1:
            return parts[0]
        return Predictions.concat(parts)

    def predict_csv(self, input: str | Path, output: str | Path, explain: bool = False,
                    order: Sequence[str] | None = None, chunk_size: int = DEFAULT_CHUNK, min_modalities: int = 1,
                    keep: Sequence[str] = ()) -> dict[str, Any]:
        """Stream a CSV through ``predict`` and write one output row per input row, in input order
        (``keep``: input columns copied to the output first, e.g. an id). Memory is bounded by
        ``chunk_size`` whatever the file size. Returns counts, notes and the first problems."""
        order = self._check_order(order)
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        output = check_output(output, input)
        summary: dict[str, Any] = {"rows": 0, "predicted": 0, "notes": [], "problems": [],
                                   "verified": self.signed_by is not None}
        with atomic_output(output) as f, _cyclic_gc_paused():
            writer = None
            for cols, pre, notes in read_csv_chunks(input, chunk_size,
                                                    lambda h, n: self.column_notes(h, n, keep=keep)):
                if writer is None:
                    absent = [k for k in keep if k not in cols]
                    if absent:
                        raise DataError(f"--keep column(s) {absent} are not in the input")
                    summary["notes"] += notes
                p = self._predict_chunk(cols, pre, explain, order, min_modalities, notes)
                if writer is None:
                    writer = csv.writer(f)
                    writer.writerow(list(keep) + p.columns(explain)[:-1] + ["status", "reason"])
                *values, reasons = p.to_columns(explain)
                kept = [["" if v is None else v for v in cols[k]] for k in keep]
                status = ["not predicted" if r else "ok" for r in reasons]
                writer.writerows(zip(*kept, *values, status, reasons))  # one row per input row, in order
                for i, r in enumerate(reasons):
                    if r and len(summary["problems"]) < 5:
                        summary["problems"].append(f"row {summary['rows'] + i + 1}: {r}")
                summary["rows"] += len(p)
                summary["predicted"] += int(p.ok.sum())
        return summary

    def _check_order(self, order: Sequence[str] | None) -> list[str]:
        if order is None:
            return self.order
        order = list(order)
        unknown = [x for x in order if x not in self.dims]
        if unknown or len(set(order)) != len(order):
            raise ValueError(f"order must list distinct modalities of the model {self.order}; got {order}")
        left_out = [x for x in self.order if x not in order]
        if left_out:  # a partial order would silently drop these modalities' encoders for every row
            raise ValueError(f"order {order} leaves out modalities {left_out} of the model; list every modality "
                             f"(the bundle's order is {','.join(self.order)})")
        return order

    def column_notes(self, columns: Sequence[str], n: int, keep: Sequence[str] = ()) -> list[str]:
        """Whole-input checks on the column names (``keep``: columns copied to the output, so not "ignored").
        Raises DataError when no column is a model input."""
        notes = []
        if n == 0:
            notes.append("input has no rows: nothing to predict")
            return notes
        inputs = set(self.schema.input_columns)
        if columns and not inputs & set(columns):  # wrong file; (no columns at all: each row says why)
            shown = list(columns)[:10]
            raise DataError(f"none of the input's columns {shown} is an input of the model; expected columns of "
                            f"{ {x: list(c) for x, c in self.schema.modalities.items()} }")
        ignored = [c for c in columns if c not in self._expected_other and c not in keep]
        if ignored:
            notes.append(f"ignored {len(ignored)} column(s) that are not model inputs: {ignored[:20]}")
        absent = [c for c in self.schema.input_columns if c not in columns]
        if absent:
            notes.append(f"input has no column(s) {absent}: treated as missing for every row")
        return notes

    def _predict_chunk(self, cols: dict[str, list], pre: Sequence[str], explain: bool, order: list[str],
                       min_modalities: int, notes: list[str]) -> Predictions:
        n = len(pre)
        table = {c: (cols[c] if c in cols else [None] * n) for c in self.schema.input_columns}
        with np.errstate(over="ignore", invalid="ignore"):  # overflowing values are reported per row below
            enc = self.encode(table, on_error="collect")
        reasons = list(pre)
        warnings = [""] * n
        for issue in enc.issues:
            text = f"column '{issue.column}': {issue.message} (value {issue.value!r})"
            if issue.fatal:
                reasons[issue.row] = f"{reasons[issue.row]}; {text}" if reasons[issue.row] else text
            else:
                warnings[issue.row] = f"{warnings[issue.row]}; {text}" if warnings[issue.row] else text
        for x in order:  # finite in the CSV but beyond float32 once standardized (e.g. 1e300): refuse the row
            bad = ~np.isfinite(enc.features[x])
            if bad.any():
                names = self.preprocessor.feature_names(x)
                for i, j in zip(*np.nonzero(bad)):
                    text = f"column '{names[j].split('=')[0]}': value too large to encode"
                    if text not in reasons[i]:
                        reasons[i] = f"{reasons[i]}; {text}" if reasons[i] else text
                enc.features[x][bad] = 0.0
        count = sum(enc.present[x].astype(np.int64) for x in order) if order else np.zeros(n, np.int64)
        for i in np.flatnonzero((count < min_modalities) & np.array([not r for r in reasons], dtype=bool)):
            reasons[i] = ("no value for any input column of the model" if count[i] == 0 else
                          f"only {count[i]} modality present; at least {min_modalities} required")
        ok = np.array([not r for r in reasons], dtype=bool) if n else np.zeros(0, dtype=bool)
        values = {t: np.full((n, len(s["classes"])) if s["kind"] == "multiclass" else n, np.nan)
                  for t, s in self.tasks.items()}
        traj = None
        if explain:
            traj = [Step(name, np.zeros(n, dtype=bool), {t: v.copy() for t, v in values.items()})
                    for name in ["prior"] + [f"+{x}" for x in order]]
        if ok.any():
            idx = None if ok.all() else np.flatnonzero(ok)
            feats = {x: (enc.features[x] if idx is None else enc.features[x][idx]) for x in order}
            pres = {x: (enc.present[x] if idx is None else enc.present[x][idx]) for x in order}
            final, steps = self.run(feats, pres, order, trajectory=explain)
            sel = slice(None) if idx is None else idx
            for t, v in final.items():
                values[t][sel] = v
            if traj is not None and steps is not None:
                for s, (_, applied, vals) in zip(traj, steps):
                    s.applied[sel] = applied
                    for t, v in vals.items():
                        s.values[t][sel] = v
        code = np.zeros(n, dtype=np.int64)  # pattern of modalities per row, as bits in ``order``
        for j, x in enumerate(order):
            code |= enc.present[x].astype(np.int64) << j
        names = {int(k): "+".join(x for j, x in enumerate(order) if k >> j & 1) for k in np.unique(code)}
        used = [names[k] if good else "" for k, good in zip(code.tolist(), ok.tolist())]
        return Predictions(self.tasks, values, ok, reasons, warnings, used, notes, traj)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Streaming a CSV allocates millions of short-lived lists (records, columns), none in a reference cycle:
    reference counting frees each chunk, and the cyclic collector's passes over them cost ~20% of the time of a
    1M-row file and free nothing (benchmarks/bench_edge_rows.py). Paused for the stream, restored after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _decoders(modules: Mapping[str, ModuleIO], tasks: Mapping[str, Mapping[str, Any]]) -> list:
    return [(t, modules[f"decoders.{t}"], s["kind"], len(s["classes"]) if s["kind"] == "multiclass" else 1)
            for t, s in tasks.items()]


def compose_portable(pre: ModuleIO, modules: Mapping[str, ModuleIO], order: Sequence[str],
                     tasks: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The portable model (``Bundle.portable_model``) from the preprocessing graph and the module graphs."""
    encs = [(x, modules[f"encoders.{x}"], 0) for x in order]
    return compose(modules["init_state"], encs, _decoders(modules, tasks), True, True, pre=pre)


# ---- the manifest's structure -------------------------------------------------------------------------

_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, required: bool = True) -> Any:
    """``d[key]`` when it has type ``kind``; else BundleError naming the key (``where``: its parent's path)."""
    path = f"{where}.{key}" if where else key
    if key not in d:
        if required:
            raise BundleError(f"manifest has no '{path}'")
        return None
    v = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise BundleError(f"manifest key '{path}' is {_TYPE_NAMES.get(type(v), type(v).__name__)}, expected {want}")
    return v


def _strings(d: Mapping[str, Any], key: str, where: str) -> list[str]:
    v = _get(d, key, list, where)
    if not all(isinstance(x, str) for x in v):
        raise BundleError(f"manifest key '{where}.{key}' must list strings, got {v!r:.200}")
    return v


def validate_manifest(m: Mapping[str, Any], path: str | Path = "") -> Preprocessor:
    """Check a parsed manifest's structure once, where it is loaded: every key the runtime reads is present and of
    its type, so nothing later raises KeyError / TypeError on a malformed (even validly signed) manifest. Returns
    the preprocessor it describes. Raises BundleError (``mmn-edge`` exit 3) naming the key."""
    try:
        return _validate_manifest(m)
    except BundleError as e:
        raise BundleError(f"{Path(path) / 'manifest.json' if path else 'manifest'}: {e}") from None


def _validate_manifest(m: Mapping[str, Any]) -> Preprocessor:
    num = (int, float)
    for name, entry in _get(m, "files", dict, "").items():
        _get(entry, "bytes", int, f"files.{name}")
    order = _strings(m, "order", "")
    _get(m, "timeseries", dict, "", required=False)
    _get(m, "provenance", dict, "", required=False)
    prep = _get(m, "preprocessing", dict, "")
    _get(prep, "schema", dict, "preprocessing")
    columns = _get(prep, "columns", dict, "preprocessing")
    _get(prep, "targets", dict, "preprocessing", required=False)
    try:
        pre = Preprocessor.from_dict(prep)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # SchemaError is a ValueError
        raise BundleError(f"manifest key 'preprocessing' does not describe a preprocessing: {e!r:.300}") from None
    for c in pre.schema.input_columns:
        where = f"preprocessing.columns.{c}"
        st = _get(columns, c, dict, "preprocessing.columns")
        kind = _get(st, "kind", str, where)
        if kind == "numeric":
            _get(st, "mean", num, where), _get(st, "std", num, where)
        elif kind == "categorical":
            _strings(st, "categories", where)
        else:
            raise BundleError(f"manifest key '{where}.kind' is {kind!r}, expected 'numeric' or 'categorical'")
    if sorted(order) != sorted(pre.schema.modalities):
        raise BundleError(f"manifest key 'order' {order} does not list the schema's modalities "
                          f"{list(pre.schema.modalities)}")
    tasks = _get(m, "tasks", dict, "")
    if set(tasks) != set(pre.schema.tasks):
        raise BundleError(f"manifest key 'tasks' {list(tasks)} does not match the schema's tasks "
                          f"{list(pre.schema.tasks)}")
    for t, spec in tasks.items():
        where = f"tasks.{t}"
        kind = _get(_get(tasks, t, dict, "tasks"), "kind", str, where)
        if kind == "multiclass":
            _strings(spec, "classes", where)
        elif kind == "regression":
            _get(spec, "mean", num, where), _get(spec, "std", num, where)
        elif kind != "binary":
            raise BundleError(f"manifest key '{where}.kind' is {kind!r}, expected binary, multiclass or regression")
    modules = _get(m, "modules", dict, "")
    shipped = [PREPROCESS] if PREPROCESS in modules else []  # bundles before portable graphs have none
    for name in ["init_state"] + [f"encoders.{x}" for x in order] + [f"decoders.{t}" for t in tasks] + shipped:
        if name not in modules:
            raise BundleError(f"manifest has no module 'modules.{name}'")
        spec = _get(modules, name, dict, "modules")
        where = f"modules.{name}"
        _get(spec, "file", str, where)
        _strings(spec, "inputs", where), _strings(spec, "outputs", where)
        if not spec["inputs"] or not spec["outputs"]:
            raise BundleError(f"manifest key '{where}' lists no inputs or no outputs")
        for k, shape in (_get(spec, "shapes", dict, where, required=False) or {}).items():
            if not isinstance(shape, list) or not shape:
                raise BundleError(f"manifest key '{where}.shapes.{k}' is {shape!r:.100}, expected a list of dimensions")
    return pre


# ---- input tables -----------------------------------------------------------------------------------

def to_columns(rows: Any) -> tuple[dict[str, list], list[str]]:
    """A list of dict rows or a dict of columns -> (columns, per-row pre-reasons ('' = fine))."""
    if isinstance(rows, _MappingABC):
        cols = {str(c): list(v) if not isinstance(v, (str, bytes)) else None for c, v in rows.items()}
        bad = [c for c, v in cols.items() if v is None]
        if bad:
            raise DataError(f"a dict of columns must map each column to a sequence of values; {bad[:5]} are strings")
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise DataError(f"columns have different lengths: {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        return cols, [""] * n  # type: ignore[return-value]
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise DataError(f"rows must be a list of dicts, a dict of columns, or a CSV path; got {type(rows).__name__}")
    rows = list(rows)
    pre = ["" if type(r) is dict or isinstance(r, _MappingABC) else
           f"row is a {type(r).__name__}, expected a mapping of column -> value" for r in rows]
    good = [r if not p else {} for r, p in zip(rows, pre)]
    names: dict[str, None] = {}
    for r in good:
        names.update(dict.fromkeys(r))
    cols = {str(c): [r.get(c) for r in good] for c in names}
    return cols, pre


def csv_records(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """Each record of a CSV file (the header first) with the line it starts on as an editor counts it (the
    header is line 1); blank lines are skipped. The one CSV reader of the runtime (static and time-series).

    A file that cannot be split into records is a DataError naming the line, before anything is predicted:
    a quote that is never closed (the csv module would otherwise read the rest of the file as one value, and
    every later row would vanish), text after a closing quote, a field longer than the csv module's limit."""
    path = _input_file(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)  # reader.line_num counts the file's lines (no Python per line)
        header: list[str] = []
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(_csv_problem(path, start, reader.line_num, header, e)) from None
            if row:
                header = header or row
                yield start, row


def _input_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    return path


def csv_blocks(path: str | Path, size: int) -> Iterator[list[list[str]]]:
    """The records of ``csv_records`` without their line numbers, in lists: the header alone first, then up to
    ``size`` records at a time (blank lines skipped), read by the csv module without a Python step per record.
    A file that is not valid CSV is read again by ``csv_records``, whose DataError names the record's line."""
    path = _input_file(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        try:
            for row in reader:
                if row:
                    yield [row]
                    break
            while True:
                block = list(itertools.islice(reader, size))
                if not block:
                    return
                yield [r for r in block if r] if not all(block) else block
        except csv.Error:
            pass
    for _ in csv_records(path):  # raises the DataError naming the line
        pass
    raise DataError(f"{path} is not valid CSV")  # unreachable when csv_records finds the same problem


def _line(path: Path, number: int) -> str:
    """Line ``number`` (1-based) of a file: read again only to word an error."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return next(itertools.islice(f, number - 1, None), "")


def _csv_problem(path: Path, start: int, end: int, header: Sequence[str], e: csv.Error) -> str:
    at = f"{path.name} line {start}"
    spans = end > start  # a quoted value went on over later lines
    text = str(e)
    if "unexpected end of data" in text:
        return (f"{at}: a quote opened on this line is never closed, so the rest of the file (to line {end}) "
                f"would be read as one value; close or remove the quote. Nothing was predicted")
    if "field larger than field limit" in text:
        limit = csv.field_size_limit()
        k = None if spans else _long_field(_line(path, end), limit)
        col = f", column {k + 1}" + (f" '{header[k].strip()}'" if k is not None and k < len(header) else "") \
            if k is not None else ""
        hint = f" (or a quote opened on line {start} is never closed)" if spans else ""
        return f"{at}{col}: a value is longer than {limit} characters{hint}; this is not a row of patient data. " \
               "Nothing was predicted"
    where = at if not spans else f"{path.name} lines {start}-{end}"
    return f"{where}: not valid CSV ({text}); quote a value that holds a quote, a comma or a line break, " \
           "doubling its quotes. Nothing was predicted"


def _long_field(line: str, limit: int) -> int | None:
    """Index of the first field of one line longer than ``limit`` characters (for the message only)."""
    k, length, quoted = 0, 0, False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            k, length = k + 1, 0
        else:
            length += 1
            if length > limit:
                return k
    return None


def check_output(output: str | Path, *inputs: str | Path | None) -> Path:
    """Refuse, before any work, an output that is one of the input files, a directory, or in no folder."""
    out = Path(output)
    if out.is_dir():
        raise DataError(f"output {out} is a directory; name a CSV file (e.g. {out / 'predictions.csv'})")
    for i in inputs:
        if i is None:
            continue
        same = out.resolve() == Path(i).resolve()
        if not same and out.exists() and Path(i).exists():
            same = os.path.samefile(out, i)
        if same:
            raise DataError(f"output {out} is the input file {i}: writing it would overwrite the input; "
                            "choose another output file")
    if not out.parent.is_dir():
        raise DataError(f"the folder of output {out} does not exist: {out.parent}")
    return out


@contextmanager
def atomic_output(output: str | Path) -> Iterator[TextIO]:
    """A text file that becomes ``output`` only when the block completes: written to a temporary file beside it
    and renamed into place; on any error the temporary file is removed and ``output`` is left as it was."""
    out = Path(output)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            yield f
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_csv_chunks(path: str | Path, chunk_size: int = DEFAULT_CHUNK,
                    notes_for=None) -> Iterator[tuple[dict[str, list], list[str], list[str]]]:
    """Stream a CSV in chunks of (columns, per-row pre-reasons, whole-input notes). Blank lines are skipped.
    A row with more or fewer fields than the header is not predicted (its reason says so); a file that is not
    valid CSV is a DataError naming the line (``csv_records``)."""
    path = Path(path)
    blocks = csv_blocks(path, chunk_size)
    first_record = next(blocks, None)
    if first_record is None:
        raise DataError(f"input CSV {path} is empty: expected a header row naming the model's input columns")
    header = [h.strip() for h in first_record[0]]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"input CSV {path} has duplicate column(s) {dup}")
    width = len(header)
    first = True
    notes: list[str] = []

    def problem(r: list[str]) -> str:
        if len(r) > width:
            return f"row has {len(r)} fields but the header has {width}"
        if len(r) < width:  # cut short: predicting from the columns it has would hide the ones it lost
            lost = header[len(r):]
            shown = ", ".join(lost[:30]) + (f" and {len(lost) - 30} more" if len(lost) > 30 else "")
            return f"row has {len(r)} fields but the header has {width}: no field for column(s) {shown}"
        return ""

    def emit(block: list[list[str]]):
        if block and min(map(len, block)) == max(map(len, block)) == width:  # all rows whole: transpose in C
            return dict(zip(header, map(TextColumn, zip(*block)))), [""] * len(block)
        pre = [problem(r) for r in block]
        cols = {h: [r[j] if j < len(r) else None for r in block] for j, h in enumerate(header)}
        return cols, pre

    for block in blocks:
        if not block:  # blank lines only
            continue
        cols, pre = emit(block)
        if first:
            notes = notes_for(header, len(block)) if notes_for else []
            first = False
        yield cols, pre, notes
    if first:
        cols, pre = emit([])
        yield cols, pre, notes_for(header, 0) if notes_for else []


def load_bundle(path: str | Path, trust_key: Any = None, allow_unsigned: bool = False) -> Bundle:
    """Verify a bundle (signature against ``trust_key``, then every file's hash) and load it.
    Raises UntrustedBundleError before any ONNX session exists if anything does not verify."""
    return Bundle(verify_bundle(path, trust_key, allow_unsigned))


__all__ = ["Bundle", "Predictions", "Step", "csv_records", "load_bundle", "read_csv_chunks", "read_manifest", "session_options", "validate_manifest"]
