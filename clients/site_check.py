"""``mmn-fed site check``: the pre-flight a site runs on its own data before joining a federation. Nothing leaves
the site: it reads the CSV, the consortium's schema, optionally the consortium's declared units and ranges and
the site's policy, and prints what it found.

- errors (exit 1): a schema column (input or label) absent from the data, a non-numeric value in a numeric
  column, a value outside the declared range (``--units``: ``[column] unit = "mg/dL" min = 100 max = 600``;
  catches e.g. cholesterol in mmol/L where mg/dL is declared), an unreadable policy, a policy that refuses the
  schema (columns or tasks it does not allow). Each names the file, the column and the first lines.
- information: rows, rows holding each modality, labelled rows per task and class, and what the policy would
  suppress (summary cells, missingness-audit tables, modules held by fewer than ``min_cell`` patients).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SHOW = 5  # lines named per problem


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    suppressed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def text(self) -> str:
        out = [*self.info]
        if self.suppressed:
            out.append("the site policy would suppress:")
            out += [f"  {s}" for s in self.suppressed]
        out += [f"ERROR: {e}" for e in self.errors]
        out.append("site check: OK" if self.ok else f"site check: {len(self.errors)} error(s)")
        return "\n".join(out)


def read_units(path: str | Path) -> dict[str, dict[str, Any]]:
    """``column -> {unit, min, max}`` from a TOML file (each column a table; unit optional; min/max numbers)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"units file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML: {e}") from None
    out = {}
    for col, spec in data.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{p}: '{col}' must be a table {{unit, min, max}}, got {spec!r}")
        unknown = sorted(set(spec) - {"unit", "min", "max"})
        if unknown:
            raise ValueError(f"{p}: column '{col}': unknown key(s) {unknown}; expected unit, min, max")
        for k in ("min", "max"):
            if k in spec and (isinstance(spec[k], bool) or not isinstance(spec[k], (int, float))):
                raise ValueError(f"{p}: column '{col}': {k} must be a number, got {spec[k]!r}")
        out[col] = dict(spec)
    return out


def _is_number(v) -> bool:
    try:
        float(str(v))
        return True
    except ValueError:
        return False


