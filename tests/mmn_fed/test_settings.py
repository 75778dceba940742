"""The one settings model: strict parsing, cross-field rules, the site record, flags and generated files."""
import argparse
import json
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from mmn_fed.settings import (DEFAULTS, SETTING, SETTINGS, SITE, SITE_RECORD_VERSION, RunSettings, SettingsError,
                              SiteSettings, add_flags, markdown, pyproject_table)

REPO = Path(__file__).resolve().parents[2]


def test_bools_parse_strictly_and_false_is_false():
    s = RunSettings.from_run_config({"keep-best": "false", "secure-aggregation": "True"})
    assert s.keep_best is False and s.secure_aggregation is True
    assert RunSettings(keep_best="false").keep_best is False
    with pytest.raises(SettingsError, match="keep-best: expected true or false, got 1"):
        RunSettings.from_run_config({"keep-best": 1})


@pytest.mark.parametrize("key, value, expected", [
    ("local-epochs", 0, "local-epochs: expected a value >= 1, got 0"),
    ("local-epochs", 1.0, "local-epochs: expected an integer, got 1.0"),
    ("local-epochs", True, "local-epochs: expected an integer, got True"),
    ("lr", 0.0, "lr: expected a value > 0, got 0.0"),
    ("lr", "0.1", "lr: expected a finite number, got '0.1'"),
    ("lr", float("nan"), "lr: expected a finite number"),
    ("val-fraction", 1.0, r"val-fraction: expected a value in \[0, 1\), got 1.0"),
    ("trim", 0.5, r"trim: expected a value in \[0, 0.5\), got 0.5"),
    ("dp-clip", 0.0, "dp-clip: expected a value > 0, got 0.0"),
    ("dp-delta", 1.0, r"dp-delta: expected a value in \(0, 1\), got 1.0"),
    ("dp-delta", 0, r"dp-delta: expected a value in \(0, 1\), got 0.0"),
    ("dp-noise-multiplier", -0.5, "dp-noise-multiplier: expected a value >= 0, got -0.5"),
    ("aggregation", "mode", "aggregation: unknown value 'mode'; expected one of mean, trimmed-mean, median"),
    ("model", "gpt", "model: unknown value 'gpt'"),
    ("tasks", 3, "tasks: expected a string, got 3"),
])
def test_a_wrong_type_or_range_names_the_setting_the_value_and_what_was_expected(key, value, expected):
    with pytest.raises(SettingsError, match=expected) as e:
        RunSettings.from_run_config({key: value})
    assert e.value.setting == key


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(SettingsError, match=r"local-epoch: unknown setting; known settings: num-server-rounds, local-epochs"):
        RunSettings.from_run_config({"local-epoch": 2})
    with pytest.raises(SettingsError, match="local_epoch: unknown setting; known settings: num_server_rounds, local_epochs"):
        RunSettings.from_kwargs(local_epoch=2)
    assert RunSettings.from_kwargs(local_epochs=2).local_epochs == 2


def test_a_float_setting_takes_an_int_as_float():
    s = RunSettings.from_run_config({"lr": 1, "node-wait": 5})
    assert s.lr == 1.0 and type(s.lr) is float and type(s.node_wait) is float


@pytest.mark.parametrize("values, names", [
    ({"secure-aggregation": True, "aggregation": "median"}, "secure-aggregation, aggregation"),
    ({"secure-aggregation": True, "aggregation": "trimmed-mean"}, "secure-aggregation, aggregation"),
    ({"keep-best": True, "val-fraction": 0.0}, "keep-best, val-fraction"),
])
def test_cross_field_rules_name_their_settings(values, names):
    s = RunSettings.from_run_config(values)  # each value is valid on its own
    with pytest.raises(SettingsError) as e:
        s.check()
    assert e.value.setting == names and str(e.value).startswith(names + ": ")


def test_valid_combinations_pass_the_rules():
    for values in ({}, {"secure-aggregation": True}, {"aggregation": "median"}, {"keep-best": True, "val-fraction": 0.1},
                   {"dp-noise-multiplier": 1.0, "secure-aggregation": True}):
        RunSettings.from_run_config(values).check()


def test_the_site_record_round_trips_and_holds_only_site_settings():
    s = RunSettings.from_run_config({"local-epochs": 3, "lr": 0.05, "audit-min-cell": 5, "dp-delta": 1e-6,
                                     "aggregation": "median"})
    record = json.loads(s.site_record())
    assert record["version"] == SITE_RECORD_VERSION
    assert set(record["values"]) == {x.name for x in SETTINGS if x.scope == SITE}
    site = SiteSettings.from_record(s.site_record())
    assert site == s.site()
    assert (site.local_epochs, site.lr, site.audit_min_cell, site.dp_delta) == (3, 0.05, 5, 1e-6)
    assert not hasattr(site, "aggregation")


