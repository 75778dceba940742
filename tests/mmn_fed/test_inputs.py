"""Honest training inputs (issue 10 item 6): what a new user gets wrong is refused with a message naming the
task, the file's row, the column; the explanation heatmaps are legible and say what their numbers mean."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmn_fed import load_builtin
from mmn_fed.api import train_centralized
from mmn_fed.cli import main
from mmn_fed.data import LabelError, encode, read_table
from mmn_fed.interpret import contrast_ratio, cp, cp_figure, imc, imc_figure
from mmn_fed.training import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = """
[modalities]
demographics = ["age", "sex"]
symptoms = ["cp"]
rest = ["trestbps", "chol", "fbs", "restecg"]
exercise_ecg = ["thalch", "exang", "oldpeak", "slope"]
imaging = ["ca", "thal"]
[tasks.disease]
column = "num"
kind = "binary"
{rule}
[columns]
categorical = ["sex", "cp", "fbs", "restecg", "exang", "slope", "thal"]
[sites]
column = "{site}"
"""


@pytest.fixture(scope="module")
def heart():
    return load_builtin("heart")[0]


def write(tmp_path, df, rule="threshold = 0", site="dataset", name="cohort.csv"):
    data, schema = tmp_path / name, tmp_path / "schema.toml"
    df.to_csv(data, index=False)
    schema.write_text(SCHEMA.format(rule=rule, site=site))
    return data, schema


def train(capsys, data, schema, out, *extra):
    rc = main(["train", "--dataset", str(data), "--schema", str(schema), "--out", str(out), "--epochs", "2",
               "--quiet", *extra])
    return rc, capsys.readouterr().err


# ---- labels that cannot train -----------------------------------------------------------

def test_one_class_labels_are_refused_naming_the_task_and_the_count(heart, tmp_path, capsys):
    data, schema = write(tmp_path, heart[heart["num"] > 0])
    rc, err = train(capsys, data, schema, tmp_path / "out")
    assert rc == 2
    n = int((heart["num"] > 0).sum())
    assert f"task 'disease': every labelled row is class 1 ({n} rows of {data}, class 1 = num > 0); " \
           "a classifier needs two classes" in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_positive_list_matching_no_label_says_which_labels_it_saw(heart, tmp_path, capsys):
    df = heart.assign(num=np.where(heart["num"] > 0, "Y", "N"))
    data, schema = write(tmp_path, df, rule='positive = ["yes"]')
    rc, err = train(capsys, data, schema, tmp_path / "out")
    assert rc == 2
    assert "task 'disease': positive = ['yes'] matches no label; labels seen: ['N', 'Y']" in err


def test_all_blank_labels_are_refused(heart, tmp_path, capsys):
    data, schema = write(tmp_path, heart.assign(num=np.nan))
    rc, err = train(capsys, data, schema, tmp_path / "out")
    assert rc == 2
    assert f"task 'disease': no row has a label (column 'num' is blank in all {len(heart)} rows of {data})" in err


def test_a_one_row_csv_is_refused_by_the_console_script(heart, tmp_path):
    """The real `mmn-fed` console script, as a new user runs it."""
    data, schema = write(tmp_path, heart.iloc[:1])
    exe = shutil.which("mmn-fed")
    assert exe, "the mmn-fed console script is not installed"
    res = subprocess.run([exe, "train", "--dataset", str(data), "--schema", str(schema), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2
    assert f"mmn-fed train: error: need at least 10 rows to train, got 1 row(s) of {data}" in res.stderr
    assert not (tmp_path / "o").exists()


def test_train_centralized_refuses_one_class_too(heart):
    _, schema = load_builtin("heart")
    with pytest.raises(LabelError, match=r"task 'disease': every labelled row is class 0 \(\d+ rows"):
        train_centralized(heart[heart["num"] == 0], schema.subset(tasks=["disease"]), train_config=TrainConfig(epochs=1))


def test_a_test_split_with_one_class_is_refused_not_scored(heart, tmp_path, capsys):
    """50 rows with 2 of class 1: the stratified 20% test split holds none of them, so no AUROC exists."""
    df = pd.concat([heart[heart["num"] == 0].iloc[:48], heart[heart["num"] > 0].iloc[:2]])
    data, schema = write(tmp_path, df)
    rc, err = train(capsys, data, schema, tmp_path / "out")
    assert rc == 2
    assert "the test split (--test-fraction 0.2) holds 10 rows and only class 0 (10 rows) of task 'disease'" in err
    # without a test split the same table trains, and says there is no test
    rc, err = train(capsys, data, schema, tmp_path / "out", "--test-fraction", "0", "--val-fraction", "0")
    assert rc == 0
    assert "no test split" in err and "no early stopping" in err


def test_a_validation_split_with_one_class_is_refused(heart):
    _, schema = load_builtin("heart")
    df = pd.concat([heart[heart["num"] == 0].iloc[:48], heart[heart["num"] > 0].iloc[:2]])
    with pytest.raises(LabelError, match=r"validation split \(val-fraction 0.2\) holds \d+ rows and only class 0"):
        train_centralized(df, schema.subset(tasks=["disease"]), train_config=TrainConfig(epochs=1, val_fraction=0.2))


def test_federation_refuses_pooled_one_class_before_round_1_but_not_one_site(heart, tmp_path):
    from server.engines import run_federation

    _, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    fast = dict(rounds=1, val_fraction=0.0, keep_best=False, patience_rounds=0, local_epochs=1, state_size=8, hidden=8)
    sick = {n: g.iloc[:40] for n, g in heart[heart["num"] > 0].groupby("dataset")}
    with pytest.raises(LabelError, match=r"task 'disease': every labelled row is class 1 \(160 rows pooled over 4 site"):
        run_federation(sick, schema, run_dir=tmp_path / "pooled", **fast)
    assert not (tmp_path / "pooled" / "checkpoint.pt").exists()  # stopped before round 1
    mixed = {"Cleveland": heart[heart["dataset"] == "Cleveland"].iloc[:60], "Hungary": sick["Hungary"]}
    res = run_federation(mixed, schema, run_dir=tmp_path / "mixed", **fast)  # one site of one class is fine
    assert len(res.history) == 1


# ---- bad values name the file's row -----------------------------------------------------

def with_bad_chol(heart, row):
    df = heart.copy()
    df["chol"] = df["chol"].astype(object)
    df.loc[row - 1, "chol"] = "abc"  # data row ``row``, counted from 1 after the header
    return df


def test_a_bad_value_names_the_files_line_and_data_row(heart, tmp_path, capsys):
    data, schema = write(tmp_path, with_bad_chol(heart, 501))
    rc, err = train(capsys, data, schema, tmp_path / "out")
    assert rc == 2
    assert f"line 502 of {data} (data row 501), column 'chol': expected a number (value 'abc')" in err


def test_line_numbers_follow_the_file_through_quoted_newlines_and_blank_lines(heart, tmp_path):
    df = with_bad_chol(heart.iloc[:30], 20)
    df["note"] = ""
    df.loc[4, "note"] = "two\nlines"  # data row 5 spans lines 6-7
    path = tmp_path / "notes.csv"
    df.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:12] + ["\n"] + text[12:]))  # a blank line pandas skips, before data row 11
    table = read_table(path)
    assert len(table) == 30
    _, schema = load_builtin("heart")
    with pytest.raises(Exception) as e:
        train_centralized(table, schema.subset(tasks=["disease"]), train_config=TrainConfig(epochs=1))
    assert f"line 23 of {path} (data row 20)" in str(e.value)  # 20 + header + the quoted newline + the blank line


def test_a_split_keeps_the_files_rows(heart, tmp_path):
    """Rows reach encode after an iloc split (as in mmn-fed train): the position in the split is not the row."""
    path, _ = write(tmp_path, with_bad_chol(heart, 501))
    table = read_table(path)
    part = table.iloc[400:600]  # data row 501 is position 100 here
    _, schema = load_builtin("heart")
    from mmn_fed.data import fit_preprocessor

    prep = fit_preprocessor(schema, table.iloc[:400])
    with pytest.raises(Exception) as e:
        encode(prep, part)
    assert f"line 502 of {path} (data row 501)" in str(e.value) and "data row 101" not in str(e.value)
    assert e.value.issues[0].row == 100  # the issue keeps its position in the table given


def test_a_site_names_the_bad_row_of_its_own_file(heart, tmp_path):
    """Federated: a site's summary reports its file's line, not the position in its training split."""
    from clients.site import Site, load_rows, site_source
    from mmn_fed.settings import SiteSettings

    path, _ = write(tmp_path, with_bad_chol(heart, 501), name="site-a.csv")
    src = site_source({"data-path": str(path)}, {})
    _, schema = load_builtin("heart")
    with pytest.raises(Exception) as e:
        Site(src.name, load_rows(src)).summary(schema, SiteSettings())
    assert f"line 502 of {path} (data row 501)" in str(e.value)


# ---- [sites] column ---------------------------------------------------------------------

def test_a_site_column_not_in_the_data_is_refused(heart, tmp_path, capsys):
    data, schema = write(tmp_path, heart, site="datset")
    rc, err = train(capsys, data, schema, tmp_path / "out")
    assert rc == 2
    assert f"[sites] column 'datset' of the schema {schema} is not in the data ({data}); columns present: ['id', 'age'" in err
    assert "did you mean 'dataset'?" in err


# ---- explanation heatmaps ---------------------------------------------------------------

@pytest.fixture(scope="module")
def explained(heart):
    _, schema = load_builtin("heart")
    res = train_centralized(heart.iloc[:600], schema, train_config=TrainConfig(epochs=15, seed=0))
    data = encode(res.trained.preprocessor, heart.iloc[600:])
    t_imc = imc(res.trained.model, data, res.trained.preprocessor.targets)
    t_cp = cp(res.trained.model, data, res.trained.preprocessor.targets, row=0)
    return t_imc, t_cp


def _figures(explained):
    t_imc, t_cp = explained
    return {"imc": imc_figure(t_imc), "imc_abs": imc_figure(t_imc, value="mean_abs_delta"), "cp": cp_figure(t_cp),
            "cp_one_task": cp_figure(t_cp[t_cp["task"] == "disease"]),
            "imc_one_task": imc_figure(t_imc[t_imc["task"] == "disease"])}


def test_every_heatmap_number_contrasts_with_its_cell(explained):
    from matplotlib.colors import to_rgba

    colours = set()
    for name, fig in _figures(explained).items():
        ax = fig.axes[0]
        im = ax.images[0]
        values = im.get_array()
        cells = [t for t in ax.texts]
        assert len(cells) == values.size, name
        for t in cells:
            j, i = (int(round(v)) for v in t.get_position())
            ratio = contrast_ratio(im.to_rgba(values[i, j]), to_rgba(t.get_color()))
            assert ratio >= 4.5, (name, t.get_text(), ratio)
            colours.add(t.get_color())
    assert colours == {"black", "white"}  # both are needed on these real figures: the check is not vacuous


def test_colour_bar_tick_labels_do_not_overlap(explained):
    for name, fig in _figures(explained).items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bar = fig.axes[1]
        boxes = [t.get_window_extent(renderer) for t in bar.get_yticklabels() if t.get_visible() and t.get_text()]
        boxes = [b for b in boxes if np.isfinite(b.get_points()).all()]  # ticks beyond the bar are not drawn
        assert len(boxes) >= 2, name
        boxes.sort(key=lambda b: b.y0)
        for lower, upper in zip(boxes, boxes[1:]):  # apart by half a label's height at least: legible, not touching
            assert upper.y0 - lower.y1 >= 0.5 * lower.height, (name, lower, upper)


def test_the_imc_figure_says_what_a_negative_number_means(explained):
    fig = imc_figure(explained[0])
    caption = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "Negative: on average this modality alone lowered that output" in caption
    assert "it does not say the modality hurts accuracy" in caption
    assert (explained[0]["mean_delta"] < 0).any()  # the figure shows negative numbers to explain


def test_contrast_ratio_matches_wcag_reference_values():
    """WCAG 2: black on white is 21:1; grey #767676 on white is 4.54:1 (passes AA), #777777 4.48:1 (fails)."""
    grey = lambda h: (int(h, 16) / 255,) * 3  # noqa: E731
    assert contrast_ratio((0, 0, 0), (1, 1, 1)) == pytest.approx(21.0)
    assert contrast_ratio(grey("76"), (1, 1, 1)) == pytest.approx(4.54, abs=0.005)
    assert contrast_ratio(grey("77"), (1, 1, 1)) == pytest.approx(4.48, abs=0.005)


def test_declared_classes_matching_no_label_and_a_constant_regression_target_are_refused(heart):
    from edge_runtime.schema import Schema
    from mmn_fed.data import check_table

    mods = {"demographics": ["age", "sex"]}
    wrong = Schema.from_dict({"modalities": mods, "tasks": {"grade": {"column": "cp", "kind": "multiclass",
                                                                       "classes": ["a", "b"]}}})
    with pytest.raises(LabelError, match=r"task 'grade': no label is one of classes = \['a', 'b'\]; labels seen: "
                                         r"\['asymptomatic', 'atypical angina', 'non-anginal', 'typical angina'\]"):
        check_table(wrong, heart)
    flat = Schema.from_dict({"modalities": mods, "tasks": {"score": {"column": "num", "kind": "regression"}}})
    with pytest.raises(LabelError, match=r"task 'score': every labelled row has the value 2 \(920 rows\); "
                                         "a regression needs values that vary"):
        check_table(flat, heart.assign(num=2.0))
    check_table(flat, heart)  # the real, varying target passes
