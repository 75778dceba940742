"""Scenario files (TOML): data, sites, missingness rules, test conditions, runs and a sweep.

Loaded once and validated at the boundary: every error is a ``ScenarioError`` whose message starts with
the dotted key at fault (``missingness.0.fraction: ...``). See docs/simulations.md for every key.
"""
from __future__ import annotations

import copy
import itertools
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from edge_runtime.schema import Schema, SchemaError
from mmn_fed.settings import SETTINGS, RunSettings, SettingsError

from .missingness import MECHANISMS, PHASES, TIME_MECHANISMS, MissingnessRule
from .sites import SitePlan

MODELS = ("multimodn", "pfusion")
TRAINING = ("federated", "centralized", "local")
CONDITIONS = ("clean", "scenario", "mnar_flipped")
ENGINES = ("inprocess", "ray")

_TOP = {"scenario", "data", "sites", "missingness", "test", "run", "sweep"}
_DATA = {"builtin", "csv", "schema", "tasks", "modalities"}
_SITES = {"by", "iid", "dirichlet", "seed"}
_RULE = {"modality", "mechanism", "fraction", "task", "label", "column", "direction", "values", "sites", "phase",
         "every"}
_TEST = {"conditions", "fraction", "holdout_sites", "time_bins"}
# [run] keys of the scenario itself; every other [run] key is a run setting by its snake_case name
# (mmn_fed.settings, docs/settings.md), except those the scenario sets elsewhere (_SET_ELSEWHERE).
_RUN_ONLY = {"models", "training", "seeds", "rounds", "epochs", "patience", "engine", "ray_address", "workers",
             "explain"}
_SET_ELSEWHERE = {"model": "run.models", "seed": "run.seeds", "num_server_rounds": "run.rounds", "dataset": "[data]",
                  "schema": "[data]", "tasks": "[data]", "data_dir": "the runner", "run_dir": "the runner",
                  "min_nodes": "the engine", "node_wait": "the engine"}
_RUN_SETTINGS = {s.field for s in SETTINGS} - set(_SET_ELSEWHERE)
_RUN = _RUN_ONLY | _RUN_SETTINGS
# scenarios train two local epochs per round unless they say otherwise (the shipped experiments' choice)
SCENARIO_SETTINGS = RunSettings(local_epochs=2)


class ScenarioError(ValueError):
    """A scenario file or value is invalid; the message starts with the key at fault."""


