"""Time series (mmn_fed.sequences): the [timeseries] schema, the step table and its per-step targets, and the
step-by-step MultiModN forward."""
import numpy as np
import pandas as pd
import pytest
import torch

from edge_runtime.preprocessing import DataError
from edge_runtime.schema import Schema, SchemaError
from mmn_fed import ModelConfig, TrainConfig
from mmn_fed.data import fit_preprocessor, read_table
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.sequences import (build_sequences, encode_sequences, fit_sequences, label_column, predict_steps,
                               row_schema, step_metrics)

RAW = {
    "modalities": {"demo": ["age"], "labs": ["bili", "alb"], "signs": ["edema"]},
    "tasks": {"event_1y": {"column": "status", "kind": "binary", "positive": [2], "event_time": "futime",
                           "horizon": 365},
              "bili_next": {"column": "bili", "kind": "regression", "ahead": 1}},
    "columns": {"categorical": ["edema"]},
    "timeseries": {"id": "id", "time": "day", "modalities": ["labs", "signs"]},
}


def visits() -> pd.DataFrame:
    # patient 1 dies at day 500 (status 2); patient 2 is censored at day 300 (status 0)
    return pd.DataFrame({
        "id": [1, 1, 1, 2, 2, 1],
        "day": [0, 200, 200, 0, 100, 400],
        "age": [50, 50, 50, 60, 60, 50],
        "bili": [1.0, 2.0, np.nan, 0.5, 0.6, 3.0],
        "alb": [3.5, np.nan, 3.1, 4.0, np.nan, 2.9],
        "edema": ["0", "0", "1", "0", "0", "1"],
        "status": [2, 2, 2, 0, 0, 2],
        "futime": [500, 500, 500, 300, 300, 500],
    })


def test_timeseries_schema_round_trips_and_refuses_what_it_cannot_mean():
    s = Schema.from_dict(RAW)
    assert s.timeseries.modalities == ("labs", "signs") and s.tasks["event_1y"].per_step
    assert Schema.from_dict(s.to_dict()) == s
    assert s.subset(modalities=["demo", "labs"]).timeseries.modalities == ("labs",)
    no_ts = {k: v for k, v in RAW.items() if k != "timeseries"}
    with pytest.raises(SchemaError, match="event_1y.*need a \\[timeseries\\]"):
        Schema.from_dict(no_ts)
    with pytest.raises(SchemaError, match="'vitals', which is not in \\[modalities\\]"):
        Schema.from_dict({**RAW, "timeseries": {**RAW["timeseries"], "modalities": ["vitals"]}})
    bad_ahead = {**RAW, "tasks": {"t": {"column": "bili", "kind": "binary", "threshold": 1, "ahead": 1}}}
    with pytest.raises(SchemaError, match="ahead applies to regression"):
        Schema.from_dict(bad_ahead)
    no_event = {**RAW, "tasks": {"t": {"column": "status", "kind": "binary", "event_time": "futime", "horizon": 1}}}
    with pytest.raises(SchemaError, match="which values of 'status' are the event"):
        Schema.from_dict(no_event)
    with pytest.raises(SchemaError, match="step must be"):
        Schema.from_dict({**RAW, "timeseries": {**RAW["timeseries"], "step": -3}})


def test_step_table_combines_a_step_and_derives_each_step_target():
    seqs = build_sequences(Schema.from_dict(RAW), visits())
    st = seqs.steps
    assert list(seqs.ids) == [1, 2] and seqs.index.tolist() == [[0, 1, 2], [3, 4, -1]]
    assert st["day"].tolist() == [0, 200, 400, 0, 100]
    # two rows on day 200: "last" keeps each column's last value seen in the step (a blank hides nothing)
    assert st.loc[1, "bili"] == 2.0 and st.loc[1, "alb"] == 3.1 and st.loc[1, "edema"] == "1"
    assert st["source_row"].tolist() == [1, 3, 6, 4, 5]  # the input row each step was read from (the last one)
    y = st[label_column(Schema.from_dict(RAW).tasks["event_1y"])].tolist()
    # patient 1 dies at 500: day 0 -> 500 days left (> 365: 0); 200 and 400 -> within a year (1)
    # patient 2 censored at 300 without the event: day 0 -> 300 days left < 365, undefined; day 100 too
    assert y[:3] == [0.0, 1.0, 1.0] and np.isnan(y[3]) and np.isnan(y[4])
    nxt = st["bili_next__target"].tolist()
    assert nxt[:2] == [2.0, 3.0] and np.isnan(nxt[2]) and nxt[3] == 0.6 and np.isnan(nxt[4])


