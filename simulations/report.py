"""Figures and one self-contained ``report.html`` (PNGs embedded as base64) from a scenario's records.

Every number in the report is computed here from the same records written to ``metrics.json``:
the final-state, all-combinations records, averaged over seeds with ``mmn_fed.metrics.mean_ci`` (a
percentile bootstrap over the seeds' values: it stays inside the metric's range and within the seeds' own spread).
The report reads only what earlier stages wrote in the output directory (records, ``availability.json``,
each run's ``imc.csv``/``cp.csv``); it never prepares data itself.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from mmn_fed.correction import VISITS
from mmn_fed.figures import img_html, pyplot, save_figure
from mmn_fed.metrics import mean_ci

from .scenario import Scenario
from .timeseries import COUNT_COLUMNS

AVAILABILITY = "availability.json"  # written by the runner before any training, read here

COLORS = {"multimodn": "#c0392b", "pfusion": "#222222"}  # the paper's Figure 5: MultiModN red, P-Fusion black
STYLES = {"clean": "--", "mnar_flipped": "-", "scenario": ":"}
MARKERS = {"federated": "o", "centralized": "s", "local": "^"}
NAMES = {"multimodn": "MultiModN", "pfusion": "P-Fusion"}


# ---- numbers ----------------------------------------------------------------------------------

def primary(sc: Scenario) -> tuple[str, str]:
    """(task, metric) the figures show: the first task, AUROC (MSE for regression)."""
    task = next(iter(sc.schema.tasks))
    return task, ("mse" if sc.schema.tasks[task].kind == "regression" else "auroc")


def summarize(records: Iterable[Mapping[str, Any]], sweep_keys: Iterable[str] = (), site: str | None = "all",
              task: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """Mean over seeds and a 95% percentile-bootstrap interval of that mean (seeds resampled,
    ``mmn_fed.metrics.mean_ci``) of final-state, all-combination records, one row per
    (sweep values, model, training, condition, site, task, metric)."""
    df = pd.DataFrame(list(records))
    if df.empty:
        return pd.DataFrame()
    df = df[(df["state"] == "final") & (df["combination"] == "all")]
    if "time_from" in df.columns:  # time series: the per-time-bin records are summarized by summarize_time
        df = df[df["time_from"].isna()]
    if site is not None:
        df = df[df["site"] == site]
    if task is not None:
        df = df[df["task"] == task]
    if metric is not None:
        df = df[df["metric"] == metric]
    keys = [k for k in sweep_keys if k in df.columns] + ["model", "training", "condition", "site", "task", "metric"]
    rows = []
    for group, part in df.groupby(keys, sort=False, dropna=False):
        m, lo, hi = mean_ci(part["value"].astype(float).tolist())
        rows.append({**dict(zip(keys, group)), "mean": m, "ci_low": lo, "ci_high": hi, "seeds": int(part["seed"].nunique())})
    return pd.DataFrame(rows)


def summarize_time(records: Iterable[Mapping[str, Any]], sweep_keys: Iterable[str] = (), task: str | None = None,
                   metric: str | None = None) -> pd.DataFrame:
    """As ``summarize``, for a time series' records per bin of time since the first observation (one row per
    sweep values, model, training, condition, bin; ``site = all``). Empty for static data."""
    df = pd.DataFrame(list(records))
    if df.empty or "time_from" not in df.columns:
        return pd.DataFrame()
    df = df[df["time_from"].notna() & (df["site"] == "all")].copy()
    df["time_to"] = df["time_to"].astype(float).fillna(np.inf)  # None: the open last bin
    if task is not None:
        df = df[df["task"] == task]
    if metric is not None:
        df = df[df["metric"] == metric]
    keys = [k for k in sweep_keys if k in df.columns] + ["model", "training", "condition", "task", "metric",
                                                          "time_from", "time_to"]
    rows = []
    for group, part in df.groupby(keys, sort=False, dropna=False):
        m, lo, hi = mean_ci(part["value"].astype(float).tolist())
        rows.append({**dict(zip(keys, group)), "mean": m, "ci_low": lo, "ci_high": hi,
                     "steps": int(part["n"].median()), "seeds": int(part["seed"].nunique())})
    return pd.DataFrame(rows).sort_values(keys[:-4] + ["time_from"], kind="stable").reset_index(drop=True)


def time_bin_label(lo: float, hi: float | None) -> str:
    return f"≥ {lo:g}" if hi is None or hi != hi or hi == float("inf") else f"{lo:g}–{hi:g}"


# ---- figures ----------------------------------------------------------------------------------

def plot_sweep(table: pd.DataFrame, key: str, task: str, metric: str, path: Path, title: str) -> Path:
    """The paper's Figure 5: metric vs a numeric sweep value, one panel per training mode; colour = model,
    line style = test condition, shaded 95% CI."""
    plt = pyplot()
    trainings = list(dict.fromkeys(table["training"]))
    fig, axes = plt.subplots(1, len(trainings), figsize=(max(7.5, 5.2 * len(trainings)), 4.0), squeeze=False,
                             sharey=True)
    for ax, training in zip(axes[0], trainings):
        part = table[table["training"] == training]
        for (model, cond), g in part.groupby(["model", "condition"], sort=False):
            g = g.sort_values(key)
            x = g[key].astype(float).to_numpy()
            ax.plot(x, g["mean"], STYLES.get(cond, "-."), color=COLORS.get(model, None), marker="o", ms=4,
                    label=f"{NAMES.get(model, model)}, test {cond}")
            ax.fill_between(x, g["ci_low"], g["ci_high"], color=COLORS.get(model, None), alpha=0.15, lw=0)
        if metric == "auroc":
            ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
        ax.set_title(f"{training}", fontsize=10)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{task} {metric.upper()} (mean, 95% CI)")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_time(table: pd.DataFrame, task: str, metric: str, path: Path, title: str, unit: str) -> Path:
    """The paper's continuous-task figures: the metric against time since the subject's first observation (bins
    on the x axis), one panel per training mode; colour = model, line style = test condition, shaded 95% CI."""
    plt = pyplot()
    trainings = list(dict.fromkeys(table["training"]))
    bins = sorted({(lo, hi) for lo, hi in zip(table["time_from"], table["time_to"])})
    where = {b: i for i, b in enumerate(bins)}
    fig, axes = plt.subplots(1, len(trainings), figsize=(max(7.5, 5.2 * len(trainings)), 4.0), squeeze=False,
                             sharey=True)
    for ax, training in zip(axes[0], trainings):
        part = table[table["training"] == training]
        for (model, cond), g in part.groupby(["model", "condition"], sort=False):
            x = np.array([where[(lo, hi)] for lo, hi in zip(g["time_from"], g["time_to"])])
            ax.plot(x, g["mean"], STYLES.get(cond, "-."), color=COLORS.get(model, None), marker="o", ms=4,
                    label=f"{NAMES.get(model, model)}, test {cond}")
            ax.fill_between(x, g["ci_low"], g["ci_high"], color=COLORS.get(model, None), alpha=0.15, lw=0)
        if metric == "auroc":
            ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
        ax.set_xticks(range(len(bins)), [time_bin_label(lo, hi) for lo, hi in bins], rotation=20, fontsize=8)
        ax.set_title(f"{training}", fontsize=10)
        ax.set_xlabel(f"time since the first observation ({unit})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{task} {metric.upper()} (mean, 95% CI)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def plot_bars(table: pd.DataFrame, group_cols: list[str], task: str, metric: str, path: Path, title: str) -> Path:
    """Grouped bars with 95% CI error bars: x = model/training (and sweep value), bars = test condition."""
    plt = pyplot()
    table = table.copy()
    table["group"] = table[group_cols].astype(str).agg(" / ".join, axis=1)
    groups = list(dict.fromkeys(table["group"]))
    conds = list(dict.fromkeys(table["condition"]))
    width = 0.8 / max(len(conds), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups) * max(len(conds), 1) * 0.6 + 2), 4.0))
    for i, cond in enumerate(conds):
        part = table[table["condition"] == cond].set_index("group").reindex(groups)
        x = np.arange(len(groups)) + (i - (len(conds) - 1) / 2) * width
        err = np.vstack([part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]])
        ax.bar(x, part["mean"], width, yerr=np.nan_to_num(err), capsize=3, label=f"test {cond}",
               color=["#c0392b", "#555555", "#2e86c1"][i % 3], alpha=0.85)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{task} {metric.upper()} (mean, 95% CI)")
    if metric == "auroc":
        lo = float(np.nanmin(table["ci_low"])) if len(table) else 0.5
        ax.set_ylim(max(0.0, min(0.5, lo - 0.05)), 1.0)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=11)
    return save_figure(fig, path)


def plot_availability(table: pd.DataFrame, path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * table.shape[1], 1.0 + 0.45 * table.shape[0]))
    im = ax.imshow(table.values, cmap="Greens", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index)
    for i in range(table.shape[0]):
        for j in range(table.shape[1]):
            v = table.values[i, j]
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8, color="white" if v > 0.6 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


# ---- the report -------------------------------------------------------------------------------

_img = img_html


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if v != v else f"{v:g}"
    return html.escape(str(v))


def _table(df: pd.DataFrame, ci: bool = True) -> str:
    if df.empty:
        return "<p><em>no results</em></p>"
    df = df.copy()
    if ci and "mean" in df.columns:
        df["mean [95% CI]"] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if m == m else "–"
                               for m, lo, hi in zip(df["mean"], df["ci_low"], df["ci_high"])]
        df = df.drop(columns=["mean", "ci_low", "ci_high"])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def read_availability(out: Path) -> list[tuple[str, pd.DataFrame]]:
    """The availability tables the runner wrote (``availability.json``; see ``runner.availability_tables``)."""
    return [(t["title"], pd.DataFrame(**t["table"])) for t in _availability_json(out)]


def _availability_json(out: Path) -> list[dict[str, Any]]:
    path = out / AVAILABILITY
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: simulations.runner.run_scenario writes it before any training")
    return json.loads(path.read_text())


def read_audits(out: Path) -> list[tuple[str, dict[str, Any]]]:
    """The missingness audits of the training rows the runner wrote (``mmn_fed.audit.AuditResult.to_dict``)."""
    return [(t["title"], t["audit"]) for t in _availability_json(out) if "audit" in t]


def audit_table(audit: Mapping[str, Any]) -> pd.DataFrame:
    """The audit's tested modality findings, one row per (site, modality, task), strongest first. Tables that
    could not be tested (a modality every row holds) are left out; suppressed ones show the site's verdict."""
    rows = []
    for f in audit["findings"]:
        if f["kind"] != "modality" or f["q_value"] is None:
            continue
        shares = ("counts suppressed at the site" if f["suppressed"] else
                  ", ".join(f"{lab}: {r:.0%}" for lab, r in zip(f["labels"], f["rates"]) if r is not None))
        diff = f.get("rate_difference")
        rows.append({"site": f["site"], "modality": f["name"], "task": f["task"],
                     "presence by label": shares, "difference": "–" if diff is None else f"{diff:.2f}",
                     "q": f"{f['q_value']:.2g}", "label-dependent": "yes" if f["flagged"] else ""})
    df = pd.DataFrame(rows)
    return df.sort_values(["label-dependent", "difference"], ascending=False).reset_index(drop=True) if len(df) else df


