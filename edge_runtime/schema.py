"""The schema: which columns form which modality, and which columns are tasks.

Torch-free on purpose: the schema travels inside every model file and every edge bundle,
and the edge runtime must read it without torch or pandas.
"""
from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

TASK_KINDS = ("binary", "multiclass", "regression")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SchemaError(ValueError):
    """The schema file (or dict) is malformed, or does not fit the data it is applied to."""


@dataclass(frozen=True)
class Task:
    """One prediction target. ``column`` holds the raw label; the label is derived by kind.

    binary: label = value > threshold, or value in ``positive``, or the boolean ``expression``
    (a pandas expression over the row's columns, evaluated at training time only).
    multiclass: the distinct values of ``column`` (or ``classes`` if given) are the classes.
    regression: the numeric value, standardized for training and restored at prediction.
    """

    name: str
    column: str
    kind: str
    threshold: float | None = None
    positive: tuple[str, ...] | None = None
    expression: str | None = None
    classes: tuple[str, ...] | None = None
    weight: float = 1.0
    # per-step ("continuous") tasks of a time-series schema (docs/timeseries.md):
    event_time: str | None = None  # binary: the event happens within ``horizon`` after the step (column = status)
    horizon: float | None = None
    ahead: int | None = None  # regression: the value of ``column`` that many steps later

    @property
    def per_step(self) -> bool:
        """A target per time step (derived from the step's time), not one label per subject."""
        return self.event_time is not None or self.ahead is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"column": self.column, "kind": self.kind, "weight": self.weight}
        if self.event_time is not None:
            d["event_time"], d["horizon"] = self.event_time, self.horizon
        if self.ahead is not None:
            d["ahead"] = self.ahead
        if self.threshold is not None:
            d["threshold"] = self.threshold
        if self.positive is not None:
            d["positive"] = list(self.positive)
        if self.expression is not None:
            d["expression"] = self.expression
        if self.classes is not None:
            d["classes"] = list(self.classes)
        return d


COMBINE = ("last", "mean", "min", "max")
ELAPSED = "elapsed"  # ``[timeseries] elapsed = true``: the derived modality and column (time since the previous step)


