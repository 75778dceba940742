"""The bundle predicts what the PyTorch model predicts, for every subset of modalities, any order,
mixed batches, and along the trajectory (within 1e-5)."""
import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.schema import Schema
from mmn_fed.data import builtin_path, encode
from mmn_fed.evaluation import predict_trajectory

MODALITIES = list(Schema.from_toml(builtin_path("heart") / "schema.toml").modalities)
SUBSETS = [frozenset(c) for r in range(len(MODALITIES) + 1) for c in itertools.combinations(MODALITIES, r)]
ATOL = 1e-5


def blank(heart, idx, subsets):
    """Rows ``idx`` of the heart table, with the columns of modalities outside each row's subset emptied."""
    schema = heart.trained.schema
    df = heart.df.iloc[list(idx)].reset_index(drop=True).astype(object)
    for i, keep in enumerate(subsets):
        for m in MODALITIES:
            if m not in keep:
                for c in schema.modalities[m]:
                    df.at[i, c] = None
    return df


def torch_reference(heart, df, order=None):
    prep = heart.trained.preprocessor
    data = encode(prep, df, with_labels=False)
    preds, _ = predict_trajectory(heart.trained.model, data, prep.targets, order=order)
    present = np.stack([data.present[m].numpy() for m in MODALITIES], axis=1)
    return preds, present


def assert_matches(heart, bundle, df, order=None, explain=False):
    preds, present = torch_reference(heart, df, order)
    got = bundle.predict(df.to_dict("records"), order=order, explain=explain)
    has_any = present.any(axis=1)
    np.testing.assert_array_equal(got.ok, has_any)  # rows with no modality: not predicted, with a reason
    assert all(bool(r) == (not h) for r, h in zip(got.reasons, has_any))
    for t in got.tasks:
        np.testing.assert_allclose(got.values[t][has_any], preds[-1][t][has_any], atol=ATOL, rtol=0)
    if explain:
        assert [s.name for s in got.trajectory] == ["prior"] + [f"+{m}" for m in (order or MODALITIES)]
        for s, ref in zip(got.trajectory, preds):
            for t in got.tasks:
                np.testing.assert_allclose(s.values[t][has_any], ref[t][has_any], atol=ATOL, rtol=0)
    return got


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_every_subset_matches_torch(heart, bundle, subset):
    rng = np.random.default_rng(len(subset) * 31 + sum(map(len, subset)))
    idx = rng.choice(len(heart.df), 12, replace=False)
    assert_matches(heart, bundle, blank(heart, idx, [subset] * len(idx)), explain=True)
    assert_matches(heart, bundle, blank(heart, idx[:1], [subset]))  # batch 1: the composed graph, no masks


def test_rows_with_no_modality_get_the_prior_on_request(heart, bundle):
    df = blank(heart, [0, 1], [frozenset(), frozenset()])
    preds, _ = torch_reference(heart, df)
    got = bundle.predict(df.to_dict("records"), min_modalities=0)
    assert got.ok.all()
    for t in got.tasks:
        np.testing.assert_allclose(got.values[t], preds[0][t], atol=ATOL)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_rows_subsets_and_orders_match_torch(heart, bundle, data):
    n = data.draw(st.integers(1, 48), label="n")
    idx = data.draw(st.lists(st.integers(0, len(heart.df) - 1), min_size=n, max_size=n), label="rows")
    subsets = data.draw(st.lists(st.frozensets(st.sampled_from(MODALITIES)), min_size=n, max_size=n), label="subsets")
    order = data.draw(st.one_of(st.none(), st.permutations(MODALITIES)), label="order")
    explain = data.draw(st.booleans(), label="explain")
    assert_matches(heart, bundle, blank(heart, idx, subsets), order=order, explain=explain)


def test_whole_table_in_small_chunks_matches_torch(heart, bundle):
    """Natural missingness of all 920 patients, chunked: the same as one torch batch."""
    rows = heart.df.to_dict("records")
    preds, _ = torch_reference(heart, heart.df)
    got = bundle.predict(rows, chunk_size=97)
    assert got.ok.all()
    for t in got.tasks:
        np.testing.assert_allclose(got.values[t], preds[-1][t], atol=ATOL)


