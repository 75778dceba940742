"""Streaming a patient's state at the edge (edge_runtime/streaming.py) against the PyTorch whole-history forward."""
import json

import numpy as np
import pandas as pd
import pytest

from edge_runtime.bundle import BundleError, load_bundle
from edge_runtime.schema import Schema
from edge_runtime.streaming import PatientState, StateError, Stream, predict_table

RAW = {
    "modalities": {"demo": ["age", "sex"], "labs": ["bili", "alb"], "signs": ["edema"]},
    "tasks": {"event_1y": {"column": "status", "kind": "binary", "positive": [2], "event_time": "futime",
                           "horizon": 365},
              "bili_next": {"column": "bili", "kind": "regression", "ahead": 1}},
    "columns": {"categorical": ["sex", "edema"]},
    "timeseries": {"id": "id", "time": "day", "modalities": ["labs", "signs"]},
}


def histories(lengths, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(lengths):
        day = 0.0
        for _ in range(n):
            day += float(rng.integers(1, 30))
            rows.append({"id": i, "day": day, "age": float(rng.integers(30, 80)), "sex": "f" if i % 2 else "m",
                         "bili": rng.lognormal() if rng.random() > 0.3 else np.nan,
                         "alb": rng.normal(3.5, 0.5) if rng.random() > 0.4 else np.nan,
                         "edema": str(int(rng.random() > 0.7)) if rng.random() > 0.5 else None,
                         "status": 2 if i % 3 == 0 else 0, "futime": day + 400})
        for r in rows[-n:]:
            r["futime"] = day + 200
    return pd.DataFrame(rows)


def with_elapsed(raw: dict) -> dict:
    """The schema with ``[timeseries] elapsed = true`` (the time since the previous step as an input)."""
    return {**raw, "timeseries": {**raw["timeseries"], "elapsed": True}}


@pytest.fixture(scope="module", params=["mlp", "gru", "gru+elapsed"])
def stream_and_truth(request, tmp_path_factory):
    from mmn_fed import ModelConfig, TrainConfig
    from mmn_fed.export import export_bundle
    from mmn_fed.sequences import build_sequences, encode_sequences, predict_steps, row_schema, train_sequences

    encoder, _, elapsed = request.param.partition("+")
    schema = Schema.from_dict(with_elapsed(RAW) if elapsed else RAW)
    train = build_sequences(schema, histories([5, 8, 12, 3, 9, 20, 7, 6], seed=1))
    res = train_sequences(train, schema, ModelConfig(encoder=encoder), TrainConfig(epochs=2, val_fraction=0.0))
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(res.trained, out)
    seqs = build_sequences(schema, histories([1, 37, 500, 120], seed=2))  # random histories, up to 500 steps
    data = encode_sequences(res.trained.preprocessor, seqs, schema.timeseries.step_modalities)
    truth = predict_steps(res.trained.model, data, res.trained.preprocessor.targets, row_schema(schema))
    return Stream(load_bundle(out, allow_unsigned=True)), seqs, truth, res.trained


def test_streaming_step_by_step_equals_the_whole_history_forward(stream_and_truth):
    stream, seqs, truth, _ = stream_and_truth
    for i in range(len(seqs.ids)):
        rows = [int(r) for r in seqs.index[i] if r >= 0]
        # the step rows as a device sees them: without the step table's derived elapsed (the stream derives it)
        recs = seqs.steps.iloc[rows].drop(columns="elapsed", errors="ignore").to_dict("records")
        state = stream.start(recs[0])
        for k, (r, rec) in enumerate(zip(rows, recs)):
            state = PatientState.from_json(state.to_json())  # stored and read back between visits
            state = stream.update(state, rec)
            got = stream.predict(state)
            assert abs(got["event_1y"] - truth["event_1y"][r]) < 1e-5, (i, k)
            assert abs(got["bili_next"] - truth["bili_next"][r]) < 1e-4 * max(1.0, abs(truth["bili_next"][r]))
        assert state.steps == len(rows) and state.last_time == recs[-1]["day"]
        replayed, trajectory = stream.replay(recs[0], recs)
        assert np.array_equal(replayed.state, state.state) and len(trajectory) == len(rows)
        np.testing.assert_allclose([t["event_1y"] for t in trajectory], truth["event_1y"][rows], atol=1e-5)


def test_a_state_of_another_model_or_format_is_refused_and_time_cannot_go_back(stream_and_truth):
    stream, seqs, _, _ = stream_and_truth
    state = stream.update(stream.start({"age": 50, "sex": "f"}), {"bili": 1.0}, time=10)
    other = PatientState("0123456789abcdef", state.state, state.steps, state.last_time)
    with pytest.raises(StateError, match="belongs to model 0123456789abcdef.*Stream.replay"):
        stream.update(other, {"bili": 1.0})
    with pytest.raises(StateError, match="before this patient's last step"):
        stream.update(state, {"bili": 1.0}, time=5)
    d = json.loads(state.to_json())
    with pytest.raises(StateError, match="version 2"):
        PatientState.from_json(json.dumps({**d, "version": 2}))
    with pytest.raises(StateError, match="not an mmn-fed patient state"):
        PatientState.from_json(json.dumps({"format": "x"}))
    assert len(state.to_json()) < 400  # a small value: a few dozen float32 numbers plus the model id


def test_a_static_bundle_is_not_a_stream(tmp_path):
    from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
    from mmn_fed.export import export_bundle

    df, schema = load_builtin("heart")
    res = train_centralized(df.iloc[:200], schema.subset(tasks=["disease"]), ModelConfig(state_size=8, hidden=8),
                            TrainConfig(epochs=1, val_fraction=0.0))
    export_bundle(res.trained, tmp_path / "b")
    with pytest.raises(BundleError, match="not a time-series model"):
        Stream(load_bundle(tmp_path / "b", allow_unsigned=True))


def test_mmn_edge_predict_on_a_visit_table_writes_a_row_per_step_and_accounts_for_every_input_row(
        stream_and_truth, tmp_path, capsys):
    import csv

    from edge_runtime.cli import main
    from mmn_fed.sequences import build_sequences, encode_sequences, predict_steps, row_schema

    stream, _, _, trained = stream_and_truth
    schema = Schema.from_dict(stream.bundle.manifest["timeseries"])
    df = histories([4, 6, 3], seed=5)
    clean = df.copy()
    dup = df.iloc[[2]].assign(alb=np.nan, bili=7.5)  # a second row at subject 0's third visit: combined into one step
    df = pd.concat([df.iloc[:3], dup, df.iloc[3:]], ignore_index=True)
    df["day"] = df["day"].astype(object)
    df["bili"] = df["bili"].astype(object)
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "day": "soon"}  # no usable time
    df.loc[len(df)] = {**df.iloc[1].to_dict(), "id": None}  # no id
    bad_step = int(np.flatnonzero(df["id"] == 2)[1])
    df.loc[bad_step, "bili"] = "high"  # subject 2's second visit holds a bad value
    path = tmp_path / "visits.csv"
    df.to_csv(path, index=False)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(stream.bundle.path), "--input", str(path), "--output", str(out),
                 "--allow-unsigned"]) == 0
    rows = list(csv.DictReader(open(out)))
    used = sorted(int(r) for row in rows for r in row["rows"].split())
    assert used == list(range(1, len(df) + 1))  # every input data row is in exactly one output row
    errors = {row["rows"]: row["reason"] for row in rows if row["status"] == "error"}
    assert "column 'day' is not a number" in errors[str(len(df) - 1)]
    assert "column 'id' is blank" in errors[str(len(df))]
    assert "bili" in errors[str(bad_step + 1)] and "high" in errors[str(bad_step + 1)]
    assert sum(row["status"] == "ok" for row in rows) == 4 + 6 + 3 - 1  # one step per visit, minus the bad one
    # subjects 0 and 1 (no bad value) match the PyTorch forward over the same steps
    merged = pd.concat([clean.iloc[:2], clean.iloc[[2]].assign(bili=7.5), clean.iloc[3:]], ignore_index=True)
    seqs = build_sequences(schema, merged)
    data = encode_sequences(trained.preprocessor, seqs, schema.timeseries.step_modalities)
    truth = predict_steps(trained.model, data, trained.preprocessor.targets, row_schema(schema))["event_1y"]
    ok = [row for row in rows if row["status"] == "ok" and row["id"] in ("0", "1", "0.0", "1.0")]
    assert len(ok) == 10
    np.testing.assert_allclose([float(r["event_1y"]) for r in ok], truth[:10], atol=1e-5)
    assert "12 predicted" in capsys.readouterr().err