def check_site(data: str | Path, schema_path: str | Path, policy_path: str | Path | None = None,
               units_path: str | Path | None = None) -> CheckReport:
    from edge_runtime.preprocessing import parse_numeric
    from edge_runtime.schema import Schema
    from mmn_fed.audit import modality_presence, presence_counts
    from mmn_fed.data import derive_labels, read_table, row_locator, site_summary

    from .policy import PolicyError, load_policy, suppress_summary

    rep = CheckReport()
    schema = Schema.from_toml(str(schema_path))
    df = read_table(data)
    src = str(data)
    where = row_locator(df)
    rep.info.append(f"{src}: {len(df)} rows; schema {schema_path}: {len(schema.modalities)} modalities, "
                    f"{len(schema.tasks)} task(s)")
    missing = [f"'{c}' (modality {schema.modality_of(c)})" for c in schema.input_columns if c not in df.columns]
    missing += [f"'{t.column}' (label of task {t.name})" for t in schema.tasks.values() if t.column not in df.columns]
    if missing:
        rep.errors.append(f"{src}: column(s) {', '.join(missing)} not in the data")
    units = read_units(units_path) if units_path else {}
    for c in units:
        if c not in schema.input_columns and c not in [t.column for t in schema.tasks.values()]:
            rep.errors.append(f"{units_path}: column '{c}' is not a column of the schema {schema_path}")
    for c in schema.input_columns:
        if c not in df.columns or c in schema.categorical:
            continue
        codes = schema.missing_codes.get(c, ())
        values = df[c].to_numpy(dtype=object)
        if c not in schema.numeric and not any(isinstance(v, (int, float)) and v == v for v in values):
            if not any(_is_number(v) for v in values):
                continue  # no number at all: a categorical column the schema does not declare
        x, issues = parse_numeric(values, c, codes)
        if issues:
            shown = ", ".join(f"{where(i.row)} ({i.value!r})" for i in issues[:SHOW])
            rep.errors.append(f"{src}: numeric column '{c}': {len(issues)} non-numeric value(s): {shown}")
            continue
        spec = units.get(c)
        if spec:
            lo, hi = spec.get("min", -np.inf), spec.get("max", np.inf)
            bad = np.flatnonzero(~np.isnan(x) & ((x < lo) | (x > hi)))
            if len(bad):
                unit = f" {spec['unit']}" if "unit" in spec else ""
                shown = ", ".join(f"{where(int(i))} ({x[i]:g})" for i in bad[:SHOW])
                rep.errors.append(
                    f"{src}: column '{c}': {len(bad)} of {int((~np.isnan(x)).sum())} value(s) outside the declared range "
                    f"[{lo:g}, {hi:g}]{unit} (another unit?): {shown}")
            elif np.isfinite(x).any():
                rep.info.append(f"column '{c}': values in [{np.nanmin(x):g}, {np.nanmax(x):g}], within the declared "
                                f"[{lo:g}, {hi:g}]{(' ' + spec['unit']) if 'unit' in spec else ''}")
    if missing:
        return rep
    present = modality_presence(schema, df)
    rep.info.append("rows per modality: " + ", ".join(f"{m} {int(p.sum())}" for m, p in present.items()))
    labels = derive_labels(schema, df)
    for t, (values, has) in labels.items():
        if schema.tasks[t].kind == "regression":
            rep.info.append(f"task {t}: {int(has.sum())} labelled rows")
        else:
            v = np.asarray(values[has])
            v = v.astype(int) if schema.tasks[t].kind == "binary" else v
            keys, counts = np.unique(v.astype(str), return_counts=True)
            rep.info.append(f"task {t}: {int(has.sum())} labelled rows (" +
                            ", ".join(f"{k}: {int(n)}" for k, n in zip(keys, counts)) + ")")
    if not policy_path:
        return rep
    try:
        policy = load_policy(policy_path)
    except PolicyError as e:
        rep.errors.append(str(e))
        return rep
    refused = [r for r in (policy.check_columns([*schema.input_columns, *(t.column for t in schema.tasks.values())]),
                           policy.check_tasks(schema.tasks)) if r]
    for r in refused:
        rep.errors.append(f"{policy_path}: the policy would refuse this schema's summary: {r}")
    k = policy.min_cell
    for m in schema.modalities:
        n = int(present[m].sum())
        if not policy.module_allowed(f"encoders.{m}"):
            rep.suppressed.append(f"encoders.{m}: modality not in allowed_modalities (never trained here)")
        elif 0 < n < k:
            rep.suppressed.append(f"encoders.{m}: {n} row(s) hold it, below min_cell = {k} (never trained here)")
    for t in schema.tasks:
        if not policy.module_allowed(f"decoders.{t}"):
            rep.suppressed.append(f"decoders.{t}: task not in allowed_tasks (never trained here)")
    if k > 1:
        try:
            full = site_summary(schema, df)
            out = suppress_summary(full, k)
        except PolicyError as e:
            rep.errors.append(f"{src}: {e}")
            return rep
        except Exception as e:  # noqa: BLE001  (a value the summary cannot read: already reported above)
            rep.errors.append(f"{src}: the preprocessing summary fails: {e}")
            return rep
        for section in ("columns", "targets"):
            for c, s in full[section].items():
                after = out[section][c]
                if s.get("kind") == "categorical":
                    gone = sorted(set(s["counts"]) - set(after["counts"]))
                    if gone:
                        rep.suppressed.append(f"summary: {section[:-1]} '{c}': categor{'y' if len(gone) == 1 else 'ies'} "
                                              f"{gone} (fewer than {k} rows)")
                elif s.get("kind") == "numeric" and after.get("kind") == "empty":
                    rep.suppressed.append(f"summary: {section[:-1]} '{c}': its statistics ({s['count']} values)")
        audit = presence_counts(schema, df, min_cell=k)
        small = [f"{e['name']} x {e['task']}" for e in audit["tables"] if e.get("suppressed")]
        if small:
            rep.suppressed.append(f"missingness audit: {len(small)} table(s) sent as a test only: {', '.join(small[:SHOW])}"
                                  + (" ..." if len(small) > SHOW else ""))
    if policy.max_rounds is not None:
        rep.info.append(f"policy: at most {policy.max_rounds} training rounds per run")
    if policy.epsilon_ceiling is not None:
        from .policy import Ledger

        spent = Ledger.read(policy.ledger_path).total()
        rep.info.append(f"policy: privacy budget {spent:.3g} of epsilon {policy.epsilon_ceiling:g} spent "
                        f"(ledger {policy.ledger_path})")
    return rep


def run(args) -> int:
    rep = check_site(args.data, args.schema, args.policy, args.units)
    print(rep.text())
    return 0 if rep.ok else 1


def register_check(site_sub) -> None:
    """Add ``check`` to the ``mmn-fed site`` group (``clients.audit.register``)."""
    p = site_sub.add_parser("check", help="pre-flight of a site's data before joining: schema columns, types, "
                                          "declared ranges, rows per modality, what the site policy would suppress")
    p.add_argument("--data", required=True, help="the site's CSV (training format)")
    p.add_argument("--schema", required=True, help="the consortium's schema (TOML)")
    p.add_argument("--policy", help="the site's policy (TOML, docs/federation.md 'Site policy')")
    p.add_argument("--units", help="the consortium's declared units and ranges: TOML, [column] unit, min, max")
    p.set_defaults(func=run)