@dataclass(frozen=True)
class TimeSeries:
    """The ``[timeseries]`` section: the table has one row per (subject ``id``, ``time``) observation, as a
    visit table (pbcseq) or a long table pivoted to one; ``modalities`` are encoded at every step, the
    others once per subject (static). ``step``: "visit" (each distinct time is a step) or a fixed width in
    time units; ``combine``: how several rows in one step combine; ``max_steps``: keep each subject's last
    that many steps (0 = all). See docs/timeseries.md."""

    id: str
    time: str
    modalities: tuple[str, ...]
    step: str | float = "visit"
    combine: str = "last"
    max_steps: int = 0
    variable: str | None = None  # a long table (id, time, variable, value): the columns naming the variable
    value: str | None = None  # and holding its value; None = a visit table (one column per variable)
    split: str = "subject"  # validation / test subjects: "subject" (random) or "time" (the latest first steps)
    elapsed: bool = False  # encode, at every step, the time since the subject's previous step (``ELAPSED``)

    @property
    def step_modalities(self) -> tuple[str, ...]:
        """The modalities encoded at every step: the derived ``elapsed`` first (when on), then ``modalities``."""
        return ((ELAPSED,) if self.elapsed else ()) + self.modalities

    def step_time(self, time: Any) -> Any:
        """The step a time belongs to (a number or an array): the time itself for ``step = "visit"``, else the
        start of its fixed-width step. The one definition used by the step table and the edge alike."""
        if self.step == "visit":
            return time
        width = float(self.step)
        return np.floor(np.asarray(time, dtype=float) / width) * width

    @staticmethod
    def elapsed_since(previous: Any, step_time: Any) -> Any:
        """The ``elapsed`` input: ``step_time`` minus the subject's previous step time (both from ``step_time``;
        numbers or arrays). None or NaN as ``previous`` (the subject's first step) gives NaN, a missing value: the
        encoder is skipped there, as for any missing modality, and no invented 0 enters the fitted mean."""
        prev = np.asarray(np.nan if previous is None else previous, dtype=float)
        return np.asarray(step_time, dtype=float) - prev

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "time": self.time, "modalities": list(self.modalities), "step": self.step,
             "combine": self.combine, "max_steps": self.max_steps}
        if self.variable is not None:
            d["variable"], d["value"] = self.variable, self.value
        if self.split != "subject":
            d["split"] = self.split
        if self.elapsed:  # absent when off: default schemas (and so model ids) are unchanged
            d["elapsed"] = True
        return d

    @classmethod
    def from_dict(cls, raw: Any, modalities: Mapping[str, tuple[str, ...]]) -> "TimeSeries":
        if not isinstance(raw, Mapping):
            raise SchemaError("[timeseries] must be a table with id, time and modalities")
        extra = set(raw) - {"id", "time", "modalities", "step", "combine", "max_steps", "variable", "value", "split",
                             "elapsed"}
        if extra:
            raise SchemaError(f"[timeseries] has unknown key(s) {sorted(extra)}; expected id, time, modalities, step, "
                              "combine, max_steps, variable, value, split, elapsed")
        elapsed = raw.get("elapsed", False)
        if not isinstance(elapsed, bool):
            raise SchemaError(f"[timeseries] elapsed must be true (encode the time since the previous step) or false, "
                              f"got {elapsed!r}")
        if raw.get("split", "subject") not in ("subject", "time"):
            raise SchemaError(f"[timeseries] split must be \"subject\" (random subjects) or \"time\" (the latest "
                              f"subjects: one stream cut in time), got {raw.get('split')!r}")
        if (raw.get("variable") is None) != (raw.get("value") is None):
            raise SchemaError("[timeseries] a long table needs both variable = \"<column naming the variable>\" and "
                              "value = \"<column holding its value>\"")
        for k in ("id", "time"):
            if not isinstance(raw.get(k), str) or not raw.get(k):
                raise SchemaError(f"[timeseries] needs {k} = \"<column>\" (the subject id and the observation time)")
        mods = raw.get("modalities")
        if isinstance(mods, str) or not isinstance(mods, (list, tuple)) or not mods:
            raise SchemaError("[timeseries] modalities must list the modalities observed at every step, e.g. "
                              "modalities = [\"labs\"]")
        for m in mods:
            if m not in modalities:
                raise SchemaError(f"[timeseries] modalities names '{m}', which is not in [modalities] ({list(modalities)})")
        step = raw.get("step", "visit")
        if step != "visit" and not (isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0):
            raise SchemaError(f"[timeseries] step must be \"visit\" or a positive width in time units, got {step!r}")
        combine = raw.get("combine", "last")
        if combine not in COMBINE:
            raise SchemaError(f"[timeseries] combine must be one of {COMBINE}, got {combine!r}")
        max_steps = raw.get("max_steps", 0)
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0:
            raise SchemaError(f"[timeseries] max_steps must be an integer >= 0 (0 = all steps), got {max_steps!r}")
        inputs = {c for cols in modalities.values() for c in cols}
        if elapsed and (ELAPSED in modalities or ELAPSED in inputs or ELAPSED in (raw["id"], raw["time"])):
            raise SchemaError(f"[timeseries] elapsed = true derives a modality and column named '{ELAPSED}': rename the "
                              f"schema's own '{ELAPSED}'")
        for k in ("id", "time"):
            if raw[k] in inputs:
                raise SchemaError(f"[timeseries] {k} column '{raw[k]}' is also a modality input")
        return cls(raw["id"], raw["time"], tuple(mods), step if step == "visit" else float(step), combine, max_steps,
                   raw.get("variable"), raw.get("value"), raw.get("split", "subject"), elapsed)


