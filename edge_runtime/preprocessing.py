"""Raw rows -> per-modality feature arrays and presence masks. The one implementation.

Training (mmn_fed), federation (per-site summaries) and the edge runtime all use this module,
so a clinic feeding rows in the training CSV's format gets exactly the training features.

Semantics (documented in docs/schema.md):
- A value is missing when it is None, NaN, an empty string, one of NA/N/A/NaN/null/none/?
  (any case), or one of the column's ``missing_codes``.
- Numeric columns are standardized with the (federated) mean and standard deviation.
  Categorical columns are one-hot encoded over the categories seen in fitting (sorted).
- A modality is *missing* for a row when all of its columns are missing: its encoder is skipped.
  When only some are missing, the modality is present; a missing numeric column is filled with
  the mean (0 after standardization) and a missing categorical column is all zeros.
- An unknown category (never seen in fitting) counts as missing for that column and is reported
  as a non-fatal issue. A non-numeric or non-finite value in a numeric column is fatal for its row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .schema import Schema, SchemaError, canonical_category

MISSING_STRINGS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


class DataError(ValueError):
    """Input data does not fit the schema. ``issues`` lists every offending (row, column, value).

    A message that shows some issues is a template holding ``{issues}`` (the first ``shown`` of them), so that
    ``relocated`` can say the same with each row told as the user counts it (a file's line, see mmn_fed.data)."""

    def __init__(self, message: str, issues: list["RowIssue"] | None = None, shown: int = 3):
        self.template = message
        self.issues = list(issues or [])
        self.shown = shown
        super().__init__(message.replace("{issues}", "; ".join(str(i) for i in self.issues[:shown])))

    def relocated(self, where) -> "DataError":
        """The same error with each issue's row told by ``where(row) -> str`` (issues told already are kept)."""
        issues = [i if i.where else replace(i, where=where(i.row)) for i in self.issues]
        return DataError(self.template, issues, self.shown)


@dataclass(frozen=True)
class RowIssue:
    """``row`` is the 0-based position in the table given; ``where`` how the user counts it, once known."""

    row: int
    column: str
    value: Any
    message: str
    fatal: bool
    where: str = ""

    def __str__(self) -> str:
        return f"{self.where or f'data row {self.row + 1}'}, column '{self.column}': {self.message} (value {self.value!r})"


def is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float):
        return math.isnan(v)
    if isinstance(v, str):
        return v.strip().lower() in MISSING_STRINGS
    if isinstance(v, np.floating):
        return bool(np.isnan(v))
    return False