def test_csv_input_matches_dict_rows(heart, bundle, tmp_path):
    path = tmp_path / "rows.csv"
    heart.df.head(50).to_csv(path, index=False)
    a = bundle.predict(path, chunk_size=16)
    b = bundle.predict(pd.read_csv(path).to_dict("records"))
    for t in a.tasks:
        np.testing.assert_allclose(a.values[t], b.values[t], atol=1e-7)


def test_pre_encoded_run_matches_torch(heart, bundle):
    prep = heart.trained.preprocessor
    data = encode(prep, heart.df.head(64), with_labels=False)
    feats = {m: data.x[m].numpy() for m in MODALITIES}
    pres = {m: data.present[m].numpy() for m in MODALITIES}
    final, traj = bundle.run(feats, pres, trajectory=True)
    preds, _ = predict_trajectory(heart.trained.model, data, prep.targets)
    for t in final:
        np.testing.assert_allclose(final[t], preds[-1][t], atol=ATOL)
        for (_, _, vals), ref in zip(traj, preds):
            np.testing.assert_allclose(vals[t], ref[t], atol=ATOL)


@pytest.mark.parametrize("encoder", ["mlp", "gru"])
def test_regression_and_gru_encoders_match_torch(tmp_path, encoder):
    """Another architecture and a regression task (de-standardized): untrained weights are enough for parity."""
    import torch

    from edge_runtime import load_bundle
    from mmn_fed import ModelConfig, fit_preprocessor, make_synthetic
    from mmn_fed.export import export_bundle
    from mmn_fed.model_io import TrainedModel, build_from_preprocessor

    df, schema = make_synthetic(n=200, modalities={"a": 3, "b": 2, "c": 4}, missing_rate=0.3, seed=1)
    prep = fit_preprocessor(schema, df)
    torch.manual_seed(0)
    cfg = ModelConfig(dropout=0.0, encoder=encoder, state_size=8, hidden=16)
    model = build_from_preprocessor(prep, cfg).eval()
    path = export_bundle(TrainedModel(model, prep, cfg, {}), tmp_path / "b")
    got = load_bundle(path, allow_unsigned=True).predict(df.to_dict("records"), min_modalities=0, explain=True)
    data = encode(prep, df, with_labels=False)
    preds, _ = predict_trajectory(model, data, prep.targets)
    assert prep.targets["score"]["std"] != 1.0
    for t in ("outcome", "score"):
        atol = ATOL * max(1.0, prep.targets[t].get("std", 1.0))  # regression: within 1e-5 of the standardized value
        np.testing.assert_allclose(got.values[t], preds[-1][t], atol=atol, rtol=0)
        for s, ref in zip(got.trajectory, preds):
            np.testing.assert_allclose(s.values[t], ref[t], atol=atol, rtol=0)


def test_the_public_onnxruntime_run_gives_the_same_predictions(heart, bundle, monkeypatch):
    """``Bundle.use_binding = False`` runs every session through the public ``InferenceSession.run`` (the
    fallback for an onnxruntime without the private ``_sess`` binding): the predictions are identical."""
    import onnxruntime as ort

    from edge_runtime import load_bundle

    public_calls = []
    real_run = ort.InferenceSession.run

    def counted(self, *args, **kwargs):  # the real run, counted
        public_calls.append(1)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "run", counted)
    rng = np.random.default_rng(7)
    idx = rng.choice(len(heart.df), 40, replace=False)
    df = blank(heart, idx, [SUBSETS[i] for i in rng.integers(1, len(SUBSETS), len(idx))])
    rows = df.to_dict("records")
    fast = load_bundle(heart.bundle, trust_key=heart.public_key)
    expected = [fast.predict(rows, explain=True), fast.predict(rows[:1]), fast.predict(rows[1:2], explain=True)]
    assert not public_calls  # the binding ran them all
    public = load_bundle(heart.bundle, trust_key=heart.public_key)
    public.use_binding = False
    got = [public.predict(rows, explain=True), public.predict(rows[:1]), public.predict(rows[1:2], explain=True)]
    assert len(public_calls) == 6  # two session calls per predict (preprocessing, model), all through the public run
    for e, g in zip(expected, got):
        for t in e.tasks:
            np.testing.assert_array_equal(g.values[t], e.values[t])
        for se, sg in zip(e.trajectory or [], g.trajectory or []):
            assert se.name == sg.name
            for t in e.tasks:
                np.testing.assert_array_equal(sg.values[t], se.values[t])
    assert_matches(heart, public, df, explain=True)  # and both match torch