def test_the_site_refuses_another_record_version_or_a_server_setting():
    record = json.loads(DEFAULTS.site_record())
    with pytest.raises(SettingsError, match="settings record version 2 is not the version this site reads"):
        SiteSettings.from_record(json.dumps({**record, "version": 2}))
    with pytest.raises(SettingsError, match="settings record version None"):
        SiteSettings.from_record(json.dumps(record["values"]))  # flat keys, as before the record existed
    with pytest.raises(SettingsError, match="aggregation: unknown setting"):
        SiteSettings.from_record(json.dumps({**record, "values": {**record["values"], "aggregation": "mean"}}))
    with pytest.raises(SettingsError, match="audit-min-cell: expected an integer"):
        SiteSettings.from_record(json.dumps({**record, "values": {**record["values"], "audit-min-cell": "yes"}}))


def test_pyproject_run_config_equals_the_defaults():
    text = (REPO / "pyproject.toml").read_text()
    table = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert table == DEFAULTS.to_run_config()
    assert list(table) == [s.name for s in SETTINGS]
    assert pyproject_table() in text  # regenerated, not edited: `mmn-fed settings --write`


def test_docs_table_is_the_generated_one():
    assert (REPO / "docs" / "settings.md").read_text() == markdown()
    for s in SETTINGS:
        assert f"| `{s.name}` | `{s.field}` |" in markdown()


def test_flags_come_from_the_declaration():
    p = argparse.ArgumentParser()
    names = [s.name for s in SETTINGS]
    add_flags(p, names, aliases={"num-server-rounds": "--rounds"})
    assert RunSettings.from_args(p.parse_args([]), names) == DEFAULTS
    args = p.parse_args(["--rounds", "3", "--keep-best", "--missingness", "off", "--lr", "0.1",
                         "--aggregation", "median", "--val-fraction", "0.3"])
    s = RunSettings.from_args(args, names)
    assert (s.num_server_rounds, s.keep_best, s.missingness, s.lr, s.aggregation) == (3, True, "off", 0.1, "median")
    with pytest.raises(SystemExit):
        p.parse_args(["--aggregation", "mode"])
    with pytest.raises(SettingsError, match="trim: expected a value in"):
        RunSettings.from_args(p.parse_args(["--trim", "0.7"]), names)
    helps = {a.dest: a.help for a in p._actions}
    assert helps["trim"].startswith(SETTING["trim"].doc) and "[0, 0.5)" in helps["trim"]


def test_fingerprint_changes_fill_missing_keys_with_defaults():
    s = RunSettings.from_kwargs(lr=0.1)
    old = {k: v for k, v in DEFAULTS.fingerprint().items() if k not in ("aggregation", "dp_clip")}  # older format
    assert DEFAULTS.fingerprint_changes(old) == []
    assert s.fingerprint_changes(old) == ["lr: 0.003 -> 0.1"]
    assert RunSettings.from_kwargs(num_server_rounds=99, run_dir="x").fingerprint_changes(old) == []  # resumable
    assert DEFAULTS.fingerprint_changes({**old, "gone": 1}) == ["gone: not a setting any more"]


def test_train_and_model_config_defaults_are_the_settings_defaults():
    from mmn_fed.model import ModelConfig
    from mmn_fed.training import TrainConfig

    tc = TrainConfig()
    shared = [f.name for f in fields(TrainConfig) if f.name in SETTING_FIELDS]
    assert set(shared) >= {"lr", "batch_size", "weight_decay", "grad_clip", "seed", "val_fraction", "missingness",
                          "audit_min_cell"}
    assert all(getattr(tc, f) == getattr(DEFAULTS, f) for f in shared)
    assert ModelConfig.from_settings(DEFAULTS) == ModelConfig()
    custom = RunSettings.from_kwargs(lr=0.5, batch_size=64, model="pfusion", hidden=7)
    assert (TrainConfig.from_settings(custom, epochs=3).lr, TrainConfig.from_settings(custom).batch_size) == (0.5, 64)
    assert ModelConfig.from_settings(custom) == ModelConfig(kind="pfusion", hidden=7)


SETTING_FIELDS = {s.field for s in SETTINGS}


def test_write_regenerates_both_files_and_keeps_the_rest_of_pyproject(tmp_path, capsys):
    from mmn_fed.cli import main
    from mmn_fed.settings import write_generated

    (tmp_path / "docs").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.flwr.app.config]\nlr = 9.0\nold-key = 1\n\n'
                                             '[tool.other]\nkeep = true\n')
    write_generated(tmp_path)
    data = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert data["tool"]["flwr"]["app"]["config"] == DEFAULTS.to_run_config()
    assert data["project"] == {"name": "x"} and data["tool"]["other"] == {"keep": True}
    assert (tmp_path / "docs" / "settings.md").read_text() == markdown()
    assert main(["settings", "--pyproject"]) == 0 and capsys.readouterr().out == pyproject_table()