def rows_to_columns(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> dict[str, list]:
    """List of dict rows -> dict of columns. Keys absent from a row are missing values."""
    rows = list(rows)
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            for k in r:
                seen.setdefault(k, None)
        columns = list(seen)
    return {c: [r.get(c) for r in rows] for c in columns}


def table_length(table: Mapping[str, Sequence]) -> int:
    lengths = {len(v) for v in table.values()}
    if len(lengths) > 1:
        raise DataError(f"columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


# ---- column parsing ---------------------------------------------------------------------

class TextColumn(list):
    """A list that holds only str: a column read from a CSV file (so ``_distinct_strings`` need not check)."""

    __slots__ = ()


def _distinct_strings(values: Sequence) -> tuple[list[str], np.ndarray] | None:
    """(distinct values, each value's index into them) when every value is a string (a CSV column), else None.
    A list is factorized with a dict (hashing at C speed, exact for any string), a numpy string array with
    np.unique; so the per-value rules below run once per distinct value: the same results as applying them
    value by value, at C speed on large columns."""
    if type(values) is TextColumn or (isinstance(values, list) and set(map(type, values)) == {str}):  # only str
        if not values:
            return None
        uniq = list(dict.fromkeys(values))
        position = {v: j for j, v in enumerate(uniq)}
        return uniq, np.fromiter(map(position.__getitem__, values), dtype=np.intp, count=len(values))
    if isinstance(values, np.ndarray) and values.dtype.kind == "U" and len(values):
        uniq, inverse = np.unique(values, return_inverse=True)
        return uniq.tolist(), inverse.reshape(-1)
    return None


MEMO_LIMIT = 65536  # distinct raw values remembered per column across chunks (then forgotten): bounded memory


def _memoized(memo: dict | None, uniq: list[str], rule) -> list:
    """``rule(v)`` for each distinct value, remembered in ``memo`` across the chunks of one input."""
    if memo is None:
        return [rule(v) for v in uniq]
    if len(memo) > MEMO_LIMIT:
        memo.clear()
    return [memo[v] if v in memo else memo.setdefault(v, rule(v)) for v in uniq]


def parse_numeric(values: Sequence, column: str, codes: tuple = (),
                  memo: dict | None = None) -> tuple[np.ndarray, list[RowIssue]]:
    """Float array with NaN for missing values; issues for values that are not finite numbers. ``memo``: a dict
    kept across calls for one column (same codes), so a chunked input parses each distinct string once."""
    arr = values if isinstance(values, np.ndarray) else None
    code_set = {float(c) for c in codes if _is_number(c)}
    distinct = _distinct_strings(values)
    if distinct is not None:  # strings (CSV): parse each distinct value once, then gather
        uniq, inverse = distinct
        str_codes = {canonical_category(c) for c in codes}
        parsed = _memoized(memo, uniq, lambda v: _parse_number(v, str_codes, code_set))
        out = np.array([f for f, _ in parsed], dtype=np.float64)[inverse]  # NaN for missing, codes and bad values
        bad = [j for j, (_, problem) in enumerate(parsed) if problem is not None]
        rows = np.flatnonzero(np.isin(inverse, bad)) if bad else []
        return out, [RowIssue(int(i), column, uniq[inverse[i]], parsed[inverse[i]][1], True) for i in rows]
    if arr is not None and arr.dtype.kind in "fiu":  # fast path: already numeric
        out = arr.astype(np.float64, copy=True)
        issues = [RowIssue(int(i), column, out[i], "non-finite number", True) for i in np.flatnonzero(np.isinf(out))]
        out[np.isinf(out)] = np.nan
        for c in code_set:
            out[out == c] = np.nan
        return out, issues
    out = np.full(len(values), np.nan)
    issues: list[RowIssue] = []
    str_codes = {canonical_category(c) for c in codes}
    # Raw values repeat (CSV strings, codes): parse each distinct value once.
    cache: dict[Any, tuple[float, str | None]] = {}
    for i, v in enumerate(values):
        key = (type(v), v) if _hashable(v) else None
        r = cache.get(key) if key is not None else None
        if r is None:
            r = _parse_number(v, str_codes, code_set)
            if key is not None:
                cache[key] = r
        f, problem = r
        if problem is not None:
            issues.append(RowIssue(i, column, v, problem, True))
        elif f == f:
            out[i] = f
    return out, issues


def _hashable(v: Any) -> bool:
    try:
        hash(v)
        return True
    except TypeError:
        return False


def _parse_number(v: Any, str_codes: set, code_set: set) -> tuple[float, str | None]:
    """(value or NaN for missing, problem or None)."""
    nan = float("nan")
    if is_missing(v):
        return nan, None
    if isinstance(v, (bool, np.bool_)):
        return nan, "expected a number, got a boolean"
    try:
        f = float(v)
    except (TypeError, ValueError):
        if canonical_category(v) in str_codes:
            return nan, None
        return nan, "expected a number"
    if not math.isfinite(f):
        return nan, "non-finite number"
    if f in code_set:
        return nan, None
    return f, None


def _category(v: Any, code_set: set) -> str | None:
    if is_missing(v):
        return None
    c = canonical_category(v)
    return None if c in code_set else c


def parse_categorical(values: Sequence, codes: tuple = ()) -> list[str | None]:
    """Canonical category strings, None for missing."""
    code_set = {canonical_category(c) for c in codes}
    distinct = _distinct_strings(values)
    if distinct is not None:
        uniq, inverse = distinct
        mapped = [_category(v, code_set) for v in uniq]
        return [mapped[j] for j in inverse.tolist()]
    cache: dict[Any, str | None] = {}
    out: list[str | None] = []
    for v in values:
        key = (type(v), v) if _hashable(v) else None
        if key is not None and key in cache:
            out.append(cache[key])
            continue
        if is_missing(v):
            c = None
        else:
            c = canonical_category(v)
            c = None if c in code_set else c
        if key is not None:
            cache[key] = c
        out.append(c)
    return out


def _is_number(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def infer_kind(schema: Schema, column: str, values: Sequence) -> str:
    """'categorical' if declared so or if no present value is a number; else 'numeric'.

    A column mixing numbers and non-numbers raises DataError naming the first offenders:
    declare it in [columns].categorical if the strings are meant as categories.
    """
    if column in schema.categorical:
        return "categorical"
    if column in schema.numeric:
        return "numeric"
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        return "numeric"
    present = [v for v in values if not is_missing(v)]
    if not present:
        return "empty"
    if any(isinstance(v, (bool, np.bool_)) for v in present):
        return "categorical"
    numeric = [_is_number(v) for v in present]
    if not any(numeric):
        return "categorical"
    if all(numeric):
        return "numeric"
    _, issues = parse_numeric(values, column, schema.missing_codes.get(column, ()))
    raise DataError(
        f"column '{column}' mixes numbers with {len(issues)} non-numeric value(s) ({{issues}}); "
        f"fix the data or declare '{column}' in [columns].categorical",
        issues,
    )


# ---- mergeable summaries ----------------------------------------------------------------

def summarize(schema: Schema, table: Mapping[str, Sequence], strict: bool = True) -> dict[str, Any]:
    """Per-column mergeable summary of one site's rows (counts, sums, sums of squares, category counts).

    No row leaves a site through this: only aggregates. ``strict`` raises DataError for columns
    absent from the table and for non-numeric values in numeric columns.
    """
    n = table_length({c: table[c] for c in schema.input_columns if c in table})
    cols: dict[str, Any] = {}
    absent = [c for c in schema.input_columns if c not in table]
    if absent and strict:
        raise DataError(
            f"column(s) {absent} of the schema are not in the data "
            f"(modalities: {sorted({schema.modality_of(c) for c in absent})})"
        )
    for c in schema.input_columns:
        if c not in table:
            cols[c] = {"kind": "empty"}
            continue
        values = table[c]
        kind = infer_kind(schema, c, values)
        codes = schema.missing_codes.get(c, ())
        if kind == "numeric":
            x, issues = parse_numeric(values, c, codes)
            if issues and strict:
                raise DataError(f"numeric column '{c}': {{issues}}", issues)
            x = x[~np.isnan(x)]
            cols[c] = {"kind": "numeric", "count": int(x.size), "sum": float(x.sum()), "sumsq": float((x * x).sum())}
        elif kind == "categorical":
            counts: dict[str, int] = {}
            for v in parse_categorical(values, codes):
                if v is not None:
                    counts[v] = counts.get(v, 0) + 1
            cols[c] = {"kind": "categorical", "counts": dict(sorted(counts.items()))}
        else:
            cols[c] = {"kind": "empty"}
    return {"n_rows": n, "columns": cols, "targets": {}}


def merge_summaries(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge per-site summaries; the result equals the summary of the pooled rows."""
    if not summaries:
        raise ValueError("merge_summaries needs at least one summary")
    out: dict[str, Any] = {"n_rows": 0, "columns": {}, "targets": {}}
    for s in summaries:
        out["n_rows"] += int(s["n_rows"])
        for section in ("columns", "targets"):
            for c, cs in s.get(section, {}).items():
                out[section][c] = _merge_one(out[section].get(c), cs, c)
    return out


def _merge_one(a: Mapping | None, b: Mapping, name: str) -> dict:
    if a is None or a["kind"] == "empty":
        return _copy(b)
    if b["kind"] == "empty":
        return _copy(a)
    if a["kind"] != b["kind"]:
        raise DataError(
            f"column '{name}' is {a['kind']} at one site and {b['kind']} at another; "
            f"declare it in [columns].categorical or [columns].numeric"
        )
    if a["kind"] == "numeric":
        return {"kind": "numeric", "count": a["count"] + b["count"], "sum": a["sum"] + b["sum"], "sumsq": a["sumsq"] + b["sumsq"]}
    counts = dict(a["counts"])
    for k, v in b["counts"].items():
        counts[k] = counts.get(k, 0) + v
    return {"kind": "categorical", "counts": dict(sorted(counts.items()))}


def _copy(s: Mapping) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}


# ---- the fitted preprocessor ------------------------------------------------------------

@dataclass
class EncodedInputs:
    """Per-modality float32 features (n, dim) and presence masks (n,), plus row issues."""

    features: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    issues: list[RowIssue] = field(default_factory=list)
    valid: np.ndarray | None = None  # rows without a fatal issue

    @property
    def n(self) -> int:
        return len(self.valid) if self.valid is not None else 0


@dataclass
class ParsedInputs:
    """``Preprocessor.parse``'s output: per input column the parsed values (float64 with NaN, or canonical
    category strings with '' for missing) and, for categorical columns, each row's category index (-1: none)."""

    columns: dict[str, np.ndarray]
    slots: dict[str, np.ndarray]
    issues: list[RowIssue]
    valid: np.ndarray


@dataclass
class Preprocessor:
    """Fitted statistics for every input column (and task targets) of a schema. JSON-serializable."""

    schema: Schema
    columns: dict[str, dict[str, Any]]  # column -> {kind, mean, std} | {kind, categories}
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {classes} | {mean, std}
    # parsed raw strings per column, remembered across the chunks of an input (``parse_numeric``'s memo)
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_summary(cls, schema: Schema, summary: Mapping[str, Any]) -> "Preprocessor":
        cols: dict[str, dict[str, Any]] = {}
        for c in schema.input_columns:
            s = summary["columns"].get(c, {"kind": "empty"})
            if s["kind"] == "numeric":
                cnt = s["count"]
                mean = s["sum"] / cnt if cnt else 0.0
                var = s["sumsq"] / cnt - mean * mean if cnt else 1.0
                std = math.sqrt(var) if var > 1e-12 else 1.0
                cols[c] = {"kind": "numeric", "mean": mean, "std": std, "count": cnt}
            elif s["kind"] == "categorical":
                cols[c] = {"kind": "categorical", "categories": sorted(s["counts"])}
            else:  # never observed anywhere: keep a numeric slot that is always missing
                cols[c] = {"kind": "numeric", "mean": 0.0, "std": 1.0, "count": 0}
        targets: dict[str, dict[str, Any]] = {}
        for name, task in schema.tasks.items():
            ts = summary.get("targets", {}).get(name)
            if task.kind == "regression":
                if ts and ts.get("count"):
                    mean = ts["sum"] / ts["count"]
                    var = ts["sumsq"] / ts["count"] - mean * mean
                    targets[name] = {"kind": "regression", "mean": mean, "std": math.sqrt(var) if var > 1e-12 else 1.0}
                else:
                    targets[name] = {"kind": "regression", "mean": 0.0, "std": 1.0}
            elif task.kind == "multiclass":
                if task.classes is not None:
                    classes = list(task.classes)
                elif ts and ts.get("counts"):
                    classes = sorted(ts["counts"], key=_class_sort_key)
                else:
                    raise SchemaError(f"multiclass task '{name}' has no labels to learn its classes from; list classes in the schema")
                targets[name] = {"kind": "multiclass", "classes": classes}
            else:
                targets[name] = {"kind": "binary", "classes": ["0", "1"]}
        return cls(schema, cols, targets)

    # ---- layout ---------------------------------------------------------------------------
    def feature_names(self, modality: str) -> list[str]:
        names: list[str] = []
        for c in self.schema.modalities[modality]:
            st = self.columns[c]
            if st["kind"] == "numeric":
                names.append(c)
            else:
                names.extend(f"{c}={k}" for k in st["categories"])
        return names

    @property
    def modality_dims(self) -> dict[str, int]:
        return {m: len(self.feature_names(m)) for m in self.schema.modalities}

    def task_out_dim(self, task: str) -> int:
        kind = self.schema.tasks[task].kind
        return len(self.targets[task]["classes"]) if kind == "multiclass" else 1

    # ---- transform ------------------------------------------------------------------------
    def parse(self, table: Mapping[str, Sequence], on_error: str = "raise") -> "ParsedInputs":
        """The host's half of preprocessing: raw values -> one array per input column (numeric: float64, NaN
        where missing or a missing code; categorical: the canonical category as an object array of str, ''
        where missing) and the issues found (bad numbers fatal, unknown categories not). on_error='raise':
        DataError on the first bad value (training); 'collect': bad rows are marked invalid and blanked (all
        their values missing). ``encode`` (numpy) and the preprocessing graph (portable.py) take it from here."""
        if on_error not in ("raise", "collect"):
            raise ValueError("on_error must be 'raise' or 'collect'")
        known = [c for c in self.schema.input_columns if c in table]
        n = table_length({c: table[c] for c in known}) if known else table_length(table)
        issues: list[RowIssue] = []
        columns: dict[str, np.ndarray] = {}
        slots: dict[str, np.ndarray] = {}
        for c in self.schema.input_columns:
            st = self.columns[c]
            codes = self.schema.missing_codes.get(c, ())
            values = table.get(c)
            if st["kind"] == "numeric":
                if values is None:
                    columns[c] = np.full(n, np.nan)
                else:
                    columns[c], bad = parse_numeric(values, c, codes, self._memo.setdefault(("numeric", c), {}))
                    issues.extend(bad)
                continue
            cats = st["categories"]
            index = {k: j for j, k in enumerate(cats)}
            unknown = f"unknown category (known: {cats}); treated as missing"
            distinct = _distinct_strings(values) if values is not None else None
            if values is None:
                columns[c], slots[c] = np.full(n, "", dtype=object), np.full(n, -1, dtype=np.int64)
            elif distinct is not None:  # strings (CSV): one lookup per distinct value, then gather
                uniq, inverse = distinct
                code_set = {canonical_category(c) for c in codes}
                mapped = _memoized(self._memo.setdefault(("category", c), {}), uniq, lambda v: _category(v, code_set))
                text = np.array(["" if v is None else v for v in mapped] + [""], dtype=object)[:-1]
                slot = np.array([-1 if v is None else index.get(v, -2) for v in mapped], dtype=np.int64)
                columns[c], slots[c] = text[inverse], slot[inverse]
                for i in np.flatnonzero(slots[c] == -2):
                    issues.append(RowIssue(int(i), c, mapped[inverse[i]], unknown, False))
            else:
                parsed = parse_categorical(values, codes)
                columns[c] = np.array(["" if v is None else v for v in parsed] + [""], dtype=object)[:-1]
                slots[c] = np.array([-1 if v is None else index.get(v, -2) for v in parsed], dtype=np.int64)
                for i in np.flatnonzero(slots[c] == -2):
                    issues.append(RowIssue(int(i), c, parsed[i], unknown, False))
            slots[c][slots[c] == -2] = -1
        fatal = [i for i in issues if i.fatal]
        if fatal and on_error == "raise":
            raise DataError(f"{len(fatal)} bad value(s) in the input: {{issues}}", fatal, shown=5)
        valid = np.ones(n, dtype=bool)
        for i in fatal:
            valid[i.row] = False
        if not valid.all():  # a bad row is not predicted: blank it so that no modality is present
            for c, v in columns.items():
                v[~valid] = "" if v.dtype == object else np.nan
                if c in slots:
                    slots[c][~valid] = -1
        return ParsedInputs(columns, slots, sorted(issues, key=lambda i: (i.row, i.column)), valid)

    def encode(self, table: Mapping[str, Sequence], on_error: str = "raise") -> EncodedInputs:
        """Encode raw columns (``parse``, then the transform in numpy). on_error='raise': DataError on the first
        bad value (training); 'collect': bad rows are marked invalid (all modalities absent) and listed in
        ``issues``. The edge runs the same transform as an ONNX graph (portable.py)."""
        parsed = self.parse(table, on_error)
        n = len(parsed.valid)
        features: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        for m, cols in self.schema.modalities.items():
            blocks, seen = [], np.zeros(n, dtype=bool)
            for c in cols:
                st = self.columns[c]
                if st["kind"] == "numeric":
                    x = parsed.columns[c]
                    ok = ~np.isnan(x)
                    seen |= ok
                    blocks.append(np.where(ok, (x - st["mean"]) / st["std"], 0.0)[:, None])
                else:
                    slot = parsed.slots[c]
                    onehot = np.zeros((n, len(st["categories"])))
                    hit = np.flatnonzero(slot >= 0)
                    onehot[hit, slot[hit]] = 1.0
                    seen[hit] = True
                    blocks.append(onehot)
            features[m] = np.concatenate(blocks, axis=1).astype(np.float32) if blocks else np.zeros((n, 0), np.float32)
            present[m] = seen
        return EncodedInputs(features, present, parsed.issues, parsed.valid)

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema.to_dict(), "columns": self.columns, "targets": self.targets}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessor":
        return cls(Schema.from_dict(d["schema"]), {k: dict(v) for k, v in d["columns"].items()},
                   {k: dict(v) for k, v in d.get("targets", {}).items()})


def _class_sort_key(c: str):
    try:
        return (0, float(c), c)
    except ValueError:
        return (1, 0.0, c)