@dataclass(frozen=True)
class DataSpec:
    builtin: str | None = None
    csv: str | None = None
    schema: str | None = None
    tasks: tuple[str, ...] | None = None
    modalities: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TestSpec:
    conditions: tuple[str, ...] = ("clean",)
    fraction: float = 0.25  # held-out test share of every training site (stratified by the first task)
    holdout_sites: tuple[str, ...] = ()  # deployment sites: all their rows are test rows, none trains
    # time series: bin edges of the time since a subject's first observation for the per-time metrics (the
    # schema's time unit); empty = quintiles of the data's steps (simulations.timeseries.time_edges)
    time_bins: tuple[float, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """[run]: which runs (models x training x seeds, on which engine) and the run settings they share."""

    models: tuple[str, ...] = MODELS
    training: tuple[str, ...] = ("federated", "centralized")
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 150  # centralized / local: maximum epochs (early stopping on a validation split)
    patience: int = 20
    engine: str = "inprocess"
    ray_address: str = ""  # engine "ray" on an existing Ray cluster: its head's HOST:PORT ("": a Ray of its own)
    workers: int = 0  # 0 = one per CPU core
    explain: bool = True  # IMC / CP tables and heatmaps for MultiModN runs
    settings: RunSettings = SCENARIO_SETTINGS  # rounds = settings.num_server_rounds
    # missingness per model ({"pfusion": "off"}): models not named take settings.missingness
    missingness: Mapping[str, str] = field(default_factory=dict)

    def missingness_for(self, model: str) -> str:
        return self.missingness.get(model, self.settings.missingness)

    def settings_for(self, model: str, seed: int) -> RunSettings:
        """The run settings of one job: this model and seed, missingness resolved for the model."""
        return replace(self.settings, model=model, seed=seed, missingness=self.missingness_for(model))


@dataclass
class Scenario:
    name: str
    description: str
    data: DataSpec
    schema: Schema
    sites: SitePlan
    rules: tuple[MissingnessRule, ...]
    test: TestSpec
    run: RunSpec
    sweep: dict[str, list[Any]]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    base_dir: Path = field(default=Path("."), repr=False)

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> "Scenario":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"scenario file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ScenarioError(f"{path}: not valid TOML: {e}") from None
        raw.setdefault("scenario", {}).setdefault("name", path.stem)
        return cls.from_dict(raw, base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base_dir: str | Path = ".") -> "Scenario":
        raw = copy.deepcopy(dict(raw))
        base_dir = Path(base_dir)
        _keys(raw, _TOP, "")
        meta = _table(raw, "scenario")
        _keys(meta, {"name", "description"}, "scenario")
        data = _data(_table(raw, "data", required=True), base_dir)
        schema = _load_schema(data, base_dir)
        sites = _sites(_table(raw, "sites", required=True), schema)
        rules_raw = raw.get("missingness", [])
        if not isinstance(rules_raw, list):
            raise ScenarioError("missingness: expected an array of tables ([[missingness]])")
        rules = tuple(_rule(r, i, schema) for i, r in enumerate(rules_raw))
        test = _test(_table(raw, "test"))
        run = _run(_table(raw, "run"))
        if "mnar_flipped" in test.conditions and not any(r.outcome_dependent for r in rules):
            raise ScenarioError("test.conditions: 'mnar_flipped' needs at least one label-dependent rule in "
                                "[[missingness]] (mnar, or fewer_visits / dropout with a task)")
        if test.time_bins and schema.timeseries is None:
            raise ScenarioError("test.time_bins: only for time-series data (a schema with [timeseries])")
        sweep = _table(raw, "sweep")
        scenario = cls(str(meta.get("name", "scenario")), str(meta.get("description", "")), data, schema, sites, rules,
                       test, run, {}, raw, base_dir)
        scenario.sweep = _check_sweep(sweep, raw, base_dir)
        return scenario

    # ---- sweep ------------------------------------------------------------------------------
    def points(self) -> list[tuple[dict[str, Any], "Scenario"]]:
        """The grid over the sweep: (values by dotted key, the scenario at that point). One point if no sweep."""
        if not self.sweep:
            return [({}, self)]
        keys = list(self.sweep)
        out = []
        for combo in itertools.product(*(self.sweep[k] for k in keys)):
            values = dict(zip(keys, combo))
            out.append((values, _at_point(self.raw, values, self.base_dir)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw)


# ---- shipped scenarios ------------------------------------------------------------------------

def shipped_dir() -> Path:
    return Path(str(resources.files("simulations") / "scenarios"))


def shipped() -> dict[str, Path]:
    """Shipped scenario name -> file."""
    return {p.stem: p for p in sorted(shipped_dir().glob("*.toml"))}


def resolve(name_or_path: str | Path) -> Path:
    """A path to a scenario file, or the name of a shipped one (``exp4-mnar``)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"scenario file not found: {p}")
        return p
    ships = shipped()
    if str(name_or_path) in ships:
        return ships[str(name_or_path)]
    raise ScenarioError(f"unknown scenario '{name_or_path}': not a file, and not a shipped scenario "
                        f"({', '.join(ships)})")


def load(name_or_path: str | Path) -> Scenario:
    return Scenario.from_toml(resolve(name_or_path))


# ---- validation helpers -----------------------------------------------------------------------

def _keys(table: Mapping, allowed: set[str], where: str) -> None:
    for k in table:
        if k not in allowed:
            key = f"{where}.{k}" if where else k
            raise ScenarioError(f"{key}: unknown key; expected one of {sorted(allowed)}")


def _table(raw: Mapping, key: str, required: bool = False) -> dict:
    if key not in raw:
        if required:
            raise ScenarioError(f"{key}: missing table [{key}]")
        return {}
    v = raw[key]
    if not isinstance(v, Mapping):
        raise ScenarioError(f"{key}: expected a table, got {type(v).__name__}")
    return dict(v)


def _str_list(v: Any, key: str, choices: tuple[str, ...] | None = None, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or (not v and not allow_empty):
        raise ScenarioError(f"{key}: expected a {'' if allow_empty else 'non-empty '}list of strings, got {v!r}")
    if choices is not None:
        for x in v:
            if x not in choices:
                raise ScenarioError(f"{key}: unknown value {x!r}; expected one of {list(choices)}")
    if len(set(v)) != len(v):
        raise ScenarioError(f"{key}: duplicate values in {v!r}")
    return tuple(v)


def _number(v: Any, key: str, lo: float | None = None, hi: float | None = None, integer: bool = False) -> float:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ScenarioError(f"{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ScenarioError(f"{key}: expected a value in {rng}, got {v!r}")
    return v


def _data(t: dict, base_dir: Path) -> DataSpec:
    _keys(t, _DATA, "data")
    if ("builtin" in t) == ("csv" in t):
        raise ScenarioError("data: give exactly one of builtin = \"heart\" | \"support2\", or csv = \"PATH\" with schema")
    if "builtin" in t:
        from mmn_fed.data import BUILTIN

        if t["builtin"] not in BUILTIN:
            raise ScenarioError(f"data.builtin: unknown built-in dataset {t['builtin']!r}; expected one of {list(BUILTIN)}")
    elif "schema" not in t:
        raise ScenarioError("data.schema: a csv needs a schema TOML (data.schema = \"schema.toml\")")
    tasks = _str_list(t["tasks"], "data.tasks") if "tasks" in t else None
    mods = _str_list(t["modalities"], "data.modalities") if "modalities" in t else None
    return DataSpec(t.get("builtin"), t.get("csv"), t.get("schema"), tasks, mods)


def _load_schema(data: DataSpec, base_dir: Path) -> Schema:
    try:
        if data.builtin:
            from mmn_fed.data import builtin_path

            schema = Schema.from_toml(Path(data.schema if data.schema else builtin_path(data.builtin) / "schema.toml"))
        else:
            schema = Schema.from_toml(base_dir / data.schema)
    except FileNotFoundError as e:
        raise ScenarioError(f"data.schema: {e}") from None
    except SchemaError as e:
        raise ScenarioError(f"data.schema: {e}") from None
    try:
        return schema.subset(modalities=list(data.modalities) if data.modalities else None,
                             tasks=list(data.tasks) if data.tasks else None)
    except SchemaError as e:
        raise ScenarioError(f"data.{'tasks' if 'task' in str(e) else 'modalities'}: {e}") from None


def _sites(t: dict, schema: Schema) -> SitePlan:
    _keys(t, _SITES, "sites")
    given = [k for k in ("by", "iid", "dirichlet") if k in t]
    if len(given) != 1:
        raise ScenarioError("sites: give exactly one of by = \"COLUMN\", iid = N, dirichlet = { n, alpha, task }"
                            + (f" (got {given})" if given else ""))
    seed = int(_number(t.get("seed", 0), "sites.seed", 0, integer=True))
    if "by" in t:
        if not isinstance(t["by"], str) or not t["by"]:
            raise ScenarioError(f"sites.by: expected a column name, got {t['by']!r}")
        return SitePlan(by=t["by"], seed=seed)
    if "iid" in t:
        return SitePlan(iid=int(_number(t["iid"], "sites.iid", 1, integer=True)), seed=seed)
    d = t["dirichlet"]
    if not isinstance(d, Mapping):
        raise ScenarioError("sites.dirichlet: expected a table { n = 5, alpha = 0.5, task = \"...\" }")
    _keys(d, {"n", "alpha", "task"}, "sites.dirichlet")
    for k in ("n", "alpha", "task"):
        if k not in d:
            raise ScenarioError(f"sites.dirichlet.{k}: required")
    n = int(_number(d["n"], "sites.dirichlet.n", 1, integer=True))
    alpha = float(_number(d["alpha"], "sites.dirichlet.alpha", 1e-6))
    if d["task"] not in schema.tasks or schema.tasks[d["task"]].kind == "regression":
        raise ScenarioError(f"sites.dirichlet.task: {d['task']!r} is not a classification task of the schema "
                            f"({[t for t, v in schema.tasks.items() if v.kind != 'regression']})")
    return SitePlan(n=n, alpha=alpha, task=d["task"], seed=seed)


def _rule(r: Any, i: int, schema: Schema) -> MissingnessRule:
    where = f"missingness.{i}"
    if not isinstance(r, Mapping):
        raise ScenarioError(f"{where}: expected a table")
    _keys(r, _RULE, where)
    if "mechanism" not in r:
        raise ScenarioError(f"{where}.mechanism: required")
    mech = r["mechanism"]
    if mech not in MECHANISMS:
        raise ScenarioError(f"{where}.mechanism: unknown mechanism {mech!r}; expected one of {list(MECHANISMS)}")
    if mech in TIME_MECHANISMS:
        return _time_rule(r, where, schema)
    if "modality" not in r:
        raise ScenarioError(f"{where}.modality: required")
    m = r["modality"]
    if m not in schema.modalities:
        raise ScenarioError(f"{where}.modality: unknown modality {m!r}; schema has {list(schema.modalities)}")
    if "every" in r:
        raise ScenarioError(f"{where}.every: does not apply to mechanism {mech!r} (only to sampling)")
    fraction = float(_number(r.get("fraction", 1.0), f"{where}.fraction", 0.0, 1.0))
    if mech == "absent" and fraction != 1.0:
        raise ScenarioError(f"{where}.fraction: an absent modality is missing for every row; drop fraction")
    if mech != "absent" and "fraction" not in r:
        raise ScenarioError(f"{where}.fraction: required for mechanism {mech!r}")
    task = label = column = None
    values: tuple = ()
    direction = r.get("direction", "high")
    relevant = {"mnar": {"task", "label"}, "mar": {"column", "direction", "values"},
                "self_masking": {"column", "direction", "values"}}.get(mech, set())
    for k in ("task", "label", "column", "direction", "values"):
        if k in r and k not in relevant:
            raise ScenarioError(f"{where}.{k}: does not apply to mechanism {mech!r}")
    if mech == "mnar":
        for k in ("task", "label"):
            if k not in r:
                raise ScenarioError(f"{where}.{k}: required for mnar (missingness depends on this task's label)")
        task, label = _task_label(r, where, schema)
    elif mech in ("mar", "self_masking"):
        if "column" not in r:
            raise ScenarioError(f"{where}.column: required for {mech} (the column that drives missingness)")
        column = r["column"]
        try:
            owner = schema.modality_of(column)
        except KeyError:
            raise ScenarioError(f"{where}.column: {column!r} is not an input column of the schema") from None
        if mech == "mar" and owner == m:
            raise ScenarioError(f"{where}.column: mar depends on an observed column of another modality; {column!r} "
                                f"belongs to {m!r} itself (use mechanism = \"self_masking\")")
        if mech == "self_masking" and owner != m:
            raise ScenarioError(f"{where}.column: self_masking depends on the modality's own values; {column!r} "
                                f"belongs to {owner!r}, not {m!r}")
        if direction not in ("high", "low"):
            raise ScenarioError(f"{where}.direction: expected 'high' or 'low', got {direction!r}")
        if "values" in r:
            if not isinstance(r["values"], list) or not r["values"]:
                raise ScenarioError(f"{where}.values: expected a non-empty list of categories")
            values = tuple(r["values"])
    sites, phase = _where(r, where)
    return MissingnessRule(m, mech, fraction, task, label, column, direction, values, sites, phase)


def _where(r: Mapping, where: str) -> tuple[tuple[str, ...] | None, str]:
    sites = _str_list(r["sites"], f"{where}.sites") if "sites" in r else None
    phase = r.get("phase", "both")
    if phase not in PHASES:
        raise ScenarioError(f"{where}.phase: expected one of {list(PHASES)}, got {phase!r}")
    return sites, phase


def _task_label(r: Mapping, where: str, schema: Schema) -> tuple[str, Any]:
    """A rule's (task, label): a classification task of the schema and one of its labels."""
    task, label = r["task"], r["label"]
    if task not in schema.tasks or schema.tasks[task].kind == "regression":
        raise ScenarioError(f"{where}.task: {task!r} is not a classification task of the schema "
                            f"({[t for t, v in schema.tasks.items() if v.kind != 'regression']})")
    kind = schema.tasks[task].kind
    if kind == "binary" and (isinstance(label, bool) or label not in (0, 1)):
        raise ScenarioError(f"{where}.label: task {task!r} is binary: expected 0 or 1, got {label!r}")
    classes = schema.tasks[task].classes
    if kind == "multiclass" and classes and str(label) not in [str(c) for c in classes]:
        raise ScenarioError(f"{where}.label: {label!r} is not a class of {task!r} ({list(classes)})")
    return task, label


def _time_rule(r: Mapping, where: str, schema: Schema) -> MissingnessRule:
    """fewer_visits / dropout (optionally outcome-dependent) / sampling: whole visits of a time series."""
    mech = r["mechanism"]
    if schema.timeseries is None:
        raise ScenarioError(f"{where}.mechanism: {mech!r} removes visits of a time series; this schema has no "
                            "[timeseries] section (use a modality mechanism)")
    allowed = {"sampling": {"every"}}.get(mech, {"fraction", "task", "label"})
    for k in ("modality", "column", "direction", "values", "fraction", "task", "label", "every"):
        if k in r and k not in allowed:
            raise ScenarioError(f"{where}.{k}: does not apply to mechanism {mech!r}")
    task = label = every = None
    fraction = 1.0
    if mech == "sampling":
        if "every" not in r:
            raise ScenarioError(f"{where}.every: required for sampling (one visit kept per this many time units)")
        every = float(_number(r["every"], f"{where}.every", 1e-9))
    else:
        if "fraction" not in r:
            raise ScenarioError(f"{where}.fraction: required for mechanism {mech!r}")
        fraction = float(_number(r["fraction"], f"{where}.fraction", 0.0, 1.0))
        if ("task" in r) != ("label" in r):
            raise ScenarioError(f"{where}.{'label' if 'task' in r else 'task'}: give task and label together (the "
                                "subjects whose outcome is this label), or neither (every subject)")
        if "task" in r:
            task, label = _task_label(r, where, schema)
    sites, phase = _where(r, where)
    return MissingnessRule(None, mech, fraction, task, label, sites=sites, phase=phase, every=every)


def _test(t: dict) -> TestSpec:
    _keys(t, _TEST, "test")
    conditions = _str_list(t.get("conditions", ["clean"]), "test.conditions", CONDITIONS)
    fraction = float(_number(t.get("fraction", 0.25), "test.fraction", 0.05, 0.9))
    holdout = _str_list(t.get("holdout_sites", []), "test.holdout_sites", allow_empty=True)
    bins = t.get("time_bins", [])
    if (not isinstance(bins, list) or len(bins) == 1
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bins)
            or any(b >= c for b, c in zip(bins, bins[1:]))):
        raise ScenarioError(f"test.time_bins: expected increasing numbers (at least two edges), got {bins!r}")
    return TestSpec(conditions, fraction, holdout, tuple(float(b) for b in bins))


def _run(t: dict) -> RunSpec:
    for k in t:
        if k in _SET_ELSEWHERE:
            raise ScenarioError(f"run.{k}: set by {_SET_ELSEWHERE[k]} in a scenario, not in [run]")
    _keys(t, _RUN, "run")
    d = RunSpec()
    seeds = t.get("seeds", list(d.seeds))
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(int(_number(seeds, "run.seeds", 1, integer=True))))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ScenarioError(f"run.seeds: expected a list of integers or a count, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ScenarioError(f"run.seeds: duplicate seeds in {seeds!r}")
    engine = t.get("engine", d.engine)
    if engine not in ENGINES:
        raise ScenarioError(f"run.engine: expected one of {list(ENGINES)}, got {engine!r}")
    ray_address = t.get("ray_address", d.ray_address)
    if not isinstance(ray_address, str):
        raise ScenarioError(f"run.ray_address: expected a string HOST:PORT, got {ray_address!r}")
    if ray_address and engine != "ray":
        raise ScenarioError(f"run.ray_address: for run.engine = \"ray\", not {engine!r}")
    explain = t.get("explain", d.explain)
    if not isinstance(explain, bool):
        raise ScenarioError(f"run.explain: expected true or false, got {explain!r}")
    per_model: dict[str, str] = {}
    values = {k: v for k, v in t.items() if k in _RUN_SETTINGS}
    if isinstance(t.get("missingness"), Mapping):  # a table: one mode per model
        per_model = dict(values.pop("missingness"))
        for m, mode in per_model.items():
            if m not in MODELS:
                raise ScenarioError(f"run.missingness: unknown model {m!r}; expected one of {list(MODELS)}")
            try:
                replace(d.settings, missingness=mode)
            except SettingsError as e:
                raise ScenarioError(f"run.missingness.{m}: {e.reason}") from None
    if "rounds" in t:
        values["num_server_rounds"] = t["rounds"]
    try:
        settings = replace(d.settings, **values)
    except SettingsError as e:
        key = "rounds" if e.setting == "num-server-rounds" else e.setting.replace("-", "_")
        raise ScenarioError(f"run.{key}: {e.reason}") from None
    return RunSpec(
        models=_str_list(t.get("models", list(d.models)), "run.models", MODELS),
        training=_str_list(t.get("training", list(d.training)), "run.training", TRAINING),
        seeds=tuple(seeds),
        epochs=int(_number(t.get("epochs", d.epochs), "run.epochs", 1, integer=True)),
        patience=int(_number(t.get("patience", d.patience), "run.patience", 1, integer=True)),
        engine=engine,
        ray_address=ray_address,
        workers=int(_number(t.get("workers", d.workers), "run.workers", 0, integer=True)),
        explain=explain,
        settings=settings,
        missingness=per_model,
    )


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][0][c] = value`` for key 'a.b.0.c'; the parent must exist."""
    parts = key.split(".")
    node: Any = raw
    for depth, p in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ScenarioError(f"sweep.\"{key}\": '{where}' is not an entry of the scenario "
                                    f"(it has {len(node)} entries)")
            node = node[int(p)]
        elif isinstance(node, dict):
            if p not in node:
                if depth == 0 and p in _TOP:
                    node[p] = {}
                else:
                    raise ScenarioError(f"sweep.\"{key}\": '{where}' is not in the scenario")
            node = node[p]
        else:
            raise ScenarioError(f"sweep.\"{key}\": '{where}' is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ScenarioError(f"sweep.\"{key}\": index {last!r} is out of range")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ScenarioError(f"sweep.\"{key}\": parent is a value, not a table")


def _at_point(raw: Mapping, values: Mapping[str, Any], base_dir: Path) -> Scenario:
    point = copy.deepcopy(dict(raw))
    point.pop("sweep", None)
    for k, v in values.items():
        _set_dotted(point, k, v)
    return Scenario.from_dict(point, base_dir)


def _check_sweep(sweep: Mapping, raw: Mapping, base_dir: Path) -> dict[str, list[Any]]:
    out = {}
    for key, values in sweep.items():
        if key.startswith("sweep"):
            raise ScenarioError(f"sweep.\"{key}\": cannot sweep the sweep")
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"sweep.\"{key}\": expected a non-empty list of values, got {values!r}")
        for v in values:  # every value must give a valid scenario; errors name the swept key
            try:
                _at_point(raw, {key: v}, base_dir)
            except ScenarioError as e:
                msg = str(e)
                raise ScenarioError(msg if msg.startswith("sweep.") else f"sweep.\"{key}\" = {v!r}: {msg}") from None
        out[key] = list(values)
    return out
