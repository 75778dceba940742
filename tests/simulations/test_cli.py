"""`mmn-fed simulate` is registered through mmn_fed.cli's plugin table."""
import json

from mmn_fed.cli import main


def test_simulate_check_and_list(capsys):
    assert main(["simulate", "--check"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["scenario"] == "default" and plan["runs"] >= 4
    assert main(["simulate", "--list"]) == 0
    assert "exp4-mnar" in capsys.readouterr().out


def test_simulate_bad_scenario_is_a_clean_error(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nbuiltin = "heart"\n[sites]\nby = "dataset"\n[[missingness]]\nmodality = "xray"\n'
                   'mechanism = "mcar"\nfraction = 0.5\n')
    assert main(["simulate", str(bad)]) == 2
    assert "missingness.0.modality: unknown modality 'xray'" in capsys.readouterr().err
