"""Streaming a patient's state at the clinic (docs/timeseries.md, "At the edge").

A time-series bundle (exported from a model trained with ``mmn_fed.sequences``) carries its ``[timeseries]``
schema. The clinic device keeps, per patient, one small ``PatientState``: the model's state vector (a few dozen
float32 numbers), how many steps it has seen and the time of the last one, bound to the bundle's model id.

    stream = Stream(load_bundle("bundle/"))
    state = stream.start({"age": 52, "sex": "f", "trt": 1})          # static data: encoded once
    state = stream.update(state, {"bili": 1.4, "albumin": 3.2}, time=182)   # one new time step
    stream.predict(state)                                             # {"death_or_transplant_2y": 0.12}
    saved = state.to_json()                                           # store it; PatientState.from_json later

When the model is updated, a stored state means nothing to the new one (``update``/``predict`` refuse a state of
another model id): rebuild it with ``stream.replay(static, observations)`` from the patient's observations,
which the clinic system keeps. The update of one step runs one ONNX Runtime session (the step's encoders and
every decoder composed into one graph, cached per pattern of modalities); it does not recompute the history.
"""
from __future__ import annotations

import base64
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError, session_options
from .preprocessing import DataError
from .schema import SchemaError
from .compose import FLOAT, INT64, STATE_INPUT, STATE_OUTPUT, WireError, compose, model_bytes, output_name, value_info

STATE_FORMAT, STATE_VERSION = "mmn-fed-state", 1


class StateError(ValueError):
    """A stored state that cannot be used with this bundle (another model, another format or version)."""


@dataclass(frozen=True)
class PatientState:
    """One patient's memory: the model's state after ``steps`` time steps (the last at ``last_time``)."""

    model_id: str
    state: np.ndarray  # float32 (state_size,)
    steps: int = 0
    last_time: float | None = None

    def to_json(self) -> str:
        """A small versioned JSON value (the state as base64 float32: exact, ~45 bytes per 8 numbers)."""
        return json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION, "model_id": self.model_id,
                           "state": base64.b64encode(self.state.astype("<f4").tobytes()).decode(),
                           "steps": self.steps, "last_time": self.last_time}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "PatientState":
        try:
            d = json.loads(text)
            if d.get("format") != STATE_FORMAT:
                raise StateError(f"not an mmn-fed patient state (format {d.get('format')!r})")
            if d.get("version") != STATE_VERSION:
                raise StateError(f"patient state version {d.get('version')!r}; this runtime reads version "
                                 f"{STATE_VERSION}: rebuild the state with Stream.replay")
            state = np.frombuffer(base64.b64decode(d["state"]), dtype="<f4").astype(np.float32)
            return cls(str(d["model_id"]), state, int(d["steps"]), d.get("last_time"))
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, StateError):
                raise
            raise StateError(f"unreadable patient state: {e}") from None


