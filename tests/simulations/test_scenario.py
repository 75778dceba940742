"""Scenario loading: valid files load (shipped ones too); each invalid value is named by its dotted key."""
import copy

import pytest

from simulations.scenario import Scenario, ScenarioError, load, resolve, shipped

BASE = {
    "data": {"builtin": "heart", "tasks": ["disease"]},
    "sites": {"by": "dataset"},
    "missingness": [{"modality": "exercise_ecg", "mechanism": "mnar", "task": "disease", "label": 1,
                     "fraction": 0.8, "sites": ["Cleveland"]}],
    "test": {"conditions": ["clean", "mnar_flipped"]},
    "run": {"models": ["multimodn", "pfusion"], "training": ["centralized"], "seeds": [0, 1]},
    "sweep": {"missingness.0.fraction": [0.0, 0.5, 0.8]},
}


def with_(path, value):
    raw = copy.deepcopy(BASE)
    node = raw
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return raw


DELETE = object()


def test_valid_scenario_and_sweep_points():
    sc = Scenario.from_dict(BASE)
    assert list(sc.schema.tasks) == ["disease"]
    assert sc.rules[0].sites == ("Cleveland",) and sc.rules[0].fraction == 0.8
    points = sc.points()
    assert [v for v, _ in points] == [{"missingness.0.fraction": f} for f in (0.0, 0.5, 0.8)]
    assert [p.rules[0].fraction for _, p in points] == [0.0, 0.5, 0.8]


@pytest.mark.parametrize("path,value,key", [
    ("missingness.0.fraction", 1.5, "missingness.0.fraction"),
    ("missingness.0.modality", "xray", "missingness.0.modality"),
    ("missingness.0.mechanism", "mnra", "missingness.0.mechanism"),
    ("missingness.0.label", 2, "missingness.0.label"),
    ("missingness.0.task", "severityy", "missingness.0.task"),
    ("missingness.0.colour", "red", "missingness.0.colour"),
    ("missingness.0.column", "age", "missingness.0.column"),
    ("missingness.0.phase", "later", "missingness.0.phase"),
    ("test.conditions", ["clean", "dirty"], "test.conditions"),
    ("test.fraction", 0.99, "test.fraction"),
    ("run.models", ["multimodn", "transformer"], "run.models"),
    ("run.training", ["federated", "swarm"], "run.training"),
    ("run.seeds", [0, 0], "run.seeds"),
    ("run.rounds", 0, "run.rounds"),
    ("run.engine", "spark", "run.engine"),
    ("run.ray_address", "10.0.0.1:6379", "run.ray_address"),  # engine inprocess (BASE's): not for it
    ("run.ray_address", 6379, "run.ray_address"),
    ("run.colour", 1, "run.colour"),
    ("data.builtin", "mimic", "data.builtin"),
    ("data.tasks", ["nope"], "data.tasks"),
    ("sites.iid", 3, "sites"),
    ("sites.dirichlet", {"n": 3, "alpha": 0.5}, "sites"),
    ("sweep", {"missingness.3.fraction": [0.1]}, 'sweep."missingness.3.fraction"'),
    ("sweep", {"missingness.0.fraction": [0.1, 2.0]}, 'sweep."missingness.0.fraction" = 2.0: missingness.0.fraction'),
    ("sweep", {"run.rounds": 5}, 'sweep."run.rounds"'),
    ("bogus", {}, "bogus"),
])
def test_errors_name_the_bad_key(path, value, key):
    with pytest.raises(ScenarioError) as e:
        Scenario.from_dict(with_(path, value))
    assert str(e.value).startswith(key), str(e.value)


def test_ray_address_goes_with_the_ray_engine():
    sc = Scenario.from_dict({**BASE, "run": {**BASE["run"], "engine": "ray", "ray_address": "10.0.0.1:6379"}})
    assert (sc.run.engine, sc.run.ray_address) == ("ray", "10.0.0.1:6379")
    assert Scenario.from_dict(BASE).run.ray_address == ""


