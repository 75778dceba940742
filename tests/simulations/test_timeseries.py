"""Time-series scenarios: sites, splits and missingness by subject; missingness in time; metrics over time."""
import json

import numpy as np
import pandas as pd
import pytest

from mmn_fed import load_builtin
from mmn_fed.data import derive_labels
from simulations.missingness import MissingnessRule
from simulations.runner import prepare, run_scenario
from simulations.scenario import Scenario, ScenarioError
from simulations.sites import SitePlan
from simulations.timeseries import drop_visits, evaluate_sequences, subject_sites, time_edges, visit_rank

TASK = "death_or_transplant_2y"


@pytest.fixture(scope="module")
def pbcseq():
    return load_builtin("pbcseq")


def _outcome(df, schema):
    """Each row's subject outcome (the event during follow-up)."""
    v, _ = derive_labels(schema, df)[TASK]
    return v.astype(int)


def test_fewer_visits_thins_only_the_chosen_subjects_and_keeps_every_first_visit(pbcseq):
    df, schema = pbcseq
    rule = MissingnessRule(None, "fewer_visits", 0.6, TASK, 0)
    sites = np.full(len(df), "a")
    keep = drop_visits(df, schema, (rule,), sites, seed=1, phase="train")
    codes = pd.factorize(df["id"])[0]
    rank = visit_rank(codes, df["day"].to_numpy(float))
    y = _outcome(df, schema)
    assert keep[rank == 0].all()  # a subject never disappears
    assert keep[y == 1].all()  # subjects with the event keep every visit
    later_healthy = (y == 0) & (rank > 0)
    assert abs((~keep[later_healthy]).mean() - 0.6) < 0.05
    flipped = drop_visits(df, schema, (rule,), sites, seed=1, phase="test", flip=True)
    assert flipped[y == 0].all() and abs((~flipped[(y == 1) & (rank > 0)]).mean() - 0.6) < 0.07


def test_dropout_removes_the_last_visits_of_a_share_of_the_subjects(pbcseq):
    df, schema = pbcseq
    rule = MissingnessRule(None, "dropout", 0.5, TASK, 1)
    keep = drop_visits(df, schema, (rule,), np.full(len(df), "a"), seed=0, phase="train")
    y = _outcome(df, schema)
    part = pd.DataFrame({"id": df["id"], "day": df["day"], "keep": keep, "y": y}).sort_values(["id", "day"])
    for _, g in part.groupby("id"):
        k = g["keep"].to_numpy()
        assert k[0]  # at least the first visit
        assert (np.diff(k.astype(int)) <= 0).all()  # a kept prefix: only the last visits go missing
        if g["y"].iloc[0] == 0:
            assert k.all()
    lost = part.groupby("id").agg(lost=("keep", lambda k: not k.all()), y=("y", "first"))
    at_risk = lost[lost["y"] == 1]
    # a subject who drops out after its last visit loses nothing, so slightly under half lose visits
    assert 0.3 < at_risk["lost"].mean() <= 0.6


def _shifted(df, seed=0):
    """The table with every subject's clock shifted (pbcseq's visits all start at day 0): windows and elapsed
    times are then since the subject's first visit, not since time 0."""
    offset = df["id"].map(dict(zip(df["id"].unique(), np.random.default_rng(seed).integers(0, 5000, df["id"].nunique()))))
    return df.assign(day=df["day"] + offset, futime=df["futime"] + offset)