class Stream:
    """Start, update and read patient states with a time-series bundle."""

    def __init__(self, bundle: Bundle):
        ts = bundle.manifest.get("timeseries")
        if not ts:
            raise BundleError(f"{bundle.path} is not a time-series model (its manifest has no [timeseries] schema)")
        self.bundle = bundle
        self.model_id = str(bundle.manifest.get("model_id"))
        self.dynamic = tuple(ts["timeseries"]["modalities"])
        self.static = tuple(m for m in bundle.order if m not in self.dynamic)
        self.time_column = ts["timeseries"]["time"]
        self.state_size = int(bundle.manifest["state_size"])
        self._init = None
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._options = session_options()

    # ---- the graphs ---------------------------------------------------------------------------------
    def _session(self, steps: tuple[str, ...]):
        sess = self._sessions.get(steps)
        if sess is None:
            b = self.bundle
            encs = [(x, b._modules[f"encoders.{x}"], b.dims[x]) for x in steps]
            decs = [(t, b._modules[f"decoders.{t}"], s["kind"], len(s["classes"]) if s["kind"] == "multiclass" else 1)
                    for t, s in b.tasks.items()]
            try:
                sess = ort.InferenceSession(compose(None, encs, decs, False, False, self.state_size), self._options,
                                            providers=["CPUExecutionProvider"])
            except (WireError, RuntimeError, ValueError) as e:
                raise BundleError(f"the modules of {b.path} do not compose for modalities {list(steps)}: {e}") from None
            self._sessions[steps] = sess
        return sess

    def _initial(self) -> np.ndarray:
        if self._init is None:
            io = self.bundle._modules["init_state"]  # the initial state's module alone, run once
            sess = ort.InferenceSession(_single(io, self.state_size), self._options, providers=["CPUExecutionProvider"])
            self._init = sess.run(None, {io.inputs[0]: np.array([1], dtype=np.int64)})[0][0].astype(np.float32)
        return self._init

    def _run(self, state: np.ndarray, features: Mapping[str, np.ndarray], steps: tuple[str, ...]):
        sess = self._session(steps)
        feed = {STATE_INPUT: state.reshape(1, -1).astype(np.float32)}
        for x in steps:
            feed[self.bundle._modules[f"encoders.{x}"].inputs[1]] = np.asarray(features[x], dtype=np.float32)
        names = [STATE_OUTPUT] + [output_name(t) for t in self.bundle.tasks]
        outs = sess.run(names, feed)
        preds = {t: self.bundle._finish(t, o)[0] for t, o in zip(self.bundle.tasks, outs[1:])}
        return outs[0][0].astype(np.float32), preds

    def _encode(self, row: Mapping[str, Any], allowed: Sequence[str]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
        """One row's features, using only the columns of the ``allowed`` modalities (others are ignored)."""
        schema = self.bundle.schema
        cols = {c: [row.get(c)] for m in allowed for c in schema.modalities[m]}
        enc = self.bundle.preprocessor.encode({**{c: [None] for c in schema.input_columns}, **cols}, on_error="raise")
        present = tuple(m for m in self.bundle.order if m in allowed and bool(enc.present[m][0]))
        return enc.features, present

    def _check(self, state: PatientState) -> None:
        if not isinstance(state, PatientState):
            raise StateError(f"expected a PatientState, got {type(state).__name__}")
        if state.model_id != self.model_id:
            raise StateError(f"this patient state belongs to model {state.model_id}, not to this bundle's model "
                             f"{self.model_id}: rebuild it with Stream.replay(static, observations)")
        if state.state.shape != (self.state_size,):
            raise StateError(f"patient state of size {state.state.shape}, the model's is {self.state_size}")

    # ---- the API ------------------------------------------------------------------------------------
    def start(self, static: Mapping[str, Any] | None = None) -> PatientState:
        """A new patient's state: the initial state, updated with the static modalities ``static`` holds."""
        state = self._initial()
        feats, present = self._encode(dict(static or {}), self.static)
        if present:
            state, _ = self._run(state, feats, present)
        return PatientState(self.model_id, state, 0, None)

    def update(self, state: PatientState, observation: Mapping[str, Any], time: float | None = None) -> PatientState:
        """The state after one more time step holding ``observation`` (the step's values of the time-series
        modalities; other columns are ignored). ``time`` (or the observation's time column) must not go back."""
        self._check(state)
        if time is None and observation.get(self.time_column) is not None:
            time = float(observation[self.time_column])
        if time is not None and state.last_time is not None and time < state.last_time:
            raise StateError(f"time {time:g} is before this patient's last step ({state.last_time:g}): steps must come "
                             "in time order (replay the history to insert a late observation)")
        feats, present = self._encode(observation, self.dynamic)
        new = state.state
        if present:
            new, _ = self._run(state.state, feats, present)
        return PatientState(self.model_id, new, state.steps + 1, state.last_time if time is None else float(time))

    def predict(self, state: PatientState) -> dict[str, Any]:
        """Each task's prediction from a state (binary p(1), multiclass probabilities, regression value)."""
        self._check(state)
        _, preds = self._run(state.state, {}, ())
        return preds

    def replay(self, static: Mapping[str, Any] | None, observations: Iterable[Mapping[str, Any]],
               ) -> tuple[PatientState, list[dict[str, Any]]]:
        """Rebuild a state from the patient's static data and observations (in time order): (state, the
        trajectory: per step its time, the modalities it held and each task's prediction after it)."""
        state = self.start(static)
        trajectory = []
        for obs in observations:
            state = self.update(state, obs)
            _, present = self._encode(obs, self.dynamic)
            trajectory.append({"step": state.steps, "time": state.last_time, "modalities": list(present),
                               **{t: _plain(v) for t, v in self.predict(state).items()}})
        return state, trajectory


# ---- a visit table at the clinic: one output row per (id, step), every input row accounted for ----------

def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip() == "")