def long_bundle(trained, out):
    """The fixture's model as a bundle that reads long tables: the same weights and preprocessing, the schema with
    ``[timeseries] variable/value``."""
    from mmn_fed.export import export_bundle
    from mmn_fed.model_io import TrainedModel

    raw = dict(trained.metadata["timeseries_schema"])
    raw["timeseries"] = {**raw["timeseries"], "variable": "variable", "value": "value"}
    export_bundle(TrainedModel(trained.model, trained.preprocessor, trained.config,
                               {**trained.metadata, "timeseries_schema": raw}), out)
    return Schema.from_dict(raw)


def test_mmn_edge_predict_on_a_long_table_and_its_subject_table_writes_a_row_per_step_and_accounts_for_every_row(
        stream_and_truth, tmp_path, capsys):
    import csv

    from edge_runtime.cli import main
    from mmn_fed.data import read_table
    from mmn_fed.sequences import build_sequences, encode_sequences, predict_steps, row_schema

    _, _, _, trained = stream_and_truth
    schema = long_bundle(trained, tmp_path / "b")
    visits = histories([4, 6, 3], seed=5)
    long = [{"id": r["id"], "day": r["day"], "variable": v, "value": r[v]}
            for r in visits.to_dict("records") for v in ("bili", "alb", "edema") if not pd.isna(r[v])]
    subjects = visits.groupby("id", as_index=False).first()[["id", "age", "sex", "status", "futime"]]
    pd.DataFrame(long).to_csv(tmp_path / "long_clean.csv", index=False)
    subjects.to_csv(tmp_path / "subjects_clean.csv", index=False)
    bad_value = next(i for i, r in enumerate(long) if r["id"] == 1 and r["variable"] == "bili" and i > 12)
    dirty = long[:bad_value] + [{**long[bad_value], "value": "high"}] + long[bad_value:]  # an extra, bad, row
    dirty += [{"id": 0, "day": 3.0, "variable": "heart_rate", "value": 80},  # a variable of no modality
              {"id": 99, "day": 3.0, "variable": "bili", "value": 1.0},  # a subject the subject table lacks
              {"id": None, "day": 3.0, "variable": "bili", "value": 1.0},  # no id
              {"id": 2, "day": "soon", "variable": "bili", "value": 1.0}]  # no usable time
    pd.DataFrame(dirty).astype({"id": "Int64"}).to_csv(tmp_path / "long.csv", index=False)  # ids 0, 1, ...
    # the subject table's ids are written 0.0, 1.0, ... (a blank id makes the column float): matched by value
    subj = pd.concat([subjects.iloc[[2]].assign(age=99.0), subjects,  # subject 2 twice: the last row is used
                      pd.DataFrame([{"id": 5, "age": 40.0, "sex": "f"}, {"id": None, "age": 41.0, "sex": "m"}])])
    subj.to_csv(tmp_path / "subjects.csv", index=False)
    out = tmp_path / "pred.csv"
    args = ["predict", str(tmp_path / "b"), "--input", str(tmp_path / "long.csv"), "--output", str(out),
            "--allow-unsigned"]
    assert main(args) == 2 and "--subjects FILE" in capsys.readouterr().err  # the static inputs are needed
    assert main(args + ["--subjects", str(tmp_path / "subjects.csv")]) == 0
    rows = list(csv.DictReader(open(out)))
    used = sorted(int(r) for row in rows for r in row["rows"].split())
    assert used == list(range(1, len(dirty) + 1))  # every long-table data row is in exactly one output row
    assert {int(row["subject_row"]) for row in rows if row["subject_row"]} == set(range(1, len(subj) + 1))
    reasons = [(row["status"], row["reason"]) for row in rows if row["status"] != "ok"]
    n = len(dirty)
    expected = [("error", f"line {bad_value + 2} of long.csv (data row {bad_value + 1}), column 'value': variable "
                          "'bili' is numeric; expected a number (value 'high')"),
                ("skipped", f"long.csv data row(s) {n - 3}, column 'variable': variable 'heart_rate' is in no "
                            "time-series modality of the schema"),
                ("error", f"long.csv data row(s) {n - 2}, column 'id': subject id '99' is not in subjects.csv"),
                ("error", f"line {n} of long.csv (data row {n - 1}), column 'id' is blank"),
                ("error", f"line {n + 1} of long.csv (data row {n}), column 'day' is not a number"),
                ("skipped", "line 2 of subjects.csv (data row 1), column 'id': id '2' again at data row 4"),
                ("skipped", "line 6 of subjects.csv (data row 5): subject '5' has no usable observation in long.csv"),
                ("error", "line 7 of subjects.csv (data row 6), column 'id' is blank")]
    for status, reason in expected:
        assert any(s == status and reason in r for s, r in reasons), (reason, reasons)
    assert len(reasons) == len(expected)
    # every step of the clean rows matches the PyTorch forward over build_sequences(schema, long, subjects)
    seqs = build_sequences(schema, read_table(tmp_path / "long_clean.csv"), read_table(tmp_path / "subjects_clean.csv"))
    data = encode_sequences(trained.preprocessor, seqs, schema.timeseries.step_modalities)
    truth = predict_steps(trained.model, data, trained.preprocessor.targets, row_schema(schema))
    got = {(row["id"], row["time"]): row for row in rows if row["status"] == "ok"}
    assert len(got) == len(seqs.steps) == 4 + 6 + 3
    for k, (sid, day) in enumerate(zip(seqs.steps["id"], seqs.steps["step_time"])):
        row = got[(str(sid), f"{day:g}")]
        assert abs(float(row["event_1y"]) - truth["event_1y"][k]) < 1e-5
        assert abs(float(row["bili_next"]) - truth["bili_next"][k]) < 1e-4 * max(1.0, abs(truth["bili_next"][k]))
    assert "13 predicted" in capsys.readouterr().err