def test_fixed_width_steps_and_mean_combine():
    raw = {**RAW, "timeseries": {**RAW["timeseries"], "step": 250, "combine": "mean"}}
    st = build_sequences(Schema.from_dict(raw), visits()).steps
    # patient 1: days 0 and 200 fall in step [0, 250); day 400 in [250, 500)
    assert st["step_time"].tolist() == [0.0, 250.0, 0.0]
    assert st.loc[0, "bili"] == pytest.approx(1.5) and st.loc[0, "alb"] == pytest.approx(3.3)


def irregular_visits() -> pd.DataFrame:
    # subject 7: days 30, 0, 30 (a second row at day 30), 95, in file order; subject 3: days 5, 50
    return pd.DataFrame({"id": [7, 7, 3, 7, 3, 7], "day": [30, 0, 5, 30, 50, 95],
                         "age": [50, 50, 60, 50, 60, 50], "bili": [1.0, 2.0, 0.5, np.nan, 0.6, 3.0],
                         "alb": [3.5, np.nan, 4.0, 3.1, np.nan, 2.9], "edema": ["0", "0", "0", "1", "0", "1"],
                         "status": [2, 2, 0, 2, 0, 2], "futime": [500, 500, 300, 500, 300, 500]})


def test_elapsed_is_the_time_since_the_subjects_previous_step_and_missing_at_its_first():
    raw = {**RAW, "timeseries": {**RAW["timeseries"], "elapsed": True}}
    schema = Schema.from_dict(raw)
    assert schema.timeseries.step_modalities == ("elapsed", "labs", "signs")
    assert Schema.from_dict(schema.to_dict()) == schema and schema.to_dict()["timeseries"]["elapsed"] is True
    seqs = build_sequences(schema, irregular_visits())
    st = seqs.steps
    assert st["id"].tolist() == [3, 3, 7, 7, 7] and st["day"].tolist() == [5, 50, 0, 30, 95]
    np.testing.assert_array_equal(st["elapsed"], [np.nan, 45, np.nan, 30, 65])  # the first step: missing
    # fixed-width steps: the time between the steps' starts (days 0, 30 | 30 | 95 -> steps 0, 30, 90)
    width = build_sequences(Schema.from_dict({**raw, "timeseries": {**raw["timeseries"], "step": 30}}),
                            irregular_visits()).steps
    assert width["step_time"].tolist() == [0, 30, 0, 30, 90]
    np.testing.assert_array_equal(width["elapsed"], [np.nan, 30, np.nan, 30, 60])
    # max_steps keeps the last steps: a kept first step still has the time since its (dropped) previous step
    last2 = build_sequences(Schema.from_dict({**raw, "timeseries": {**raw["timeseries"], "max_steps": 2}}),
                            irregular_visits()).steps
    np.testing.assert_array_equal(last2["elapsed"], [np.nan, 45, 30, 65])
    # an ordinary numeric column of a modality of its own, encoded first at every step: mergeable statistics
    rs = row_schema(schema)
    assert list(rs.modalities)[0] == "elapsed" and rs.modalities["elapsed"] == ("elapsed",)
    prep = fit_preprocessor(rs, st)
    assert prep.columns["elapsed"]["kind"] == "numeric" and prep.columns["elapsed"]["mean"] == pytest.approx(140 / 3)
    enc = encode_sequences(prep, seqs, schema.timeseries.step_modalities)
    assert enc.rows.present["elapsed"].tolist() == [False, True, False, True, True]
    with pytest.raises(SchemaError, match="elapsed must be true"):
        Schema.from_dict({**RAW, "timeseries": {**RAW["timeseries"], "elapsed": "yes"}})
    clash = {**raw, "modalities": {**RAW["modalities"], "elapsed": ["days_since"]}}
    with pytest.raises(SchemaError, match="rename the schema's own 'elapsed'"):
        Schema.from_dict(clash)