def test_rule_specific_errors():
    mar = {"modality": "exercise_ecg", "mechanism": "mar", "fraction": 0.5, "column": "thalch"}
    with pytest.raises(ScenarioError, match=r"^missingness\.0\.column: .*self_masking"):
        Scenario.from_dict({**BASE, "missingness": [mar], "test": {}, "sweep": {}})
    selfm = {**mar, "mechanism": "self_masking", "column": "age"}
    with pytest.raises(ScenarioError, match=r"^missingness\.0\.column: .*own values"):
        Scenario.from_dict({**BASE, "missingness": [selfm], "test": {}, "sweep": {}})
    absent = {"modality": "imaging", "mechanism": "absent", "fraction": 0.5}
    with pytest.raises(ScenarioError, match=r"^missingness\.0\.fraction"):
        Scenario.from_dict({**BASE, "missingness": [absent], "test": {}, "sweep": {}})
    with pytest.raises(ScenarioError, match=r"^test\.conditions: 'mnar_flipped' needs"):
        Scenario.from_dict({**BASE, "missingness": [], "sweep": {}})
    d = {**BASE, "sites": {"dirichlet": {"n": 3, "alpha": 0.5, "task": "nope"}}}
    with pytest.raises(ScenarioError, match=r"^sites\.dirichlet\.task"):
        Scenario.from_dict(d)


def test_data_level_errors_name_the_key(tmp_path):
    from simulations.runner import prepare

    raw = with_("missingness.0.sites", ["Atlantis"])
    sc = Scenario.from_dict({k: v for k, v in raw.items() if k != "sweep"})
    with pytest.raises(ScenarioError, match=r"^missingness\.0\.sites: unknown site 'Atlantis'"):
        prepare(sc, 0)
    raw = with_("test.holdout_sites", ["Nowhere"])
    sc = Scenario.from_dict({k: v for k, v in raw.items() if k != "sweep"})
    with pytest.raises(ScenarioError, match=r"^test\.holdout_sites"):
        prepare(sc, 0)


def test_toml_file_and_names(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[data]\nbuiltin = "heart"\n[sites]\niid = 3\n[run]\nmodels = ["multimodn"]\nfancy = 1\n')
    with pytest.raises(ScenarioError, match=r"^run\.fancy: unknown key"):
        Scenario.from_toml(p)
    p.write_text("[data\n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        Scenario.from_toml(p)
    with pytest.raises(ScenarioError, match="unknown scenario 'exp9'"):
        resolve("exp9")


def test_every_shipped_scenario_loads():
    names = shipped()
    assert {"default", "exp4-mnar"} <= set(names)
    for name in names:
        sc = load(name)
        assert sc.points()


def test_run_takes_every_run_setting_by_its_snake_case_name():
    run = {**BASE["run"], "aggregation": "median", "val_fraction": 0.1, "keep_best": True, "rounds": 7, "lr": 0.01,
           "missingness": {"pfusion": "off"}, "grad_clip": 0.5}
    sc = Scenario.from_dict({**BASE, "run": run})
    s = sc.run.settings
    assert (s.aggregation, s.val_fraction, s.keep_best, s.num_server_rounds, s.lr) == ("median", 0.1, True, 7, 0.01)
    assert s.local_epochs == 2  # the scenarios' own default
    job = sc.run.settings_for("multimodn", seed=3)
    assert (job.model, job.seed, job.missingness) == ("multimodn", 3, "auto")
    assert sc.run.settings_for("pfusion", seed=3).missingness == "off"

    from simulations.runner import _configs

    mc, tc = _configs(sc, "pfusion", 4)
    assert (mc.kind, tc.lr, tc.seed, tc.missingness, tc.epochs) == ("pfusion", 0.01, 4, "off", sc.run.epochs)
    assert tc.grad_clip == 0.5


@pytest.mark.parametrize("key, value, message", [
    ("trim", 0.7, r"^run\.trim: expected a value in \[0, 0\.5\), got 0\.7"),
    ("keep_best", "yes", r"^run\.keep_best: expected true or false, got 'yes'"),
    ("local_epochs", 1.5, r"^run\.local_epochs: expected an integer"),
    ("model", "pfusion", r"^run\.model: set by run\.models"),
    ("num_server_rounds", 3, r"^run\.num_server_rounds: set by run\.rounds"),
    ("data_dir", "x", r"^run\.data_dir: set by the runner"),
    ("local-epochs", 2, r"^run\.local-epochs: unknown key"),
])
def test_run_setting_errors_name_the_run_key(key, value, message):
    with pytest.raises(ScenarioError, match=message):
        Scenario.from_dict(with_(f"run.{key}", value))
