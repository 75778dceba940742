"""Missingness mechanisms: remove a whole modality from chosen rows.

Every mechanism is the same operation with a different *condition*: a row whose condition holds loses
the modality with probability ``fraction``; other rows keep it. Losing a modality sets all its columns to
missing, so the core preprocessing marks it absent for that row (MultiModN skips its encoder, P-Fusion
zero-fills its embedding).

| mechanism      | condition (literature name)                                                   |
| -------------- | ----------------------------------------------------------------------------- |
| ``mcar``       | every row (missing completely at random)                                      |
| ``mar``        | an observed column of *another* modality is high/low/in values (at random)    |
| ``mnar``       | the row's label for ``task`` equals ``label`` (not at random, as in the paper)|
| ``self_masking``| a column of the modality itself is high/low/in values (not at random)        |
| ``absent``     | every row, with fraction 1: the site never acquired the modality (structural) |

Time series (a ``[timeseries]`` schema) add mechanisms that remove whole visits (rows) rather than a modality,
decided per subject (``simulations.timeseries``): ``fewer_visits`` (each visit but the first is dropped with
probability ``fraction``), ``dropout`` (with probability ``fraction`` the subject's visits after a random cut are
missing: the last visits), both for the subjects whose outcome (``task`` = ``label``) holds, or every subject
without a task; and ``sampling`` (keep one visit per ``every`` time units: a site that measures less often).

"high" / "low" compare with the median of the affected rows; rows whose driving value is missing never
satisfy the condition. ``flip=True`` applies an ``mnar`` rule to the *other* labels (the paper's
label-flipped test set).
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from edge_runtime.preprocessing import Preprocessor, parse_categorical
from edge_runtime.schema import Schema, canonical_category
from mmn_fed.data import derive_labels, frame_to_columns

MODALITY_MECHANISMS = ("mcar", "mar", "mnar", "self_masking", "absent")
TIME_MECHANISMS = ("fewer_visits", "dropout", "sampling")  # whole visits of a time series (simulations.timeseries)
MECHANISMS = MODALITY_MECHANISMS + TIME_MECHANISMS
OUTCOME_MECHANISMS = ("mnar", "fewer_visits", "dropout")  # may depend on a label: the label-flipped test flips them
PHASES = ("both", "train", "test")


@dataclass(frozen=True)
class MissingnessRule:
    """One ``[[missingness]]`` entry of a scenario (validated by ``simulations.scenario``)."""

    modality: str | None  # None for the time mechanisms (they remove whole visits)
    mechanism: str
    fraction: float = 1.0
    task: str | None = None  # mnar: the label that drives missingness
    label: Any = None  # mnar: rows with this label lose the modality (binary: 0/1; multiclass: a class)
    column: str | None = None  # mar / self_masking: the driving column
    direction: str = "high"  # mar / self_masking on a numeric column: "high" | "low" half (by the median)
    values: tuple = ()  # mar / self_masking on a categorical column: these categories drive it
    sites: tuple[str, ...] | None = None  # None = every site
    phase: str = "both"  # train rows, test rows, or both
    every: float | None = None  # sampling: one visit kept per this many time units (since the subject's first)

    @property
    def outcome_dependent(self) -> bool:
        """Does it depend on a label (and so flip in the label-flipped test)?"""
        return self.mechanism in OUTCOME_MECHANISMS and self.task is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if v not in (None, ())}

    def describe(self) -> str:
        where = "all sites" if self.sites is None else ", ".join(self.sites)
        who = f"subjects with {self.task} = {self.label}" if self.task is not None else "every subject"
        if self.mechanism == "fewer_visits":
            what = f"{self.fraction:.0%} of the visits after the first dropped, for {who}"
        elif self.mechanism == "dropout":
            what = f"{self.fraction:.0%} of {who} drop out (their last visits missing)"
        elif self.mechanism == "sampling":
            what = f"one visit kept per {self.every:g} time units"
        elif self.mechanism == "absent":
            what = "absent (never acquired)"
        elif self.mechanism == "mcar":
            what = f"MCAR {self.fraction:.0%}"
        elif self.mechanism == "mnar":
            what = f"MNAR {self.fraction:.0%} of rows with {self.task} = {self.label}"
        else:
            cond = f"in {list(self.values)}" if self.values else f"{self.direction} half"
            what = f"{'MAR' if self.mechanism == 'mar' else 'self-masking'} {self.fraction:.0%} of rows with {self.column} {cond}"
        phase = "" if self.phase == "both" else f" ({self.phase} rows only)"
        return f"{self.modality or 'visits'}: {what} at {where}{phase}"


@dataclass
class MissingnessLog:
    """What a set of rules removed: per rule, rows eligible (site + phase) and rows that lost the modality."""

    eligible: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)


def rule_rng(seed: int, rule_index: int, stream: str) -> np.random.Generator:
    """Independent, reproducible draws per (seed, rule, stream): training and test rows never share draws."""
    return np.random.default_rng([seed, rule_index, zlib.crc32(stream.encode())])


def condition(rule: MissingnessRule, schema: Schema, df: pd.DataFrame, flip: bool = False,
              labels: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """Rows of ``df`` whose condition holds (before the ``fraction`` draw)."""
    n = len(df)
    if rule.mechanism in ("mcar", "absent"):
        return np.ones(n, dtype=bool)
    if rule.mechanism == "mnar":
        values, present = (labels or derive_labels(schema, df))[rule.task]
        if schema.tasks[rule.task].kind == "binary":
            hit = values == float(rule.label)
        else:
            hit = np.array([str(v) == canonical_category(rule.label) for v in values])
        return present & (~hit if flip else hit)
    # mar / self_masking: a driving column
    col = df[rule.column]
    if rule.values:
        cats = parse_categorical(col.to_numpy(dtype=object))
        wanted = {canonical_category(v) for v in rule.values}
        return np.array([c is not None and c in wanted for c in cats])
    x = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    ok = ~np.isnan(x)
    if not ok.any():
        return np.zeros(n, dtype=bool)
    med = float(np.median(x[ok]))
    with np.errstate(invalid="ignore"):
        return ok & ((x > med) if rule.direction == "high" else (x < med))


def apply_rules(
    df: pd.DataFrame,
    schema: Schema,
    rules: Sequence[MissingnessRule],
    sites: np.ndarray,
    seed: int,
    phase: str,
    flip_mnar: bool = False,
    log: MissingnessLog | None = None,
) -> pd.DataFrame:
    """A copy of ``df`` with the rules applied to its rows. ``sites`` names each row's site; ``phase`` is
    'train' or 'test' (rules whose phase does not include it are skipped). Conditions are evaluated on the
    original values, so the order of rules does not matter."""
    if phase not in ("train", "test"):
        raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
    out = df.copy()
    labels = derive_labels(schema, df) if any(r.mechanism == "mnar" for r in rules) else None
    sites = np.asarray(sites).astype(str)
    for i, rule in enumerate(rules):
        if rule.mechanism in TIME_MECHANISMS:  # whole visits: simulations.timeseries.drop_visits
            continue
        eligible = np.ones(len(df), dtype=bool) if rule.sites is None else np.isin(sites, list(rule.sites))
        if rule.phase not in ("both", phase):
            eligible[:] = False
        hit = eligible & condition(rule, schema, df, flip=flip_mnar and rule.mechanism == "mnar", labels=labels)
        # only MNAR rules change under the flip: other rules draw the same rows as in the scenario condition
        draw = rule_rng(seed, i, f"{phase}{'-flip' if flip_mnar and rule.mechanism == 'mnar' else ''}").random(len(df))
        lose = hit & (draw < rule.fraction)
        if lose.any():
            cols = list(schema.modalities[rule.modality])
            out.loc[lose, cols] = np.nan
        if log is not None:
            log.eligible.append(int(eligible.sum()))
            log.removed.append(int(lose.sum()))
    return out


def availability(prep: Preprocessor, df: pd.DataFrame, sites: Iterable[str]) -> pd.DataFrame:
    """Share of rows holding each modality per site (sites x modalities), by the core's own presence rule."""
    sites = np.asarray(list(sites)).astype(str)
    enc = prep.encode(frame_to_columns(df, prep.schema.input_columns), on_error="collect")
    rows = {s: {m: float(enc.present[m][sites == s].mean()) for m in prep.schema.modalities}
            for s in dict.fromkeys(sites)}
    return pd.DataFrame.from_dict(rows, orient="index")
