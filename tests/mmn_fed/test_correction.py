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


# ---- time series: the visit rate balanced against the outcome -----------------------------------------------

def visits(rate_sick: float, rate_healthy: float, n: int = 400, span: float = 100.0, seed: int = 0):
    """Encoded sequences of ``n`` subjects followed for ``span`` time units, half with the event (label 1 at every
    step), each seen at Poisson times of its group's rate (plus a first visit at 0)."""
    from mmn_fed.sequences import SequenceData

    rng = np.random.default_rng(seed)
    times, labels, index_rows, row = [], [], [], 0
    for i in range(n):
        sick = i % 2
        k = rng.poisson((rate_sick if sick else rate_healthy) * span)
        t = np.concatenate([[0.0], np.sort(rng.uniform(0, span, k))])
        index_rows.append(list(range(row, row + len(t))))
        row += len(t)
        times += t.tolist()
        labels += [float(sick)] * len(t)
    width = max(map(len, index_rows))
    index = torch.tensor([r + [-1] * (width - len(r)) for r in index_rows])
    m = len(times)
    rows = TensorData({"static": torch.zeros(m, 1), "lab": torch.zeros(m, 1)},
                      {"static": torch.ones(m, dtype=torch.bool), "lab": torch.ones(m, dtype=torch.bool)},
                      {"y": torch.tensor(labels)}, {"y": torch.ones(m, dtype=torch.bool)})
    return SequenceData(rows, index, ("lab",), np.asarray(times))


def _rate(data, sick: bool) -> float:
    idx = data.index.numpy()
    y = data.rows.y["y"].numpy()[idx[:, 0]] > 0.5
    seen = data.rows.present["lab"].numpy()
    later = [seen[r[r >= 0][1:]].sum() for r in idx[y == sick]]
    return float(np.sum(later)) / (100.0 * int((y == sick).sum()))


def test_visit_keep_probabilities_equalize_the_visit_rate_of_the_outcomes_and_keep_first_visits():
    from mmn_fed.correction import thin_sequences, visit_keep_probabilities

    data = visits(0.3, 0.1)
    keep = visit_keep_probabilities(data, "y", smoothing=0.0).numpy()
    first = data.index[:, 0].numpy()
    assert (keep[first] == 1.0).all()  # a subject never disappears
    healthy_rows = data.index[0::2][data.index[0::2] >= 0].numpy()
    sick_later = data.index[1::2, 1:][data.index[1::2, 1:] >= 0].numpy()
    assert (keep[healthy_rows] == 1.0).all()  # the group measured least keeps everything
    # a group's rate: its visits after the first per unit of observed follow-up (first to last visit)
    idx = data.index.numpy()
    spans = np.array([data.times[r[r >= 0]].max() - data.times[r[0]] for r in idx])
    extra = (idx >= 0).sum(axis=1) - 1
    rate = [extra[g::2].sum() / spans[g::2].sum() for g in (0, 1)]
    assert keep[sick_later].mean() == pytest.approx(rate[0] / rate[1], rel=1e-6)
    assert 0.25 < keep[sick_later].mean() < 0.45  # about 0.1 / 0.3
    thinned = thin_sequences(data, {}, torch.from_numpy(keep), torch.Generator().manual_seed(0))
    assert _rate(thinned, True) == pytest.approx(_rate(thinned, False), rel=0.1)
    hidden = ~thinned.rows.present["lab"].numpy()
    # a hidden step is a visit that did not happen: no update (time-series modalities) and no loss cell
    assert hidden.any() and not thinned.rows.y_present["y"].numpy()[hidden].any()
    assert thinned.rows.present["static"].all()  # static modalities are not time-series: never hidden
    # the same rates keep every visit: the site's test finds no dependence, nothing is hidden and nothing drawn
    assert (visit_keep_probabilities(visits(0.2, 0.2, n=2000), "y").numpy() == 1.0).all()
    close = visits(0.21, 0.2, n=100)  # a 5% difference is not evidence at this size...
    assert (visit_keep_probabilities(close, "y").numpy() == 1.0).all()
    assert visit_keep_probabilities(close, "y", alpha=None).numpy().min() < 1.0  # ...unless told to balance anyway


def test_time_series_correction_is_decided_from_the_setting():
    from mmn_fed.correction import VISITS, resolve_sequences, thin_sequences

    _, schema = load_builtin("pbcseq")
    from mmn_fed.sequences import row_schema

    rs = row_schema(schema)
    assert resolve_sequences("off", None, rs) == {}
    assert resolve_sequences("auto", None, rs) == {VISITS: "death_or_transplant_2y"}
    regression = Schema.from_dict({"modalities": {"a": ["x"]}, "tasks": {"v": {"column": "v", "kind": "regression"}}})
    assert VISITS not in resolve_sequences("auto", None, regression)
    data = visits(0.3, 0.1, n=20)
    assert thin_sequences(data, {}, None, torch.Generator()) is data  # no correction: no draw, the same data


def test_train_sequences_balances_the_visit_rate_by_default_and_records_it():
    from mmn_fed.correction import VISITS
    from mmn_fed.sequences import build_sequences, train_sequences

    df, schema = load_builtin("pbcseq")
    df = df[df["id"] <= 120]
    # patients without the event lose 80% of their later visits (sicker patients are measured more often)
    later = df.duplicated("id") & (df["status"] == 0).to_numpy()
    df = df[~(later & (np.random.default_rng(0).random(len(df)) < 0.8))]
    seqs = build_sequences(schema, df)
    cfg = ModelConfig(state_size=8, hidden=8)
    auto = train_sequences(seqs, schema, cfg, TrainConfig(epochs=2, seed=0))
    off = train_sequences(seqs, schema, cfg, TrainConfig(epochs=2, seed=0, missingness="off"))
    assert auto.trained.metadata["provenance"]["missingness"]["corrected"] == {VISITS: "death_or_transplant_2y"}
    assert off.trained.metadata["provenance"]["missingness"]["corrected"] == {}
    a, b = auto.trained.model.state_dict(), off.trained.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the correction changed what training saw