def test_fixed_width_steps_at_the_edge_match_the_step_table_with_elapsed(stream_and_truth, tmp_path):
    """Several visits in one 30-day step (and, with elapsed, the time between the steps' starts): the edge's
    visit-table scorer equals build_sequences + PyTorch (the fixture's model, its schema with step = 30)."""
    import csv

    from mmn_fed.export import export_bundle
    from mmn_fed.model_io import TrainedModel
    from mmn_fed.sequences import build_sequences, encode_sequences, predict_steps, row_schema

    _, _, _, trained = stream_and_truth
    raw = dict(trained.metadata["timeseries_schema"])
    raw["timeseries"] = {**raw["timeseries"], "step": 30}
    schema = Schema.from_dict(raw)
    export_bundle(TrainedModel(trained.model, trained.preprocessor, trained.config,
                               {**trained.metadata, "timeseries_schema": raw}), tmp_path / "b")
    visits = histories([9, 14, 5], seed=7)
    visits.to_csv(tmp_path / "visits.csv", index=False)
    stream = Stream(load_bundle(tmp_path / "b", allow_unsigned=True))
    predict_table(stream, tmp_path / "visits.csv", tmp_path / "pred.csv")
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    seqs = build_sequences(schema, visits)
    assert len(seqs.steps) < len(visits)
    if schema.timeseries.elapsed:
        assert seqs.steps["elapsed"].dropna().mod(30).eq(0).all() and seqs.steps["elapsed"].notna().sum() > 10
    data = encode_sequences(trained.preprocessor, seqs, schema.timeseries.step_modalities)
    truth = predict_steps(trained.model, data, trained.preprocessor.targets, row_schema(schema))["event_1y"]
    assert [r["status"] for r in rows] == ["ok"] * len(seqs.steps)
    np.testing.assert_allclose([float(r["event_1y"]) for r in rows], truth, atol=1e-5)