def test_sampling_keeps_one_visit_per_window_at_the_named_site_only(pbcseq):
    df, schema = pbcseq
    df = _shifted(df)
    ids = df["id"].unique()
    sites = np.where(df["id"].isin(ids[: len(ids) // 2]), "yearly", "often")
    rule = MissingnessRule(None, "sampling", sites=("yearly",), every=365.0)
    keep = drop_visits(df, schema, (rule,), sites, seed=0, phase="train")
    assert keep[sites == "often"].all()
    kept = df[keep & (sites == "yearly")].copy()
    first = df.groupby("id")["day"].transform("min")[keep & (sites == "yearly")]
    kept["window"] = np.floor((kept["day"] - first) / 365)
    assert not kept.duplicated(["id", "window"]).any()
    # every window a subject had a visit in still has one
    every = df[sites == "yearly"].assign(window=np.floor((df["day"] - df.groupby("id")["day"].transform("min")) / 365))
    assert len(kept) == len(every.drop_duplicates(["id", "window"]))


def test_a_subject_stays_at_one_site_and_a_site_column_may_not_change_within_a_subject(pbcseq):
    df, schema = pbcseq
    sites = subject_sites(df, schema, SitePlan(iid=3, seed=0))
    assert pd.Series(sites).groupby(df["id"].to_numpy()).nunique().max() == 1
    assert set(sites) == {"site1", "site2", "site3"}
    bad = df.assign(hospital=np.where(np.arange(len(df)) == 5, "B", "A"))
    with pytest.raises(ValueError, match=r"changes within subject .2. \(data row 6\)"):
        subject_sites(bad, schema, SitePlan(by="hospital"))


SMALL_RUN = {"models": ["multimodn"], "training": ["centralized"], "seeds": [0], "epochs": 3, "state_size": 8,
             "hidden": 8}


def _scenario(**over):
    raw = {"scenario": {"name": "ts"}, "data": {"builtin": "pbcseq"}, "sites": {"iid": 3},
           "missingness": [{"mechanism": "fewer_visits", "task": TASK, "label": 0, "fraction": 0.8},
                           {"mechanism": "sampling", "every": 365, "sites": ["site4"], "phase": "test"}],
           "test": {"conditions": ["clean", "scenario", "mnar_flipped"]}, "run": dict(SMALL_RUN)}
    raw.update(over)
    return Scenario.from_dict(raw)


def test_subjects_are_split_whole_and_a_deployment_site_only_tests(pbcseq):
    sc = _scenario(sites={"iid": 4}, test={"conditions": ["clean", "scenario"], "holdout_sites": ["site4"]})
    data = prepare(sc, 0)
    train_ids = set(data.train["id"])
    test_ids = set(data.tests["clean"]["id"])
    assert not train_ids & test_ids
    assert "site4" not in set(data.train_sites)
    held = set(data.tests["clean"]["id"][data.sites_for("clean") == "site4"])
    assert held and held <= test_ids
    # the deployment site measures yearly (phase test): its scenario test rows lost visits, the others' did not
    scen = data.tests["scenario"]
    for site, frame in ((s, scen[data.sites_for("scenario") == s]) for s in ("site1", "site4")):
        clean = data.tests["clean"][data.sites_for("clean") == site]
        n_healthy_clean = len(clean)
        assert len(frame) < n_healthy_clean if site == "site4" else len(frame) <= n_healthy_clean


@pytest.mark.parametrize("rule, message", [
    ({"mechanism": "sampling"}, r"missingness\.0\.every: required"),
    ({"mechanism": "fewer_visits", "fraction": 0.5, "modality": "labs"}, r"missingness\.0\.modality: does not apply"),
    ({"mechanism": "dropout", "fraction": 0.5, "task": TASK}, r"missingness\.0\.label: give task and label together"),
    ({"mechanism": "dropout"}, r"missingness\.0\.fraction: required"),
    ({"mechanism": "sampling", "every": 0}, r"missingness\.0\.every: expected a value in"),
])
def test_time_rules_are_validated_with_the_key_at_fault(rule, message):
    with pytest.raises(ScenarioError, match=message):
        _scenario(missingness=[rule], test={"conditions": ["clean"]})


def test_a_time_mechanism_on_a_static_schema_is_refused():
    raw = {"data": {"builtin": "heart"}, "sites": {"by": "dataset"},
           "missingness": [{"mechanism": "fewer_visits", "fraction": 0.5}]}
    with pytest.raises(ScenarioError, match=r"missingness\.0\.mechanism: 'fewer_visits' removes visits.*no \[timeseries\]"):
        Scenario.from_dict(raw)


def test_time_bins_default_to_quintiles_of_the_data_and_can_be_given(pbcseq):
    df, schema = pbcseq
    edges = time_edges(schema, df)
    assert edges[0] == 0.0 and edges[-1] == float("inf") and len(edges) == 6 and edges == sorted(edges)
    assert time_edges(schema, df, (0.0, 365.0, 730.0)) == [0.0, 365.0, 730.0]
    with pytest.raises(ScenarioError, match=r"test\.time_bins: expected increasing numbers"):
        _scenario(test={"conditions": ["clean"], "time_bins": [5, 1]})


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A small time-series scenario run end to end (centralized: seconds)."""
    out = tmp_path_factory.mktemp("ts-report")
    sc = _scenario(sites={"iid": 4}, test={"conditions": ["clean", "mnar_flipped"], "holdout_sites": ["site4"],
                                           "time_bins": [0, 365, 1095, 100000]})
    summary = run_scenario(sc, out, workers=1, progress=False)
    assert summary["done"] == summary["jobs"] == 1, summary
    return out


def test_a_time_series_scenario_scores_steps_overall_and_per_time_since_the_first_observation(report_dir):
    from mmn_fed.metrics import task_metrics
    from mmn_fed.model_io import load_model
    from mmn_fed.sequences import build_sequences, encode_sequences, predict_steps

    records = json.loads((report_dir / "metrics.json").read_text())
    records = records["records"] if isinstance(records, dict) else records
    auroc = [r for r in records if r["metric"] == "auroc" and r["condition"] == "clean"]
    overall = [r for r in auroc if r.get("time_from") is None]
    bins = sorted((r for r in auroc if r.get("time_from") is not None), key=lambda r: r["time_from"])
    assert len(overall) == 1 and overall[0]["unit"] == "step"
    assert [(r["time_from"], r["time_to"]) for r in bins] == [(0, 365), (365, 1095), (1095, 100000)]
    assert sum(r["n"] for r in bins) == overall[0]["n"]  # every labelled test step is in one bin
    # the bin's value is the metric of the model's predictions on those steps (recomputed here)
    sc = Scenario.from_dict(json.loads((report_dir / "scenario.json").read_text()))
    data = prepare(sc, 0)
    run = next((report_dir / "runs").iterdir())
    trained = load_model(run / "model.pt")
    # on the same subjects with their clocks shifted (same steps and targets), recomputed here
    frame = _shifted(data.tests["clean"], seed=3)
    again = evaluate_sequences(trained, sc.schema, frame, {"condition": "clean"}, [0, 365, 1095, 100000])
    again = [r for r in again if r["metric"] == "auroc"]
    assert again[0]["value"] == pytest.approx(overall[0]["value"], abs=1e-9)
    seqs = build_sequences(sc.schema, frame)
    enc = encode_sequences(trained.preprocessor, seqs, sc.schema.timeseries.step_modalities)
    p = predict_steps(trained.model, enc, trained.preprocessor.targets, trained.preprocessor.schema)[TASK]
    ok = enc.rows.y_present[TASK].numpy()
    first = seqs.steps.groupby(sc.schema.timeseries.id)["step_time"].transform("min").to_numpy()
    elapsed = seqs.steps["step_time"].to_numpy() - first
    for r, (lo, hi) in zip(again[1:], [(0, 365), (365, 1095), (1095, 100000)]):
        sel = ok & (elapsed >= lo) & (elapsed < hi)
        expected = task_metrics("binary", enc.rows.y[TASK].numpy()[sel], p[sel])["auroc"]
        assert (r["time_from"], r["time_to"], r["n"]) == (lo, hi, int(sel.sum()))
        assert r["value"] == pytest.approx(expected, abs=1e-9)
        assert r["value"] == pytest.approx(bins[[b["time_from"] for b in bins].index(lo)]["value"], abs=1e-9)


@pytest.fixture(scope="module")
def shipped_report(tmp_path_factory):
    """The shipped time-series MNAR scenario, as listed by `mmn-fed simulate --list`, shrunk to one seed, two
    rounds and a small state (both sweep points, both models, federated)."""
    from simulations.scenario import load, shipped

    assert "timeseries-mnar" in shipped()
    sc = load("timeseries-mnar")
    raw = sc.to_dict()
    raw["run"].update(seeds=[0], rounds=2, state_size=8, hidden=8)
    out = tmp_path_factory.mktemp("ts-shipped")
    summary = run_scenario(Scenario.from_dict(raw, sc.base_dir), out, workers=2, progress=False)
    assert summary["done"] == summary["jobs"] == 4, summary
    return out


def test_the_time_series_report_renders_in_a_headless_browser(shipped_report, browser_page):
    """The shipped scenario's report opens in a real Chromium: every figure decodes; the over-time figure of
    each sweep point and the over-time table (both models, both test conditions) are there."""
    page, errors = browser_page
    page.set_viewport_size({"width": 1024, "height": 768})
    page.goto((shipped_report / "report.html").as_uri())
    images = page.evaluate("() => Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    headings = page.evaluate("() => Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    captions = page.evaluate("() => Array.from(document.querySelectorAll('figcaption')).map(c => c.textContent)")
    body = page.evaluate("() => document.body.innerText")
    over_time = page.evaluate("""() => {
        const h = Array.from(document.querySelectorAll('h2')).find(x => x.textContent.includes('over time'));
        const rows = Array.from(h.nextElementSibling.querySelectorAll('tbody tr'));
        return rows.map(r => Array.from(r.cells).map(c => c.textContent));
    }""")
    assert not errors
    assert images and all(done and width > 100 for _, done, width in images), images
    assert any("over time since the first observation" in h for h in headings), headings
    timed = [c for c in captions if "against the time since the subject's first observation" in c]
    assert len(timed) == 2 and any("fraction = 0.8" in c for c in timed), captions  # one per sweep point
    cells = {(r[1], r[3]) for r in over_time}  # (model, condition)
    assert cells == {(m, c) for m in ("multimodn", "pfusion") for c in ("clean", "mnar_flipped")}, over_time
    assert len(over_time) == 2 * 2 * 2 * 5  # sweep points x models x conditions x the scenario's 5 time bins
    assert {r[6] for r in over_time} == {"0–365", "365–730", "730–1460", "1460–2920", "≥ 2920"}
    # what each model did about missingness: MultiModN balanced the visit rate (the default), P-Fusion nothing
    assert "multimodn (federated): missingness = auto; presence balanced against the label for: the visit rate" in body
    assert "pfusion (federated): missingness = off; presence balanced against the label for: nothing" in body