def test_without_elapsed_the_schema_and_the_step_table_are_unchanged():
    schema = Schema.from_dict(RAW)
    assert schema.to_dict()["timeseries"] == {"id": "id", "time": "day", "modalities": ["labs", "signs"],
                                              "step": "visit", "combine": "last", "max_steps": 0}
    assert Schema.from_dict({**RAW, "timeseries": {**RAW["timeseries"], "elapsed": False}}) == schema
    assert schema.timeseries.step_modalities == ("labs", "signs")
    assert row_schema(schema).modalities == schema.modalities
    assert "elapsed" not in build_sequences(schema, irregular_visits()).steps


def test_a_bad_time_or_blank_id_names_the_files_row_and_column(tmp_path):
    df = visits()
    df["day"] = df["day"].astype(object)
    df.loc[4, "day"] = "soon"
    path = tmp_path / "visits.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 6 of .*visits.csv \(data row 5\), column 'day': time must be a number"):
        build_sequences(Schema.from_dict(RAW), read_table(path))
    df = visits()
    df.loc[2, "id"] = np.nan
    df.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"data row 3\), column 'id': the subject id is blank"):
        build_sequences(Schema.from_dict(RAW), read_table(path))
    with pytest.raises(SchemaError, match=r"\['futime'\].*not in the data"):
        build_sequences(Schema.from_dict(RAW), visits().drop(columns="futime"))


def _model_and_data(n_subjects=6, steps=7, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_subjects):
        for t in range(int(rng.integers(1, steps + 1))):
            rows.append({"id": i, "day": 30 * t, "age": 40 + i, "bili": rng.normal() if rng.random() > 0.3 else np.nan,
                         "alb": rng.normal() if rng.random() > 0.3 else np.nan,
                         "edema": str(int(rng.random() > 0.5)) if rng.random() > 0.2 else None,
                         "status": 2 if i % 2 else 0, "futime": 30 * steps + 100})
    schema = Schema.from_dict(RAW)
    seqs = build_sequences(schema, pd.DataFrame(rows))
    rs = row_schema(schema)
    prep = fit_preprocessor(rs, seqs.steps)
    torch.manual_seed(seed)
    model = build_from_preprocessor(prep, ModelConfig()).eval()
    return model, prep, rs, seqs, schema


def _manual(model, data, subject: int) -> list[torch.Tensor]:
    """The state after each step of one subject, by hand: static encoders once, then each step's modalities."""
    rows = [int(r) for r in data.index[subject] if r >= 0]
    x, p = data.rows.x, data.rows.present
    state = model.init_state.unsqueeze(0)
    if p["demo"][rows[0]]:
        state = model.encoders["demo"](state, x["demo"][rows[0]:rows[0] + 1])
    out = []
    for r in rows:
        for m in ("labs", "signs"):
            if p[m][r]:
                state = model.encoders[m](state, x[m][r:r + 1])
        out.append(torch.sigmoid(model.decoders["event_1y"](state)).squeeze())
    return out


@torch.no_grad()
def test_forward_sequence_equals_the_step_by_step_computation_and_never_looks_ahead():
    model, prep, rs, seqs, schema = _model_and_data()
    data = encode_sequences(prep, seqs, schema.timeseries.modalities)
    p = predict_steps(model, data, prep.targets, rs)["event_1y"]
    for i in range(len(seqs.ids)):
        rows = [int(r) for r in data.index[i] if r >= 0]
        manual = torch.stack(_manual(model, data, i)).numpy()
        np.testing.assert_allclose(p[rows], manual, atol=1e-6)
    # causality: a subject's first k steps alone give the same predictions at those steps
    longest = int(np.argmax(seqs.lengths))
    rows = [int(r) for r in data.index[longest] if r >= 0]
    for k in range(1, len(rows)):
        cut = seqs.subjects(np.array([longest]))
        cut.index = cut.index[:, :k]
        cut_data = encode_sequences(prep, cut, schema.timeseries.modalities)
        got = predict_steps(model, cut_data, prep.targets, rs)["event_1y"]
        np.testing.assert_allclose(got[:k], p[rows[:k]], atol=1e-6)


