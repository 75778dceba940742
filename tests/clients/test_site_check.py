"""mmn-fed site check: the pre-flight a site runs on its own data (clients/site_check.py; the `site` group: clients/audit.py)."""
import argparse

import pytest

from clients.site_check import check_site, read_units
from clients.audit import register
from mmn_fed import load_builtin

SCHEMA = "mmn_fed/builtin/heart/schema.toml"


@pytest.fixture
def cleveland(tmp_path):
    df, _ = load_builtin("heart")
    rows = df[df.dataset == "Cleveland"].reset_index(drop=True)
    path = tmp_path / "site.csv"
    rows.to_csv(path, index=False)
    return rows, path


def test_a_clean_site_passes_and_reports_rows_per_modality(cleveland):
    rows, path = cleveland
    rep = check_site(path, SCHEMA)
    assert rep.ok, rep.errors
    text = rep.text()
    assert f"{len(rows)} rows" in text and "rows per modality: demographics" in text and "site check: OK" in text


def test_values_outside_the_declared_range_are_named_by_column_and_line(cleveland, tmp_path):
    rows, path = cleveland
    units = tmp_path / "units.toml"
    units.write_text('[trestbps]\nunit = "mmHg"\nmin = 60\nmax = 250\n[chol]\nunit = "mmol/L"\nmin = 1\nmax = 20\n')
    assert read_units(units)["chol"] == {"unit": "mmol/L", "min": 1, "max": 20}
    rep = check_site(path, SCHEMA, units_path=units)
    assert not rep.ok
    [err] = [e for e in rep.errors if "'chol'" in e]
    first = rows.index[(rows.chol > 20)][0]
    assert "outside the declared range [1, 20] mmol/L (another unit?)" in err and f"line {first + 2} " in err
    assert not [e for e in rep.errors if "'trestbps'" in e]
    units.write_text('[chol]\nunits = "mg/dL"\n')
    with pytest.raises(ValueError, match=r"column 'chol': unknown key\(s\) \['units'\]"):
        read_units(units)


def test_missing_columns_and_non_numeric_values_are_errors(cleveland, tmp_path):
    rows, _ = cleveland
    bad = rows.drop(columns=["thal"]).astype({"oldpeak": object})
    bad.loc[3, "oldpeak"] = "1,5"
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    rep = check_site(path, SCHEMA)
    assert any("'thal' (modality" in e and "bad.csv" in e for e in rep.errors)
    [err] = [e for e in rep.errors if "'oldpeak'" in e]
    assert "numeric column 'oldpeak': 1 non-numeric value(s): line 5 of " in err and "bad.csv (data row 4) ('1,5')" in err


def test_what_the_policy_would_suppress(cleveland, tmp_path):
    _, path = cleveland
    pol = tmp_path / "policy.toml"
    pol.write_text('min_cell = 10\nallowed_modalities = ["demographics", "symptoms", "rest", "exercise_ecg"]\n'
                   'epsilon_ceiling = 5.0\n')
    rep = check_site(path, SCHEMA, policy_path=pol)
    assert rep.ok, rep.errors
    text = "\n".join(rep.suppressed)
    assert "encoders.imaging: modality not in allowed_modalities" in text
    assert "summary: column" in text and "(fewer than 10 rows)" in text
    assert "missingness audit:" in text
    assert any("privacy budget 0 of epsilon 5 spent" in i for i in rep.info)
    pol.write_text('allowed_columns = ["age"]\n')
    rep = check_site(path, SCHEMA, policy_path=pol)
    assert any("would refuse this schema's summary" in e for e in rep.errors)


def test_the_site_group_registers_check(cleveland, capsys):
    _, path = cleveland
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["site", "check", "--data", str(path), "--schema", SCHEMA])
    assert args.func(args) == 0
    assert "site check: OK" in capsys.readouterr().out