def _missingness_html(records: Iterable[Mapping[str, Any]], audits: list[tuple[str, dict[str, Any]]],
                      sweep_keys: Iterable[str] = ()) -> str:
    """What each model did about label-dependent missingness (from the records), and the training audit."""
    seen = {}
    for r in records:
        key = (", ".join(f"{k} = {r.get(k)}" for k in sweep_keys), r.get("model"), r.get("training"),
               r.get("missingness") or "off")
        seen.setdefault(key, set()).add(r.get("corrected") or "")
    items = []
    for (point, model, training, mode), corrected in sorted(seen.items(), key=lambda kv: tuple(map(str, kv[0]))):
        what = "; ".join(sorted(c.replace(VISITS, "the visit rate").replace(",", ", ") or "nothing" for c in corrected))
        where = f"{html.escape(point)}: " if point else ""
        items.append(f"<li>{where}<b>{html.escape(str(model))}</b> ({html.escape(str(training))}): missingness = "
                     f"<code>{html.escape(mode)}</code>; presence balanced against the label for: {html.escape(what)} "
                     "(over seeds)</li>")
    out = ["<h2>Missingness audit and correction</h2>",
           "<p>Each site tests, on its training rows, whether a modality's presence depends on the label "
           "(chi-squared / Fisher, Benjamini-Hochberg over all tests; counts below the minimum cell count stay at "
           "the site). With <code>missingness = auto</code> the modalities found label-dependent are hidden in "
           "some training rows until presence is independent of the label (docs/simulations.md).</p>",
           f"<ul>{''.join(items)}</ul>"]
    for title, audit in audits:
        tab = audit_table(audit)
        out.append(f"<h3>Audit of the {html.escape(title)}</h3>")
        out.append(_table(tab, ci=False) if len(tab) else "<p>No table could be tested (all suppressed).</p>")
    return "".join(out)


