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

from .bundle import Bundle, BundleError, atomic_output, check_output, csv_records, session_options
from .preprocessing import DataError
from .schema import ELAPSED, Schema, SchemaError, canonical_category
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
        self.timeseries = Schema.from_dict(ts).timeseries
        self.dynamic = self.timeseries.step_modalities
        self.static = tuple(m for m in bundle.order if m not in self.dynamic)
        self.time_column = self.timeseries.time
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
        enc = self.bundle.encode({**{c: [None] for c in schema.input_columns}, **cols}, on_error="raise")
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
        modalities; other columns are ignored). ``time`` (or the observation's time column) must not go back.
        With ``[timeseries] elapsed = true`` the time is required: the step's ``elapsed`` input is the time since
        the state's last step (``TimeSeries.elapsed_since``, as the step table derives it; missing at the first
        step), and it replaces any ``elapsed`` value the observation holds."""
        self._check(state)
        if time is None and observation.get(self.time_column) is not None:
            time = float(observation[self.time_column])
        if time is not None and state.last_time is not None and time < state.last_time:
            raise StateError(f"time {time:g} is before this patient's last step ({state.last_time:g}): steps must come "
                             "in time order (replay the history to insert a late observation)")
        if self.timeseries.elapsed:
            if time is None:
                raise StateError(f"this model takes the time since the previous step as an input ([timeseries] elapsed "
                                 f"= true): pass time= or the observation's '{self.time_column}'")
            ts = self.timeseries
            previous = None if state.last_time is None else ts.step_time(state.last_time)
            observation = {**observation, ELAPSED: float(ts.elapsed_since(previous, ts.step_time(time)))}
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


def _read_csv(path: str | Path) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    """(header, rows, each row's line as an editor shows it: the header is line 1). Rows as csv.DictReader makes
    them (a short row's absent columns None, a long row's extra fields a list under None); a file that is not
    valid CSV (an unclosed quote, a huge field) is a DataError naming the line (``bundle.csv_records``)."""
    records = csv_records(path)
    first = next(records, None)
    header = list(first[1]) if first else []
    rows, lines = [], []
    for line, fields in records:
        row: dict[Any, Any] = dict(zip(header, fields))
        for c in header[len(fields):]:
            row[c] = None
        if len(fields) > len(header):
            row[None] = fields[len(header):]
        rows.append(row)
        lines.append(line)
    return header, rows, lines


class _Where:
    """Tells a file's data rows as the user counts them: ``line L of FILE (data row R)``."""

    def __init__(self, path: str | Path, lines: Sequence[int]):
        self.name, self.lines = Path(path).name, lines

    def __call__(self, r: int, column: str | None = None) -> str:
        at = f"line {self.lines[r - 1]} of {self.name} (data row {r})"
        return f"{at}, column '{column}'" if column else at

    def rows(self, members: Sequence[int]) -> str:
        return f"{self.name} data row(s) {' '.join(map(str, members))}"


def _width_problem(row: Mapping[Any, Any], header: Sequence[str]) -> str | None:
    """What is wrong with a row of more or fewer fields than the header (``_read_csv`` marks them), else None."""
    extra = row.get(None)
    if extra:
        return f"has {len(header) + len(extra)} fields but the header has {len(header)}"
    lost = [c for c in header if row.get(c) is None]
    if lost:  # cut short: scoring the fields it has would hide the ones it lost
        return (f"has {len(header) - len(lost)} fields but the header has {len(header)}: no field for column(s) "
                f"{', '.join(lost[:30])}")
    return None


def _id_time_problem(row: Mapping[str, Any], id_col: str, time_col: str) -> tuple[str, str] | None:
    """(column, what is wrong) when a row has no usable subject id or time."""
    if _blank(row.get(id_col)):
        return id_col, "is blank"
    if _number(row.get(time_col)) is None:
        return time_col, f"is not a number (value {row.get(time_col)!r})"
    return None


def predict_table(stream: Stream, input: str | Path, output: str | Path, keep: Sequence[str] = (),
                  subjects: str | Path | None = None) -> dict[str, Any]:
    """Score a time-series table with a time-series bundle: a visit table (one row per subject and time, the
    training table's columns), or a long table (id, time, variable, value) with its ``subjects`` table (one row
    per id: the static inputs). Per subject, in time order, the state is started from its first step and updated
    step by step; one output row per (id, step) with each task's prediction as of that step, ``rows`` (the
    input's data rows in the step), ``status`` (ok / error / skipped) and ``reason``. Rows without a usable id or
    time, and steps holding a bad value (reported with their data rows; the state skips them), are output with
    status error: no input row is lost. A long table's rows become visit rows first (``_long_to_visit_rows``,
    which accounts for the rows it cannot use), so both tables are scored by the same code.
    The whole table is read into memory (a clinic export, not a warehouse)."""
    ts = stream.timeseries
    id_col, time_col = ts.id, ts.time
    output = check_output(output, input, subjects)
    header, rows, lines = _read_csv(input)
    where = _Where(input, lines)
    for c in (id_col, time_col) + ((ts.variable, ts.value) if ts.variable else ()):
        if c not in header:
            key = {id_col: "id", time_col: "time", ts.variable: "variable", ts.value: "value"}[c]
            raise SchemaError(f"{input}: no column '{c}' ([timeseries] {key}); it has {header[:30]}")
    out_rows: list[dict[str, Any]] = []
    problems: list[str] = []

    def report(row: dict[str, Any]) -> None:
        out_rows.append(row)
        if row["status"] == "error":
            problems.append(row["reason"])

    if ts.variable:
        if subjects is None and stream.static:
            raise SchemaError(f"this bundle reads a long table ({ts.id}, {ts.time}, {ts.variable}, {ts.value}) whose "
                              f"static inputs ({', '.join(stream.static)}) come from a subject table with one row per "
                              f"id: pass it with --subjects FILE")
        records, subject_of, n_subject_rows = _long_to_visit_rows(stream, rows, where, subjects, keep, header, report)
    else:
        if subjects is not None:
            raise SchemaError("--subjects goes with a long table (a schema with [timeseries] variable and value); "
                              "this bundle reads a visit table, whose rows hold the static inputs")
        missing = [c for c in keep if c not in header]
        if missing:
            raise SchemaError(f"--keep column(s) {missing} not in {input}")
        records, subject_of, n_subject_rows = list(enumerate(rows, start=1)), None, 0
    tasks = list(stream.bundle.tasks)
    by_subject: dict[str, list[tuple[float, float, int, dict]]] = {}
    for r, row in records:
        width = _width_problem(row, header) if not ts.variable else None  # a long table's rows: checked before
        if width is not None:
            report({"id": row.get(id_col) or "", "time": row.get(time_col) or "", "rows": str(r), "status": "error",
                    "reason": f"{where(r)} {width}", **{k: row.get(k) or "" for k in keep}})
            continue
        problem = _id_time_problem(row, id_col, time_col)
        if problem is not None:
            report({"id": row.get(id_col, ""), "time": row.get(time_col, ""), "rows": str(r), "status": "error",
                    "reason": f"{where(r, problem[0])} {problem[1]}", **{k: row.get(k, "") for k in keep}})
            continue
        t = _number(row[time_col])
        by_subject.setdefault(row[id_col], []).append((float(ts.step_time(t)), t, r, row))
    predicted = 0
    for sid, obs in by_subject.items():
        obs.sort(key=lambda o: o[0])  # stable: rows of one step keep their file order
        steps: list[tuple[float, float, list[int], list[dict]]] = []  # (step time, first time, rows, visit rows)
        for start, t, r, row in obs:
            if steps and steps[-1][0] == start:
                steps[-1][2].append(r)
                steps[-1][3].append(row)
            else:
                steps.append((start, t, [r], [row]))
        state = None
        for start, t, members, visit_rows in steps:
            merged = _combine_rows(visit_rows, ts.combine)
            base = {"id": sid, "time": f"{start:g}", "rows": " ".join(map(str, members)),
                    **({"subject_row": subject_of.get(sid, "")} if subject_of is not None else {}),
                    **{k: visit_rows[-1].get(k, "") for k in keep}}
            try:
                if state is None:
                    state = stream.start(merged)
                state = stream.update(state, merged, time=t)  # a time of the step: update takes its step time
            except DataError as e:
                report({**base, "status": "error", "reason": str(e.relocated(lambda _: where.rows(members)))})
                continue
            except StateError as e:
                report({**base, "status": "error", "reason": f"{where.rows(members)}: {e}"})
                continue
            preds = stream.predict(state)
            out_rows.append({**base, **{task: _fmt(preds[task]) for task in tasks}, "status": "ok", "reason": ""})
            predicted += 1
    columns = list(keep) + ["id", "time", "rows"] + (["subject_row"] if subject_of is not None else []) + tasks \
        + ["status", "reason"]
    with atomic_output(output) as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in out_rows:
            w.writerow({c: row.get(c, "") for c in columns})
    return {"verified": stream.bundle.signed_by is not None, "rows": len(rows), "subject_rows": n_subject_rows, "steps": len(out_rows), "predicted": predicted,
            "subjects": len(by_subject), "problems": problems[:5], "errors": len(problems)}


def _long_to_visit_rows(stream: Stream, rows: list[dict[str, str]], where: _Where, subjects: str | Path | None,
                        keep: Sequence[str], header: Sequence[str], report) -> tuple[list, dict[str, str], int]:
    """A long table's rows as visit rows, as ``mmn_fed.sequences.long_to_visits`` makes them for training: each
    observation becomes a row holding its one variable (the step's rows are combined later), with its subject's
    static inputs from the subject table. Returns ([(data row, visit row)], subject id -> its subject-table data
    row, the subject table's row count). Every row of both files that does not become a visit row is reported
    (``report``): a variable of no time-series modality (skipped), an id the subject table does not have, a numeric
    variable's value that is not a number (errors); in the subject table: a blank id (error), an id repeated (the
    last row is used, the others skipped), a subject without any observation (skipped). Blank ids and times of
    the long table are reported by the visit-table code."""
    from .preprocessing import parse_numeric

    ts = stream.timeseries
    schema, prep = stream.bundle.schema, stream.bundle.preprocessor
    variables = {c for m in ts.modalities for c in schema.modalities[m]}
    static_cols = [c for m in stream.static for c in schema.modalities[m]]
    subject_rows: dict[str, tuple[int, dict[str, str]]] = {}
    n_subject_rows = 0
    sub_header: list[str] = []
    swhere = None
    if subjects is not None:
        sub_header, srows, slines = _read_csv(subjects)
        swhere = _Where(subjects, slines)
        n_subject_rows = len(srows)
        if ts.id not in sub_header:
            raise SchemaError(f"{subjects}: no column '{ts.id}' ([timeseries] id); the subject table has one row per "
                              f"id; it has {sub_header[:30]}")
        for r, row in enumerate(srows, start=1):
            sid = row.get(ts.id)  # matched by value, as training's tables are: "7" and "7.0" are one subject
            if _blank(sid):
                report({"id": "", "time": "", "rows": "", "subject_row": str(r), "status": "error",
                        "reason": f"{swhere(r, ts.id)} is blank"})
                continue
            sid = canonical_category(sid)
            if sid in subject_rows:  # as training: the last row of an id is used
                old = subject_rows[sid][0]
                report({"id": sid, "time": "", "rows": "", "subject_row": str(old), "status": "skipped",
                        "reason": f"{swhere(old, ts.id)}: id {sid!r} again at data row {r}, whose row is used"})
            subject_rows[sid] = (r, row)
    missing = [c for c in keep if c not in header and c not in sub_header]
    if missing:
        raise SchemaError(f"--keep column(s) {missing} in neither the long table nor the subject table")
    records, unknown_variable, unknown_id = [], {}, {}
    for r, row in enumerate(rows, start=1):
        width = _width_problem(row, header)
        if width is not None:
            report({"id": row.get(ts.id) or "", "time": row.get(ts.time) or "", "rows": str(r), "status": "error",
                    "reason": f"{where(r)} {width}", **{k: row.get(k) or "" for k in keep}})
            continue
        if _id_time_problem(row, ts.id, ts.time) is not None:
            records.append((r, row))  # reported with the visit rows' checks
            continue
        var, value, sid = row.get(ts.variable) or "", row.get(ts.value), canonical_category(row[ts.id])
        if var not in variables:
            unknown_variable.setdefault(var, []).append(r)
            continue
        if subjects is not None and sid not in subject_rows:
            unknown_id.setdefault(sid, []).append(r)
            continue
        if prep.columns[var]["kind"] == "numeric":
            _, bad = parse_numeric([value], var, schema.missing_codes.get(var, ()))
            if bad:
                report({"id": sid, "time": row.get(ts.time, ""), "rows": str(r),
                        "subject_row": str(subject_rows[sid][0]) if sid in subject_rows else "", "status": "error",
                        "reason": f"{where(r, ts.value)}: variable '{var}' is numeric; {bad[0].message} "
                                  f"(value {value!r})", **{k: row.get(k, "") for k in keep}})
                continue
        static = subject_rows[sid][1] if sid in subject_rows else {}
        visit = {**{k: static.get(k, row.get(k, "")) for k in keep}, **{c: static.get(c) for c in static_cols},
                 ts.id: sid, ts.time: row[ts.time], var: value}
        records.append((r, visit))
    for var, rs in unknown_variable.items():
        report({"id": "", "time": "", "rows": " ".join(map(str, rs)), "status": "skipped",
                "reason": f"{where.rows(rs)}, column '{ts.variable}': variable '{var}' is in no time-series modality "
                          "of the schema"})
    for sid, rs in unknown_id.items():
        report({"id": sid, "time": "", "rows": " ".join(map(str, rs)), "status": "error",
                "reason": f"{where.rows(rs)}, column '{ts.id}': subject id {sid!r} is not in "
                          f"{Path(subjects).name} (the subject table)"})
    observed = {v[ts.id] for _, v in records if _id_time_problem(v, ts.id, ts.time) is None}
    for sid, (r, _) in subject_rows.items():
        if sid not in observed:
            report({"id": sid, "time": "", "rows": "", "subject_row": str(r), "status": "skipped",
                    "reason": f"{swhere(r)}: subject {sid!r} has no usable observation in {where.name}"})
    return records, {sid: str(r) for sid, (r, _) in subject_rows.items()}, n_subject_rows


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