@dataclass(frozen=True)
class Schema:
    """Modalities (name -> columns, in encoding order) and tasks (name -> Task)."""

    modalities: dict[str, tuple[str, ...]]
    tasks: dict[str, Task]
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    missing_codes: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    site_column: str | None = None
    source: str = field(default="", compare=False)  # the TOML file it was read from, for messages
    timeseries: TimeSeries | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Schema":
        """Validate a parsed TOML/JSON schema and build it. Raises SchemaError naming the problem."""
        if not isinstance(raw, Mapping):
            raise SchemaError("schema must be a table with [modalities] and [tasks.<name>]")
        unknown = set(raw) - {"modalities", "tasks", "columns", "sites", "timeseries"}
        if unknown:
            raise SchemaError(f"unknown schema section(s) {sorted(unknown)}; expected modalities, tasks, columns, sites, "
                              "timeseries")
        mods_raw = _ordered_table(raw.get("modalities"), "columns")
        if not isinstance(mods_raw, Mapping) or not mods_raw:
            raise SchemaError("schema needs a non-empty [modalities] table: name = [columns...]")
        modalities: dict[str, tuple[str, ...]] = {}
        seen: dict[str, str] = {}
        for name, cols in mods_raw.items():
            _check_name(name, "modality")
            if isinstance(cols, str) or not isinstance(cols, (list, tuple)):
                raise SchemaError(f"modality '{name}' must list its columns, e.g. {name} = [\"a\", \"b\"]")
            if not cols:
                raise SchemaError(f"modality '{name}' is empty: list at least one column")
            for c in cols:
                if not isinstance(c, str) or not c:
                    raise SchemaError(f"modality '{name}' has a column name that is not a string: {c!r}")
                if c in seen:
                    raise SchemaError(f"column '{c}' is in modality '{seen[c]}' and in '{name}'; a column belongs to one modality")
                seen[c] = name
            modalities[name] = tuple(cols)
        timeseries = None if raw.get("timeseries") is None else TimeSeries.from_dict(raw["timeseries"], modalities)

        tasks_raw = _ordered_table(raw.get("tasks"), None)
        if not isinstance(tasks_raw, Mapping) or not tasks_raw:
            raise SchemaError("schema needs at least one task: [tasks.<name>] with column and kind")
        tasks: dict[str, Task] = {}
        for name, t in tasks_raw.items():
            _check_name(name, "task")
            if not isinstance(t, Mapping):
                raise SchemaError(f"task '{name}' must be a table with column and kind")
            extra = set(t) - {"column", "kind", "threshold", "positive", "expression", "classes", "weight",
                              "event_time", "horizon", "ahead"}
            if extra:
                raise SchemaError(f"task '{name}' has unknown key(s) {sorted(extra)}")
            kind = t.get("kind")
            if kind not in TASK_KINDS:
                raise SchemaError(f"task '{name}': kind must be one of {TASK_KINDS}, got {kind!r}")
            column = t.get("column")
            if not isinstance(column, str) or not column:
                raise SchemaError(f"task '{name}' needs column = \"<label column>\"")
            if column in seen and t.get("ahead") is None:  # a value later of an input is a fine target
                raise SchemaError(f"task '{name}' uses column '{column}', which is also an input of modality '{seen[column]}'")
            threshold, positive, expression = t.get("threshold"), t.get("positive"), t.get("expression")
            if kind == "binary":
                given = [k for k in ("threshold", "positive", "expression") if t.get(k) is not None]
                if len(given) > 1:
                    raise SchemaError(f"binary task '{name}': give one of threshold, positive, expression (got {given})")
                if positive is not None and (isinstance(positive, str) or not isinstance(positive, (list, tuple))):
                    raise SchemaError(f"binary task '{name}': positive must be a list of values")
                if threshold is not None and not isinstance(threshold, (int, float)):
                    raise SchemaError(f"binary task '{name}': threshold must be a number")
            elif any(t.get(k) is not None for k in ("threshold", "positive")):
                raise SchemaError(f"task '{name}': threshold/positive only apply to binary tasks")
            classes = t.get("classes")
            if classes is not None and kind != "multiclass":
                raise SchemaError(f"task '{name}': classes only apply to multiclass tasks")
            weight = float(t.get("weight", 1.0))
            if not weight > 0:
                raise SchemaError(f"task '{name}': weight must be > 0")
            event_time, horizon, ahead = _per_step(name, t, kind, timeseries)
            tasks[name] = Task(
                name=name, column=column, kind=kind,
                threshold=None if threshold is None else float(threshold),
                positive=None if positive is None else tuple(canonical_category(p) for p in positive),
                expression=expression,
                classes=None if classes is None else tuple(canonical_category(c) for c in classes),
                weight=weight, event_time=event_time, horizon=horizon, ahead=ahead,
            )

        cols_raw = raw.get("columns", {}) or {}
        if not isinstance(cols_raw, Mapping):
            raise SchemaError("[columns] must be a table")
        extra = set(cols_raw) - {"categorical", "numeric", "missing_codes"}
        if extra:
            raise SchemaError(f"[columns] has unknown key(s) {sorted(extra)}; expected categorical, numeric, missing_codes")
        categorical = tuple(cols_raw.get("categorical", []))
        numeric = tuple(cols_raw.get("numeric", []))
        for c in categorical + numeric:
            if c not in seen:
                raise SchemaError(f"[columns] names '{c}', which is in no modality")
        both = set(categorical) & set(numeric)
        if both:
            raise SchemaError(f"column(s) {sorted(both)} declared both categorical and numeric")
        mc_raw = cols_raw.get("missing_codes", {}) or {}
        missing_codes: dict[str, tuple[Any, ...]] = {}
        for c, codes in mc_raw.items():
            if c not in seen:
                raise SchemaError(f"missing_codes names '{c}', which is in no modality")
            if not isinstance(codes, (list, tuple)):
                codes = [codes]
            missing_codes[c] = tuple(codes)
        sites = raw.get("sites", {}) or {}
        site_column = sites.get("column") if isinstance(sites, Mapping) else None
        if timeseries is not None:
            for k in (timeseries.id, timeseries.time):
                if k in {t.column for t in tasks.values()}:
                    raise SchemaError(f"[timeseries] column '{k}' is also a task's label column")
            if timeseries.elapsed and ELAPSED in {c for t in tasks.values() for c in (t.column, t.event_time)}:
                raise SchemaError(f"[timeseries] elapsed = true derives a column named '{ELAPSED}', which a task reads")
        return cls(modalities, tasks, categorical, numeric, missing_codes, site_column, timeseries=timeseries)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Schema":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SchemaError(f"schema file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise SchemaError(f"schema file {path} is not valid TOML: {e}") from None
        return replace(cls.from_dict(raw), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON form. Modalities and tasks are lists (not tables) so their order, which is the encoder
        order and the task order, survives any JSON canonicalization that sorts keys."""
        d: dict[str, Any] = {
            "modalities": [{"name": m, "columns": list(c)} for m, c in self.modalities.items()],
            "tasks": [{"name": t.name, **t.to_dict()} for t in self.tasks.values()],
            "columns": {
                "categorical": list(self.categorical),
                "numeric": list(self.numeric),
                "missing_codes": {c: list(v) for c, v in self.missing_codes.items()},
            },
        }
        if self.site_column:
            d["sites"] = {"column": self.site_column}
        if self.timeseries is not None:
            d["timeseries"] = self.timeseries.to_dict()
        return d

    # ---- queries ------------------------------------------------------------------------
    @property
    def input_columns(self) -> list[str]:
        return [c for cols in self.modalities.values() for c in cols]

    def modality_of(self, column: str) -> str:
        for m, cols in self.modalities.items():
            if column in cols:
                return m
        raise KeyError(column)

    def subset(self, modalities: list[str] | None = None, tasks: list[str] | None = None) -> "Schema":
        """A schema restricted to some modalities and/or tasks (order kept as given)."""
        mods = list(self.modalities) if modalities is None else list(modalities)
        tks = list(self.tasks) if tasks is None else list(tasks)
        for m in mods:
            if m not in self.modalities:
                raise SchemaError(f"unknown modality '{m}'; schema has {list(self.modalities)}")
        for t in tks:
            if t not in self.tasks:
                raise SchemaError(f"unknown task '{t}'; schema has {list(self.tasks)}")
        keep = {c for m in mods for c in self.modalities[m]}
        ts = self.timeseries
        if ts is not None:
            ts = replace(ts, modalities=tuple(m for m in ts.modalities if m in mods))
        return Schema(
            {m: self.modalities[m] for m in mods},
            {t: self.tasks[t] for t in tks},
            tuple(c for c in self.categorical if c in keep),
            tuple(c for c in self.numeric if c in keep),
            {c: v for c, v in self.missing_codes.items() if c in keep},
            self.site_column,
            self.source,
            ts,
        )


def _per_step(name: str, t: Mapping[str, Any], kind: str, ts: TimeSeries | None):
    """(event_time, horizon, ahead) of a task: a per-step target needs [timeseries]."""
    event_time, horizon, ahead = t.get("event_time"), t.get("horizon"), t.get("ahead")
    if event_time is None and horizon is None and ahead is None:
        return None, None, None
    if ts is None:
        raise SchemaError(f"task '{name}': event_time/horizon/ahead are per-step targets and need a [timeseries] section")
    if ahead is not None:
        if event_time is not None or horizon is not None:
            raise SchemaError(f"task '{name}': give ahead (a value later) or event_time + horizon (an event within), "
                              "not both")
        if kind != "regression":
            raise SchemaError(f"task '{name}': ahead applies to regression tasks (kind = \"regression\")")
        if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 1:
            raise SchemaError(f"task '{name}': ahead must be a whole number of steps >= 1, got {ahead!r}")
        return None, None, ahead
    if kind != "binary":
        raise SchemaError(f"task '{name}': event_time + horizon define a binary task (kind = \"binary\")")
    if not isinstance(event_time, str) or not event_time:
        raise SchemaError(f"task '{name}': event_time must name the column of the event (or censoring) time")
    if not isinstance(horizon, (int, float)) or isinstance(horizon, bool) or not horizon > 0:
        raise SchemaError(f"task '{name}': horizon must be a positive time (in the time column's units), got {horizon!r}")
    if t.get("positive") is None and t.get("threshold") is None:
        raise SchemaError(f"task '{name}': say which values of '{t.get('column')}' are the event, e.g. positive = [1, 2] "
                          "(the others are censoring)")
    return event_time, float(horizon), None


def _ordered_table(raw: Any, value_key: str | None) -> Any:
    """Accept a TOML table {name: value} or the ordered JSON list form [{"name": n, ...}] of to_dict()."""
    if not isinstance(raw, list) or not all(isinstance(i, Mapping) and "name" in i for i in raw):
        return raw
    out: dict[str, Any] = {}
    for item in raw:
        out[item["name"]] = item[value_key] if value_key else {k: v for k, v in item.items() if k != "name"}
    return out


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SchemaError(f"{what} name {name!r} must be an identifier (letters, digits, underscore)")


def canonical_category(value: Any) -> str:
    """One spelling per category whatever the reader: True/'True' -> 'True'; 1, 1.0, '1.0' -> '1'."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "True" if value else "False"
    s = str(value).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    if math.isfinite(f) and f == int(f):
        return str(int(f))
    return s