def _explain_run(infos: Mapping[str, Mapping], out: Path) -> tuple[str, Path] | None:
    done = [i for i in infos.values() if i.get("status") == "done" and i["model"] == "multimodn"
            and (out / "runs" / i["key"] / "imc.csv").exists()]
    rank = {"federated": 0, "centralized": 1, "local": 2}
    done.sort(key=lambda i: (rank.get(i["training"], 3), -i["point"], i["seed"]))
    if not done:
        return None
    i = done[0]
    return f"{i['training']} MultiModN, seed {i['seed']}, sweep {i['sweep'] or '-'}", out / "runs" / i["key"]


def write_report(sc: Scenario, out: Path, records: list[dict], infos: Mapping[str, Mapping], summary: Mapping) -> Path:
    """Write figures/*.png and report.html; returns the report's path."""
    from mmn_fed.interpret import plot_explanations

    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    task, metric = primary(sc)
    keys = list(sc.sweep)
    parts: list[str] = []
    figures: list[str] = []

    main = summarize(records, keys, task=task, metric=metric)
    if not main.empty:
        numeric = len(keys) == 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sc.sweep[keys[0]])
        if numeric:
            p = plot_sweep(main, keys[0], task, metric, figs / "sweep.png",
                           f"{sc.name}: {task} {metric.upper()} vs {keys[0]}")
            figures.append(_img(p, f"{task} {metric.upper()} vs {keys[0]} (colour: model; dashed: clean test, "
                                   f"solid: label-flipped test; shaded: 95% CI over seeds)"))
        else:
            p = plot_bars(main, keys + ["model", "training"], task, metric, figs / "metrics.png",
                          f"{sc.name}: {task} {metric.upper()}")
            figures.append(_img(p, f"{task} {metric.upper()} per model and training mode (95% CI over seeds)"))

    timed = summarize_time(records, keys, task=task, metric=metric)
    time_html = ""
    if not timed.empty:
        ts = sc.schema.timeseries
        points = list(dict.fromkeys(zip(*[timed[k] for k in keys]))) if keys else [()]
        for j, point in enumerate(points):
            part = timed
            for k, v in zip(keys, point):
                part = part[part[k] == v]
            at = ", ".join(f"{k} = {v}" for k, v in zip(keys, point))
            p = plot_time(part, task, metric, figs / f"over_time_{j}.png",
                          f"{sc.name}: {task} {metric.upper()} over time{' (' + at + ')' if at else ''}", ts.time)
            figures.append(_img(p, f"{task} {metric.upper()} against the time since the subject's first observation "
                                   f"({ts.time}){', ' + at if at else ''}: colour = model, line style = test condition, "
                                   "shaded = 95% CI over seeds"))
        shown = timed.assign(time=[time_bin_label(a, b) for a, b in zip(timed["time_from"], timed["time_to"])])
        shown = shown.drop(columns=["time_from", "time_to", "task", "metric"])
        time_html = (f"<h2>{html.escape(task)} {metric.upper()} over time since the first observation "
                     f"({html.escape(ts.time)}; test steps per bin; mean [95% CI] over seeds)</h2>" + _table(shown))
    avail_html = []
    for i, (label, tab) in enumerate(read_availability(out)):
        counts = [c for c in tab.columns if c in COUNT_COLUMNS]
        if label.startswith("training"):
            p = plot_availability(tab.drop(columns=counts), figs / f"availability_{i}.png",
                                  f"Modality availability, {label}")
            avail_html.append(_img(p, f"Share of {'steps' if len(counts) > 1 else 'rows'} holding each modality per "
                                      f"site, {label}"))
        shown = tab.copy()
        for c in shown.columns:
            if c not in counts:
                shown[c] = [f"{v:.0%}" for v in shown[c]]
        avail_html.append(f"<h4>{html.escape(label)}</h4>" + _table(shown.reset_index(names="site"), ci=False))

    explain = _explain_run(infos, out)
    if explain:
        label, run_dir = explain
        shown = plot_explanations(pd.read_csv(run_dir / "imc.csv"), pd.read_csv(run_dir / "cp.csv"), figs)
        figures.append(_img(shown["imc.png"], f"Individual modality contribution (IMC): encoder alone minus prior, "
                                              f"mean over clean test rows; {label}"))
        figures.append(_img(shown["imc_abs.png"], f"IMC magnitude (mean |encoder alone - prior|); {label}"))
        figures.append(_img(shown["cp.png"], f"Cumulative prediction (CP) of one test patient, {label}"))

    all_tasks = summarize(records, keys)
    per_site = summarize(records, keys, site=None, task=task, metric=metric)
    per_site = per_site[per_site["site"] != "all"] if not per_site.empty else per_site

    rules = "".join(f"<li>{html.escape(r.describe())}</li>" for r in sc.rules) or "<li>none</li>"
    status = (f"{summary['done']} of {summary['jobs']} runs done")
    notes = "".join(f"<li class='warn'>failed: {html.escape(f)}</li>" for f in summary.get("failed", []))
    sweep = "".join(f"<li><code>{html.escape(k)}</code> = {html.escape(json.dumps(v))}</li>" for k, v in sc.sweep.items())
    try:
        import tomli_w

        toml_text = tomli_w.dumps(sc.to_dict())
    except Exception:  # tomli_w is optional: fall back to JSON
        toml_text = json.dumps(sc.to_dict(), indent=1, default=str)

    parts.append(f"<h1>Simulation report: {html.escape(sc.name)}</h1>")
    if sc.description:
        parts.append(f"<p>{html.escape(sc.description)}</p>")
    parts.append(f"<p>{status}. Data: <b>{html.escape(sc.data.builtin or str(sc.data.csv))}</b>; tasks "
                 f"{', '.join(sc.schema.tasks)}; sites: {html.escape(sc.sites.describe())}"
                 f"{'; deployment (held-out) sites: ' + ', '.join(sc.test.holdout_sites) if sc.test.holdout_sites else ''}; "
                 f"models {', '.join(sc.run.models)}; training {', '.join(sc.run.training)}; seeds "
                 f"{list(sc.run.seeds)}; test share {sc.test.fraction:.0%} of each site.</p>")
    if notes:
        parts.append(f"<ul>{notes}</ul>")
    parts.append(_missingness_html(records, read_audits(out), keys))
    parts.append(f"<h2>Missingness rules</h2><ul>{rules}</ul>")
    parts.append("<p>Test conditions: <b>clean</b> = no added missingness; <b>scenario</b> = the rules above on test "
                 "rows; <b>mnar_flipped</b> = as scenario, but every label-dependent rule (mnar; fewer_visits and dropout "
                 "with a task) hits the other label.</p>")
    if sweep:
        parts.append(f"<h2>Sweep</h2><ul>{sweep}</ul>")
    parts.append(f"<h2>{html.escape(task)} {metric.upper()} (all test rows, mean [95% CI] over seeds)</h2>" + _table(main))
    parts.append(time_html)
    parts.append("<h2>Figures</h2>" + "".join(figures))
    parts.append("<h2>Sites and modality availability</h2>" + "".join(avail_html))
    if not per_site.empty:
        parts.append(f"<h2>{html.escape(task)} {metric.upper()} per site</h2>" + _table(per_site))
    parts.append("<details><summary>All tasks and metrics</summary>" + _table(all_tasks) + "</details>")
    parts.append(f"<details><summary>Scenario file</summary><pre>{html.escape(toml_text)}</pre></details>")
    parts.append("<p class='small'>Numbers: final-state records with combination = all from metrics.json "
                 "(results.csv holds the same records). Intervals: mean over seeds and a 95% percentile-bootstrap "
                 "interval of that mean, resampling the seeds' values (so it never leaves the seeds' range: with 3 "
                 "seeds it shows their spread, not a population interval).</p>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:24px auto;padding:0 16px;color:#222}"
             "table{border-collapse:collapse;margin:8px 0 18px;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left}th{background:#f2f2f2}figure{margin:12px 0}img{max-width:100%;border:1px solid #eee}"
             "figcaption{font-size:12px;color:#555}.warn{color:#a04000}.small{font-size:12px;color:#666}"
             "pre{background:#f7f7f7;padding:8px;font-size:12px}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>mmn-fed simulation: {html.escape(sc.name)}</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    path.write_text(doc)
    return path
