"""End to end on a small synthetic cohort: jobs, resumability, records, report (fast: few epochs)."""
import json
import re

import pandas as pd
import pytest
import torch

from mmn_fed import load_model, make_synthetic
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


def run_files(out, job):
    return {p.name for p in (out / "runs" / job.key).iterdir()}


def test_run_resume_and_report(scenario, tmp_path):
    out = tmp_path / "out"
    jobs = [j for j, _ in plan(scenario)]
    # 2 sweep points x 2 models x 2 trainings x 2 seeds, one directory each
    assert sorted((j.point, j.model, j.training, j.seed) for j in jobs) == sorted(
        (p, m, t, s) for p in (0, 1) for m in ("multimodn", "pfusion") for t in ("centralized", "local") for s in (0, 1))
    assert len({j.key for j in jobs}) == 16
    summary = run_scenario(scenario, out, workers=1, progress=False)
    assert (summary["jobs"], summary["done"], summary["failed"]) == (16, 16, [])
    assert {p.name for p in (out / "runs").iterdir()} == {j.key for j in jobs}
    for j in jobs:
        info = json.loads((out / "runs" / j.key / "info.json").read_text())
        assert (info["status"], info["model"], info["training"], info["seed"]) == ("done", j.model, j.training, j.seed)
        models = {"model.pt"} if j.training == "centralized" else {"model-site1.pt", "model-site2.pt"}
        explained = {"imc.csv", "cp.csv"} if (j.model, j.training) == ("multimodn", "centralized") else set()
        assert run_files(out, j) == {"info.json", "records.json"} | models | explained
    # metrics.json is every run's records.json, in plan order; results.csv holds the same rows
    records = json.loads((out / "metrics.json").read_text())
    assert records == [r for j in jobs for r in json.loads((out / "runs" / j.key / "records.json").read_text())]
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == len(records) and list(csv["value"]) == pytest.approx(
        [float("nan") if r["value"] is None else r["value"] for r in records], nan_ok=True)  # JSON writes NaN as null
    assert {r["condition"] for r in records} == {"clean", "scenario", "mnar_flipped"}
    assert {r["missingness.0.fraction"] for r in records} == {0.0, 0.8}
    assert {r["site"] for r in records if r["training"] == "local"} == {"site1", "site2"}
    for j in jobs:  # every job is scored on every test condition
        mine = [r for r in records if (r["point"], r["model"], r["training"], r["seed"]) == (j.point, j.model, j.training, j.seed)]
        assert {r["condition"] for r in mine} == {"clean", "scenario", "mnar_flipped"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # sweep curve, availability, IMC, CP...
    # the report's numbers are the records' means
    tab = summarize(records, ["missingness.0.fraction"], task="outcome", metric="auroc")
    row = tab[(tab["model"] == "multimodn") & (tab["training"] == "centralized") & (tab["condition"] == "clean")].iloc[0]
    assert f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" in html
    # resumable: a run whose info.json says done is not redone; one without it (interrupted) is
    unfinished = jobs[5]
    (out / "runs" / unfinished.key / "info.json").unlink()
    mtimes = {j.key: (out / "runs" / j.key / "records.json").stat().st_mtime_ns for j in jobs}
    again = run_scenario(scenario, out, workers=1, progress=False)
    assert (again["jobs"], again["done"]) == (16, 16)
    redone = {j.key for j in jobs if (out / "runs" / j.key / "records.json").stat().st_mtime_ns != mtimes[j.key]}
    assert redone == {unfinished.key}
    assert json.loads((out / "metrics.json").read_text()) == records  # seeded: the redone run gives the same records


def test_federated_run_is_the_federation_engines_model(scenario, tmp_path):
    raw = scenario.to_dict()
    raw.pop("sweep")
    raw["run"].update(training=["federated"], models=["multimodn"], seeds=[0], rounds=2, local_epochs=1)
    sc = Scenario.from_dict(raw, scenario.base_dir)
    out = tmp_path / "fed"
    summary = run_scenario(sc, out, workers=1, progress=False)
    assert (summary["jobs"], summary["done"], summary["failed"]) == (1, 1, []), summary
    (job, _), = plan(sc)
    run_dir = out / "runs" / job.key
    history = json.loads((run_dir / "federation" / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    saved = load_model(run_dir / "model.pt").model.state_dict()
    engine = load_model(run_dir / "federation" / "model.pt").model.state_dict()
    assert saved.keys() == engine.keys() and all(torch.equal(saved[k], engine[k]) for k in saved)
    records = json.loads((out / "metrics.json").read_text())
    assert {(r["training"], r["model"], r["seed"]) for r in records} == {("federated", "multimodn", 0)}
    assert {r["condition"] for r in records} == {"clean", "scenario", "mnar_flipped"}
    assert {r["site"] for r in records} == {"all", "site1", "site2"}
