"""The report reads what the runner wrote: the availability tables come from ``availability.json``."""
import json

import pandas as pd
import pytest

from mmn_fed import make_synthetic
from simulations.report import AVAILABILITY, write_report
from simulations.runner import availability_tables, prepare
from simulations.scenario import Scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    df, schema = make_synthetic(n=300, modalities={"a": 2, "b": 2}, seed=0)
    df.to_csv(d / "cohort.csv", index=False)
    mods = "\n".join(f'{m} = {list(cols)!r}'.replace("'", '"') for m, cols in schema.modalities.items())
    (d / "schema.toml").write_text(f'[modalities]\n{mods}\n[tasks.outcome]\ncolumn = "outcome"\nkind = "binary"\n'
                                   'threshold = 0\n')
    raw = {"scenario": {"name": "avail"}, "data": {"csv": "cohort.csv", "schema": "schema.toml", "tasks": ["outcome"]},
           "sites": {"iid": 2},
           "missingness": [{"modality": "b", "mechanism": "mcar", "fraction": 1.0, "sites": ["site1"], "phase": "train"}],
           "test": {"conditions": ["clean"]}, "run": {"models": ["multimodn"], "training": ["centralized"], "seeds": [0]}}
    return Scenario.from_dict(raw, d)


def test_availability_tables_describe_the_prepared_rows(scenario):
    data = prepare(scenario, 0)
    tables = {t["title"]: pd.DataFrame(**t["table"]) for t in json.loads(json.dumps(availability_tables(scenario)))}
    assert list(tables) == ["training rows (scenario)", "test rows, condition clean (scenario)"]
    train = tables["training rows (scenario)"]
    assert train["rows"].to_dict() == pd.Series(data.train_sites).value_counts().to_dict()
    assert train.loc["site1", "b"] == 0.0 and train.loc["site2", "b"] == 1.0  # the rule removed b at site1 only
    assert (tables["test rows, condition clean (scenario)"][["a", "b"]] == 1.0).all().all()


def test_the_report_shows_the_tables_it_finds_and_refuses_to_guess(scenario, tmp_path):
    table = pd.DataFrame({"rows": [7, 9], "a": [1.0, 0.25], "b": [0.5, 1.0]}, index=["north", "south"])
    (tmp_path / AVAILABILITY).write_text(json.dumps([{"title": "test rows, condition clean (here)",
                                                      "table": table.to_dict(orient="split")}]))
    html = (write_report(scenario, tmp_path, [], {}, {"done": 0, "jobs": 0})).read_text()
    assert "<h4>test rows, condition clean (here)</h4>" in html
    assert "<tr><td>south</td><td>9</td><td>25%</td><td>100%</td></tr>" in html
    (tmp_path / AVAILABILITY).unlink()
    with pytest.raises(FileNotFoundError, match=AVAILABILITY):
        write_report(scenario, tmp_path, [], {}, {"done": 0, "jobs": 0})


def test_seed_intervals_stay_inside_the_metric_range():
    """Three seeds near 1 (and near 0): a t interval left [0, 1] (1.062, -0.095); the bootstrap cannot."""
    from simulations.report import summarize

    base = {"model": "multimodn", "training": "local", "condition": "clean", "task": "t", "metric": "auroc",
            "state": "final", "combination": "all"}
    records = [{**base, "site": s, "seed": i, "value": v} for s, vals in (("a", [1.0, 0.93, 1.0]), ("b", [0.0, 0.1, 0.02]))
               for i, v in enumerate(vals)]
    table = summarize(records, site=None).set_index("site")
    for s, vals in (("a", [1.0, 0.93, 1.0]), ("b", [0.0, 0.1, 0.02])):
        eps = 1e-12  # a mean of equal values may round one ulp past them
        assert min(vals) - eps <= table.loc[s, "ci_low"] <= table.loc[s, "mean"] <= table.loc[s, "ci_high"] <= max(vals) + eps
        assert table.loc[s, "ci_low"] < table.loc[s, "ci_high"]