def test_fit_sequences_learns_a_per_step_signal_and_is_seeded():
    rng = np.random.default_rng(1)
    rows = []
    for i in range(120):
        risk = rng.normal()
        for t in range(5):
            rows.append({"id": i, "day": 100 * t, "age": 50.0, "bili": risk + 0.3 * rng.normal(), "alb": rng.normal(),
                         "edema": "0", "status": 2 if risk > 0 else 0, "futime": 450 if risk > 0 else 2000})
    schema = Schema.from_dict({**RAW, "tasks": {"event_1y": RAW["tasks"]["event_1y"]}})
    seqs = build_sequences(schema, pd.DataFrame(rows))
    rs = row_schema(schema)
    tr, te = seqs.subjects(np.arange(80)), seqs.subjects(np.arange(80, 120))
    prep = fit_preprocessor(rs, tr.steps)
    dyn = schema.timeseries.modalities

    def train():
        torch.manual_seed(0)
        model = build_from_preprocessor(prep, ModelConfig())
        fit_sequences(model, rs, prep.targets, encode_sequences(prep, tr, dyn), None, TrainConfig(epochs=15, seed=0))
        return model

    a, b = train(), train()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert step_metrics(a, rs, encode_sequences(prep, te, dyn), prep.targets)["event_1y"]["auroc"] > 0.9


LONG = {**RAW, "timeseries": {**RAW["timeseries"], "variable": "variable", "value": "value"}}


