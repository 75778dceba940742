"""Presence-balanced modality dropout (the MNAR correction): presence becomes independent of the label, the
encoder of a corrected modality learns from rows with the site's label mix, and it undoes learned MNAR."""
import numpy as np
import pandas as pd
import pytest
import torch

from edge_runtime.schema import Schema
from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
from mmn_fed.audit import audit_frame
from mmn_fed.correction import keep_probabilities, resolve, thin
from mmn_fed.data import TensorData, encode
from mmn_fed.evaluation import predict_final
from mmn_fed.metrics import auroc


def tiny() -> TensorData:
    """12 labelled rows: modality a present for 6/6 negatives and 2/6 positives; b always present."""
    y = torch.tensor([0.0] * 6 + [1.0] * 6)
    a = torch.tensor([True] * 6 + [True, True, False, False, False, False])
    b = torch.ones(12, dtype=torch.bool)
    return TensorData({"a": torch.zeros(12, 1), "b": torch.zeros(12, 1)}, {"a": a, "b": b}, {"y": y},
                      {"y": torch.ones(12, dtype=torch.bool)})


def test_keep_probabilities_by_hand():
    keep = keep_probabilities(tiny(), {"a": "y", "b": "y"}, smoothing=0.0)
    # presence share: negatives 1.0, positives 1/3 -> target 1/3: negatives keep a with 1/3, positives with 1
    np.testing.assert_allclose(keep["a"].numpy(), [1 / 3] * 6 + [1.0] * 6)
    np.testing.assert_allclose(keep["b"].numpy(), np.ones(12))  # b is not label-dependent: nothing hidden
    # smoothing pulls each label's share toward the labelled rows' share (8/12), with 5 pseudo-rows
    k = keep_probabilities(tiny(), {"a": "y"})["a"].numpy()
    neg, pos = (6 + 5 * 8 / 12) / 11, (2 + 5 * 8 / 12) / 11
    np.testing.assert_allclose(k, [pos / neg] * 6 + [1.0] * 6, rtol=1e-6)


def test_after_thinning_presence_is_independent_of_the_label():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.random(n) < 0.3
    present = np.where(y, rng.random(n) < 0.35, rng.random(n) < 0.9)  # MNAR: positives mostly lack it
    data = TensorData({"m": torch.zeros(n, 1)}, {"m": torch.from_numpy(present)}, {"y": torch.from_numpy(y).float()},
                      {"y": torch.ones(n, dtype=torch.bool)})
    keep = keep_probabilities(data, {"m": "y"}, smoothing=0.0)
    # in expectation, exactly: the share of positives among rows that reach the encoder = the prevalence
    reach = keep["m"].numpy() * present
    assert reach[y].sum() / reach.sum() == pytest.approx(y.mean(), abs=1e-6)  # float32 keep probabilities
    # and over draws (what training sees, epoch after epoch)
    gen = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(50):
        p = thin(data, keep, gen).present["m"].numpy()
        assert not (p & ~present).any()  # only hides, never invents a value
        shares.append(p[y].sum() / p.sum())
    assert np.mean(shares) == pytest.approx(y.mean(), abs=0.01)
    assert thin(data, {}, gen) is data  # no correction: no draw


def test_a_hidden_modality_gives_its_encoder_no_gradient_from_those_rows():
    """What docs/simulations.md says the correction does to the gradient: rows whose modality is hidden in this
    epoch do not train that modality's encoder; its gradient is the one of the rows that kept it."""
    from mmn_fed.model import MultiModN
    from mmn_fed.training import model_loss

    torch.manual_seed(0)
    schema = Schema.from_dict({"modalities": {"a": ["a1"], "b": ["b1"]},
                               "tasks": {"y": {"column": "y", "kind": "binary", "threshold": 0}},
                               "columns": {"numeric": ["a1", "b1"]}})
    model = MultiModN({"a": 1, "b": 1}, {"y": 1}, ModelConfig(state_size=4, hidden=4))
    data = tiny()
    data = TensorData({"a": torch.randn(12, 1), "b": torch.randn(12, 1)}, data.present, data.y, data.y_present)
    keep = {"a": torch.tensor([0.0] * 3 + [1.0] * 9)}  # rows 0-2 lose a
    shown = thin(data, keep, torch.Generator().manual_seed(0))
    assert shown.present["a"].tolist() == [False] * 3 + data.present["a"].tolist()[3:]

    def grad(d: TensorData) -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout masks in every call
        model.zero_grad()
        loss, _ = model_loss(model, schema, d)
        loss.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("encoders.a.")])

    g = grad(shown)
    # changing rows 0-2's values of a changes nothing: they did not pass through encoder a
    x = dict(shown.x)
    x["a"] = x["a"].clone()
    x["a"][:3] = 100.0
    torch.testing.assert_close(grad(TensorData(x, shown.present, shown.y, shown.y_present)), g)
    assert not torch.allclose(grad(data), g)  # without the correction those rows did train it


def test_resolve_by_mode():
    df, schema = load_builtin("pbc")
    found = audit_frame(schema, df)
    assert resolve("auto", found, schema) == {"lipids": "death_or_transplant"}
    assert resolve("off", found, schema) == {}
    assert resolve("correct", found, schema) == {m: "death_or_transplant" for m in schema.modalities}
    with pytest.raises(ValueError, match="missingness 'sometimes' unknown"):
        resolve("sometimes", found, schema)


def _mnar(df: pd.DataFrame, schema, label: int, rng) -> pd.DataFrame:
    """exercise_ecg removed for 85% of the rows with disease == label."""
    out = df.copy()
    hit = ((df["num"] > 0).astype(int) == label).to_numpy() & (rng.random(len(df)) < 0.85)
    out.loc[hit, list(schema.modalities["exercise_ecg"])] = np.nan
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_auto_undoes_learned_mnar_on_heart(shuffle):
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    rng = np.random.default_rng(0)
    test_idx = rng.random(len(df)) < 0.3
    train = _mnar(df[~test_idx].reset_index(drop=True), schema, 1, rng)
    flipped = _mnar(df[test_idx].reset_index(drop=True), schema, 0, rng)
    scores, plans = {}, {}
    for mode in ("off", "auto"):
        res = train_centralized(train, schema, ModelConfig(state_size=16, hidden=16),
                                TrainConfig(epochs=40, patience=10, seed=0, missingness=mode, shuffle_order=shuffle))
        d = encode(res.trained.preprocessor, flipped)
        p = predict_final(res.trained.model, d, res.trained.preprocessor.targets)["disease"]
        scores[mode] = auroc(d.y["disease"].numpy(), p)
        plans[mode] = res.trained.metadata["provenance"]["missingness"]
    assert plans["auto"]["corrected"] == {"exercise_ecg": "disease"}
    assert plans["off"]["corrected"] == {} and plans["off"]["audit"]["flagged"] == {"exercise_ecg": "disease"}
    assert scores["off"] < 0.6 < 0.8 < scores["auto"], scores
