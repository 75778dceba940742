"""End to end on a small synthetic cohort: jobs, resumability, records, report (fast: few epochs)."""
import json
import re

import pandas as pd
import pytest

from mmn_fed import make_synthetic
from simulations.report import summarize
from simulations.runner import plan, prepare, run_scenario
from simulations.scenario import Scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    df, schema = make_synthetic(n=500, modalities={"a": 3, "b": 3, "c": 2}, informativeness={"b": 2.0}, seed=0)
    df.to_csv(d / "cohort.csv", index=False)
    mods = "\n".join(f'{m} = {list(cols)!r}'.replace("'", '"') for m, cols in schema.modalities.items())
    (d / "schema.toml").write_text(f'[modalities]\n{mods}\n[tasks.outcome]\ncolumn = "outcome"\nkind = "binary"\n'
                                   'threshold = 0\n')
    raw = {
        "scenario": {"name": "tiny"},
        "data": {"csv": "cohort.csv", "schema": "schema.toml", "tasks": ["outcome"]},
        "sites": {"iid": 2},
        "missingness": [{"modality": "b", "mechanism": "mnar", "task": "outcome", "label": 1, "fraction": 0.8}],
        "test": {"conditions": ["clean", "scenario", "mnar_flipped"]},
        "run": {"models": ["multimodn", "pfusion"], "training": ["centralized", "local"], "seeds": [0, 1],
                "epochs": 3, "patience": 2},
        "sweep": {"missingness.0.fraction": [0.0, 0.8]},
    }
    return Scenario.from_dict(raw, base_dir=d)


def test_prepare_splits_sites_and_applies_conditions(scenario):
    _, sc = scenario.points()[1]
    data = prepare(sc, seed=0)
    assert len(data.train) + len(data.tests["clean"]) == 500
    cols = list(sc.schema.modalities["b"])
    y_test = data.tests["clean"]["outcome"].to_numpy()
    miss = {c: data.tests[c][cols].isna().all(axis=1).to_numpy() for c in data.tests}
    assert not miss["clean"].any()
    assert miss["scenario"][y_test == 1].mean() > 0.6 and not miss["scenario"][y_test == 0].any()
    assert miss["mnar_flipped"][y_test == 0].mean() > 0.6 and not miss["mnar_flipped"][y_test == 1].any()
    y_train = data.train["outcome"].to_numpy()
    assert data.train[cols].isna().all(axis=1).to_numpy()[y_train == 1].mean() > 0.6
    assert set(data.site_frames()) == {"site1", "site2"}


def test_run_resume_and_report(scenario, tmp_path):
    out = tmp_path / "out"
    summary = run_scenario(scenario, out, workers=1, progress=False)
    assert summary["done"] == summary["jobs"] == len(plan(scenario)) == 16 and not summary["failed"]
    records = json.loads((out / "metrics.json").read_text())
    assert {r["condition"] for r in records} == {"clean", "scenario", "mnar_flipped"}
    assert {r["missingness.0.fraction"] for r in records} == {0.0, 0.8}
    assert {r["site"] for r in records if r["training"] == "local"} == {"site1", "site2"}
    assert len(pd.read_csv(out / "results.csv")) == len(records)
    assert (out / "runs" / plan(scenario)[0][0].key / "model.pt").exists()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # sweep curve, availability, IMC, CP...
    # the report's numbers are the records' means
    tab = summarize(records, ["missingness.0.fraction"], task="outcome", metric="auroc")
    row = tab[(tab["model"] == "multimodn") & (tab["training"] == "centralized") & (tab["condition"] == "clean")].iloc[0]
    assert f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in html
    # resumable: a second run redoes nothing
    mtime = (out / "runs" / plan(scenario)[0][0].key / "records.json").stat().st_mtime
    again = run_scenario(scenario, out, workers=1, progress=False)
    assert again["done"] == 16
    assert (out / "runs" / plan(scenario)[0][0].key / "records.json").stat().st_mtime == mtime


def test_federated_runs_or_reports_unavailable(scenario, tmp_path):
    raw = scenario.to_dict()
    raw.pop("sweep")
    raw["run"].update(training=["federated"], models=["multimodn"], seeds=[0], rounds=2, local_epochs=1)
    sc = Scenario.from_dict(raw, scenario.base_dir)
    summary = run_scenario(sc, tmp_path / "fed", workers=1, progress=False)
    assert summary["done"] + len(summary["unavailable"]) >= 1 and not summary["failed"], summary