def predict_table(stream: Stream, input: str | Path, output: str | Path, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Score a visit table (one row per subject and time, the training table's columns) with a time-series
    bundle: per subject, in time order, the state is started from its first step and updated step by step; one
    output row per (id, step) with each task's prediction as of that step, ``rows`` (the input's data rows in the
    step), ``status`` (ok / error) and ``reason``. Rows without a usable id or time, and steps holding a bad value
    (reported with their data rows; the state skips them), are output with status error: no input row is lost.
    The whole table is read into memory (a clinic export, not a warehouse)."""
    ts = stream.bundle.manifest["timeseries"]["timeseries"]
    if ts.get("variable"):
        raise BundleError("this bundle reads long tables (id, time, variable, value): the edge reads visit tables "
                          "only for now (docs/timeseries.md)")
    id_col, time_col = ts["id"], ts["time"]
    width = None if ts.get("step", "visit") == "visit" else float(ts["step"])
    with open(input, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    for c in (id_col, time_col):
        if c not in header:
            raise SchemaError(f"{input}: no column '{c}' ([timeseries] {'id' if c == id_col else 'time'}); it has "
                              f"{header[:30]}")
    missing = [c for c in keep if c not in header]
    if missing:
        raise SchemaError(f"--keep column(s) {missing} not in {input}")
    tasks = list(stream.bundle.tasks)
    out_rows: list[dict[str, Any]] = []
    problems: list[str] = []
    subjects: dict[str, list[tuple[float, int]]] = {}
    for r, row in enumerate(rows, start=1):
        t = _number(row.get(time_col))
        if _blank(row.get(id_col)) or t is None:
            what = f"column '{id_col}' is blank" if _blank(row.get(id_col)) else \
                f"column '{time_col}' is not a number (value {row.get(time_col)!r})"
            out_rows.append({"id": row.get(id_col, ""), "time": row.get(time_col, ""), "rows": str(r), "status": "error",
                             "reason": f"data row {r}: {what}", **{k: row.get(k, "") for k in keep}})
            problems.append(out_rows[-1]["reason"])
            continue
        subjects.setdefault(row[id_col], []).append((t if width is None else math.floor(t / width) * width, r))
    predicted = 0
    for sid, obs in subjects.items():
        obs.sort(key=lambda o: o[0])  # stable: rows of one time keep their file order
        steps: list[tuple[float, list[int]]] = []
        for t, r in obs:
            if steps and steps[-1][0] == t:
                steps[-1][1].append(r)
            else:
                steps.append((t, [r]))
        state = None
        for t, members in steps:
            merged = _combine_rows([rows[r - 1] for r in members], ts.get("combine", "last"))
            base = {"id": sid, "time": f"{t:g}", "rows": " ".join(map(str, members)),
                    **{k: rows[members[-1] - 1].get(k, "") for k in keep}}
            try:
                if state is None:
                    state = stream.start(merged)
                state = stream.update(state, merged, time=t)
            except (DataError, StateError) as e:
                out_rows.append({**base, "status": "error", "reason": f"data row(s) {base['rows']}: {e}"})
                problems.append(out_rows[-1]["reason"])
                continue
            preds = stream.predict(state)
            out_rows.append({**base, **{task: _fmt(preds[task]) for task in tasks}, "status": "ok", "reason": ""})
            predicted += 1
    columns = list(keep) + ["id", "time", "rows"] + tasks + ["status", "reason"]
    tmp = Path(str(output) + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in out_rows:
            w.writerow({c: row.get(c, "") for c in columns})
    tmp.replace(output)
    return {"rows": len(rows), "steps": len(out_rows), "predicted": predicted, "subjects": len(subjects),
            "problems": problems[:5], "errors": len(problems)}


def _combine_rows(members: Sequence[Mapping[str, Any]], how: str) -> dict[str, Any]:
    """One step from its rows: per column the last non-blank value (``last``), or the mean / min / max of the
    numeric ones (as mmn_fed.sequences combines a step)."""
    out: dict[str, Any] = {}
    for row in members:
        for c, v in row.items():
            if not _blank(v):
                out.setdefault(c, []).append(v)
    merged = {}
    for c, vs in out.items():
        nums = [_number(v) for v in vs]
        if how != "last" and all(n is not None for n in nums):
            merged[c] = {"mean": lambda x: sum(x) / len(x), "min": min, "max": max}[how](nums)
        else:
            merged[c] = vs[-1]
    return merged


def _fmt(v: Any) -> str:
    a = np.asarray(v, dtype=float)
    return f"{float(a):.6g}" if a.ndim == 0 else " ".join(f"{x:.6g}" for x in a)


def _plain(v: Any) -> Any:
    a = np.asarray(v)
    return float(a) if a.ndim == 0 else [float(x) for x in a]


def _single(io, state_size: int) -> bytes:
    """The initial-state module alone, as a model."""
    g = io.graph
    return model_bytes(g.ir_version, g.opsets, "mmn_init", list(g.nodes), list(g.initializers),
                       [value_info(io.inputs[0], INT64, [1])], [value_info(io.outputs[0], FLOAT, ["batch", state_size])],
                       list(g.value_infos), list(g.functions))