def long_table(visit_rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The visits as (id, day, variable, value) observations plus a subject table."""
    obs = [(r.id, r.day, v, getattr(r, v)) for r in visit_rows.itertuples() for v in ("bili", "alb", "edema")
           if getattr(r, v) == getattr(r, v) and getattr(r, v) is not None]
    long = pd.DataFrame(obs, columns=["id", "day", "variable", "value"])
    subjects = visit_rows.drop_duplicates("id")[["id", "age", "status", "futime"]]
    return long, subjects


def test_a_long_table_gives_the_same_steps_as_the_visit_table_and_accounts_for_every_row(tmp_path):
    v = visits()
    long, subjects = long_table(v)
    long = pd.concat([long, pd.DataFrame([{"id": 1, "day": 0, "variable": "heart_rate", "value": 80}])],
                     ignore_index=True)
    subjects = pd.concat([subjects, pd.DataFrame([{"id": 3, "age": 70, "status": 0, "futime": 10}])])
    got = build_sequences(Schema.from_dict(LONG), long, subjects)
    want = build_sequences(Schema.from_dict(RAW), v)
    cols = ["id", "day", "age", "bili", "alb", "edema", "event_1y__target", "bili_next__target"]
    pd.testing.assert_frame_equal(got.steps[cols].astype(str), want.steps[cols].astype(str))
    assert got.index.tolist() == want.index.tolist()
    reasons = {s["reason"]: s["rows"] for s in got.skipped}
    assert reasons == {"variable 'heart_rate' is in no time-series modality of the schema": 1,
                       "subject(s) without any observation in the long table": 1}
    long.loc[3, "value"] = "high"  # 'bili' of row 4 is not a number
    path = tmp_path / "long.csv"
    long.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"line 5 of .*long.csv \(data row 4\), column 'value': variable 'bili' is numeric"):
        build_sequences(Schema.from_dict(LONG), read_table(path), subjects)
    long.loc[3, "value"] = 1.0
    long.loc[5, "id"] = 9
    long.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"data row 6\), column 'id': unknown subject id"):
        build_sequences(Schema.from_dict(LONG), read_table(path), subjects)
    with pytest.raises(SchemaError, match="come from a subject table"):
        build_sequences(Schema.from_dict(LONG), long)


def test_mmn_fed_train_on_a_time_series_table_splits_by_patient_and_keeps_the_schema(tmp_path, capsys):
    import json

    from mmn_fed import load_builtin
    from mmn_fed.cli import main
    from mmn_fed.model_io import load_model

    df, schema = load_builtin("pbcseq")
    path = tmp_path / "visits.csv"
    df[df["id"] <= 60].to_csv(path, index=False)
    schema_path = tmp_path / "schema.toml"
    from mmn_fed.data import builtin_path
    schema_path.write_text((builtin_path("pbcseq") / "schema.toml").read_text())
    assert main(["train", "--dataset", str(path), "--schema", str(schema_path), "--epochs", "3", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["subjects"] == {"train": 38, "validation": 10, "test": 12}  # 60 patients, split by patient
    assert printed["steps"] == len(df[df["id"] <= 60])
    recs = json.loads((tmp_path / "out" / "metrics.json").read_text())
    auc = next(r for r in recs if r["metric"] == "auroc")
    assert auc["task"] == "death_or_transplant_2y" and auc["unit"] == "step" and 0 < auc["n"] < printed["steps"]
    trained = load_model(tmp_path / "out" / "model.pt")
    assert Schema.from_dict(trained.metadata["timeseries_schema"]) == schema


def test_the_weather_builtin_is_72_hour_windows_every_24_hours_with_the_temperature_24_hours_later():
    from mmn_fed import load_builtin

    df, schema = load_builtin("nycflights13_weather")
    assert schema.timeseries.id == "window" and schema.site_column == "origin"
    w = df[df["window"] == "JFK-00048"]
    assert w["abs_hour"].min() == 48 and w["abs_hour"].max() == 119 and w["window_hour"].tolist() == list(range(72))
    assert df.groupby("window")["window_hour"].max().max() == 71  # no window is longer than 72 hours
    assert (df["start"] % 24 == 0).all() and set(df["origin"]) == {"EWR", "JFK", "LGA"}
    hour = df.drop_duplicates(["origin", "abs_hour"]).set_index(["origin", "abs_hour"])["temp"]
    sample = df.sample(200, random_state=0)
    for r in sample.itertuples():
        later = hour.get((r.origin, r.abs_hour + 24))
        assert (np.isnan(r.temp_24h) and later is None) or r.temp_24h == later
    # an hour is in up to 3 windows (starting 0, 24 and 48 hours before it)
    assert df.groupby(["origin", "abs_hour"]).size().max() == 3
    seqs = build_sequences(schema, df[df["origin"] == "EWR"].head(72 * 3))
    assert seqs.index.shape[1] == 72  # one step per hour; the state restarts with each window (a subject)


def test_the_recurrent_baseline_and_multimodn_learn_synthetic_sequences_through_the_same_harness():
    from mmn_fed.sequences import RecurrentBaseline, make_synthetic_sequences

    df, schema = make_synthetic_sequences(n_subjects=90, steps=12, seed=3)
    assert len(df) == 90 * 12 and df["lab_a"].isna().mean() == pytest.approx(0.3, abs=0.03)
    seqs = build_sequences(schema, df)
    rs = row_schema(schema)
    tr, te = seqs.subjects(np.arange(60)), seqs.subjects(np.arange(60, 90))
    prep = fit_preprocessor(rs, tr.steps)
    dyn = schema.timeseries.modalities
    torch.manual_seed(0)
    rnn = RecurrentBaseline(prep.modality_dims, {"high_risk": 1}, dyn)
    mmn = build_from_preprocessor(prep, ModelConfig(encoder="gru"))
    for model, every in ((rnn, False), (mmn, True)):
        fit_sequences(model, rs, prep.targets, encode_sequences(prep, tr, dyn), None, TrainConfig(epochs=12, seed=0),
                      every_encoder=every)
        auc = step_metrics(model, rs, encode_sequences(prep, te, dyn), prep.targets)["high_risk"]["auroc"]
        assert auc > 0.8, (type(model).__name__, auc)
    # the baseline never looks ahead either
    one = seqs.subjects(np.array([0]))
    full = predict_steps(rnn, encode_sequences(prep, one, dyn), prep.targets, rs)["high_risk"]
    one.index = one.index[:, :5]
    cut = predict_steps(rnn, encode_sequences(prep, one, dyn), prep.targets, rs)["high_risk"]
    np.testing.assert_allclose(cut[:5], full[:5], atol=1e-6)


def test_a_stream_cut_in_time_holds_out_its_latest_subjects():
    raw = {**RAW, "timeseries": {**RAW["timeseries"], "split": "time"}}
    schema = Schema.from_dict(raw)
    assert Schema.from_dict(schema.to_dict()).timeseries.split == "time"
    rows = [{"id": i, "day": 10 * i + t, "age": 50, "bili": 1.0, "alb": 3.0, "edema": "0", "status": 0,
             "futime": 9999} for i in [3, 0, 4, 1, 2] for t in range(3)]
    seqs = build_sequences(schema, pd.DataFrame(rows))
    keep, held = seqs.holdout(schema.timeseries, 0.4, seed=0)
    assert sorted(seqs.ids[held].tolist()) == [3, 4] and sorted(seqs.ids[keep].tolist()) == [0, 1, 2]
    with pytest.raises(SchemaError, match="split must be"):
        Schema.from_dict({**RAW, "timeseries": {**RAW["timeseries"], "split": "random"}})
