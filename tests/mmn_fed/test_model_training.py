import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from mmn_fed import ModelConfig, TrainConfig, encode, fit_preprocessor, load_model, make_synthetic, train_centralized
from mmn_fed.api import save_trained
from mmn_fed.data import load_builtin
from mmn_fed.evaluation import evaluate, predict_trajectory
from mmn_fed.figures import pyplot
from mmn_fed.interpret import cp, cp_figure, explained_row, imc, imc_figure, plot_imc
from mmn_fed.metrics import auroc, balanced_accuracy, mean_ci
from mmn_fed.model import MultiModN, build_model
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.modules import group_by_module, module_of
from mmn_fed.training import model_loss, module_counts, train_epochs


@pytest.fixture(scope="module")
def heart():
    df, schema = load_builtin("heart")
    prep = fit_preprocessor(schema, df)
    return df, schema, prep, encode(prep, df)


def fresh(prep, kind="multimodn", seed=0):
    torch.manual_seed(seed)
    m = build_from_preprocessor(prep, ModelConfig(kind=kind, dropout=0.0))
    return m.eval()


def test_parameter_names_follow_the_contract(heart):
    _, schema, prep, _ = heart
    model = fresh(prep)
    modules = set(group_by_module(dict(model.named_parameters())))
    assert modules == {"init_state"} | {f"encoders.{m}" for m in schema.modalities} | {f"decoders.{t}" for t in schema.tasks}
    assert module_of("encoders.imaging.net.0.weight") == "encoders.imaging"


def test_prediction_does_not_depend_on_batch_mates(heart):
    _, _, prep, data = heart
    model = fresh(prep)
    with torch.no_grad():
        full, _ = model(data.x, data.present)
        for i in (0, 400, 700, 919):
            one = data.subset([i])
            solo, _ = model(one.x, one.present)
            for s in range(len(full)):
                for t in full[s]:
                    assert torch.allclose(full[s][t][i], solo[s][t][0], atol=1e-6)


def test_missing_modality_equals_sequence_without_its_encoder(heart):
    _, _, prep, data = heart
    model = fresh(prep)
    b = data.subset(range(64))
    present = {m: torch.ones(64, dtype=torch.bool) for m in b.present}
    present["rest"] = torch.zeros(64, dtype=torch.bool)
    with torch.no_grad():
        out, applied = model(b.x, present)
        # by hand: s0 -> encoders except 'rest'
        s = model.initial(64)
        for m in model.modalities:
            if m != "rest":
                s = model.encoders[m](s, b.x[m])
        manual = model.decode(s)
    for t in manual:
        assert torch.allclose(out[-1][t], manual[t], atol=1e-6)
    assert not applied[1 + model.modalities.index("rest")].any()


def test_an_explicit_order_is_the_encoders_composed_in_that_order(heart):
    _, _, prep, data = heart
    model = fresh(prep)
    full = np.stack([p.numpy() for p in data.present.values()]).all(axis=0)
    b = data.subset(np.flatnonzero(full)[:50])  # every modality present: the order alone decides
    order = ["imaging", "rest", "demographics", "exercise_ecg", "symptoms"]
    assert order != model.modalities and sorted(order) == sorted(model.modalities)
    with torch.no_grad():
        out, applied = model(b.x, b.present, order=order)
        default, _ = model(b.x, b.present)
        s = model.initial(len(b))
        by_hand = [model.decode(s)]
        for m in order:
            s = model.encoders[m](s, b.x[m])
            by_hand.append(model.decode(s))
    assert len(out) == len(by_hand) == 1 + len(order)
    for i in range(len(out)):
        assert torch.allclose(out[i]["disease"], by_hand[i]["disease"], atol=1e-6), i
    assert not torch.allclose(out[-1]["disease"], default[-1]["disease"], atol=1e-3)  # the order is not ignored


def test_shuffled_order_training_draws_a_new_permutation_per_batch():
    df, schema = make_synthetic(480, {"a": 2, "b": 2, "c": 2}, seed=5)
    schema = schema.subset(tasks=["outcome"])
    prep = fit_preprocessor(schema, df)
    data = encode(prep, df)
    runs = {}
    for shuffle in (False, True):
        torch.manual_seed(0)
        model = build_from_preprocessor(prep, ModelConfig(dropout=0.0, state_size=8, hidden=8))
        tc = TrainConfig(batch_size=8, seed=0, shuffle_order=shuffle)
        calls = []
        hooks = [model.encoders[m].register_forward_hook(lambda mod, inp, out, m=m: calls.append(m))
                 for m in model.modalities]
        stats = train_epochs(model, schema, data, tc, 1, torch.Generator().manual_seed(0))
        for h in hooks:
            h.remove()
        assert stats["steps"] == 60 and len(calls) == 60 * 3  # every batch holds every modality
        runs[shuffle] = ([tuple(calls[i:i + 3]) for i in range(0, len(calls), 3)], model.state_dict())
    fixed, shuffled = runs[False][0], runs[True][0]
    assert set(fixed) == {("a", "b", "c")}
    assert all(sorted(o) == ["a", "b", "c"] for o in shuffled)
    # 60 batches, 6 permutations: each is drawn (a per-epoch or a single draw would show one)
    assert len(set(shuffled)) == 6
    assert sum(a != b for a, b in zip(shuffled, shuffled[1:])) > 30
    moved = [k for k in runs[False][1] if not torch.equal(runs[False][1][k], runs[True][1][k])]
    assert moved, "shuffled-order training gave the fixed-order weights"


def test_loss_counts_only_existing_cells(heart):
    _, schema, prep, data = heart
    model = fresh(prep)
    b = data.subset(range(32))
    no_labels = type(b)(b.x, b.present, b.y, {t: torch.zeros_like(p) for t, p in b.y_present.items()})
    loss, cells = model_loss(model, schema, no_labels)
    assert cells == 0 and float(loss) == 0.0
    _, cells = model_loss(model, schema, b)
    expected = sum(int((a & b.y_present[t]).sum()) for a in [torch.ones(32, dtype=torch.bool)] + [b.present[m] for m in model.modalities]
                   for t in schema.tasks)
    assert cells == expected


def test_module_counts(heart):
    _, _, prep, data = heart
    counts = module_counts(fresh(prep), data)
    assert counts["init_state"] == 920
    assert counts["encoders.imaging"] == int(data.present["imaging"].sum()) < 920
    assert counts["decoders.disease"] == 920


def test_training_is_seeded_and_learns():
    df, schema = make_synthetic(400, {"a": 3, "b": 3}, {"a": 2.0, "b": 0.0}, seed=1)
    tc = TrainConfig(epochs=8, seed=3, patience=100)
    r1 = train_centralized(df, schema.subset(tasks=["outcome"]), ModelConfig(), tc)
    r2 = train_centralized(df, schema.subset(tasks=["outcome"]), ModelConfig(), tc)
    for k, v in r1.trained.model.state_dict().items():
        assert torch.equal(v, r2.trained.model.state_dict()[k]), k
    assert r1.fit_info["best_val"] > 0.8  # AUROC on validation: modality a is informative


def test_pfusion_trains_with_the_same_loop_and_zero_fills():
    df, schema = make_synthetic(300, {"a": 3, "b": 3}, seed=2, missing_rate=0.3)
    r = train_centralized(df, schema, ModelConfig(kind="pfusion"), TrainConfig(epochs=5, seed=0, patience=100))
    model = r.trained.model
    data = encode(r.trained.preprocessor, df)
    x = {m: v.clone() for m, v in data.x.items()}
    x["b"] = torch.randn_like(x["b"]) * 100  # garbage in a missing modality must not matter
    absent = {"a": data.present["a"], "b": torch.zeros(len(data), dtype=torch.bool)}
    with torch.no_grad():
        o1, _ = model(data.x, absent)
        o2, _ = model(x, absent)
    assert torch.allclose(o1[0]["outcome"], o2[0]["outcome"])


def test_model_file_roundtrip_weights_only(tmp_path, heart):
    df, schema, prep, data = heart
    r = train_centralized(df.iloc[:300], schema, ModelConfig(), TrainConfig(epochs=2, seed=0))
    path = save_trained(tmp_path / "m.pt", r.trained)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "mmn-fed-model" and isinstance(raw["metadata"], str)
    meta = json.loads(raw["metadata"])
    assert set(meta) >= {"model_config", "preprocessing", "train_config", "provenance"}
    loaded = load_model(path)
    d = encode(loaded.preprocessor, df.iloc[:50])
    p1, _ = predict_trajectory(r.trained.model, d, prep.targets)
    p2, _ = predict_trajectory(loaded.model, d, loaded.preprocessor.targets)
    assert np.allclose(p1[-1]["disease"], p2[-1]["disease"])


def test_evaluate_records_are_tidy(heart):
    _, schema, prep, data = heart
    model = fresh(prep)
    recs = evaluate(model, schema, prep.targets, data, {"model": "multimodn", "training": "centralized", "seed": 0},
                    sites=np.array(["A"] * 460 + ["B"] * 460))
    keys = {"model", "training", "seed", "condition", "site", "task", "metric", "value", "state", "combination", "n"}
    assert all(keys <= set(r) for r in recs)
    states = {r["state"] for r in recs if r["task"] == "disease" and r["metric"] == "auroc"}
    assert len(states) == 1 + len(schema.modalities) + 1  # final + (E+1) states
    assert {r["site"] for r in recs} == {"all", "A", "B"}
    assert any(r["combination"] not in ("all",) for r in recs)


def test_imc_and_cp_tables(heart):
    _, schema, prep, data = heart
    model = fresh(prep)
    t = imc(model, data, prep.targets)
    assert set(t["modality"]) == set(schema.modalities)
    # IMC by hand for one modality
    m = "symptoms"
    with torch.no_grad():
        pr = torch.sigmoid(model.decode(model.initial(1))["disease"])[0, 0]
        x = data.x[m][data.present[m]]
        after = torch.sigmoid(model.decode(model.encoders[m](model.initial(len(x)), x))["disease"]).squeeze(-1)
    row = t[(t.modality == m) & (t.task == "disease")].iloc[0]
    assert row.mean_delta == pytest.approx(float((after - pr).mean()), abs=1e-6)
    c = cp(model, data, prep.targets, row=0)
    assert c["step"].max() == len(schema.modalities)
    with pytest.raises(TypeError, match="P-Fusion"):
        imc(fresh(prep, "pfusion"), data, prep.targets)


def drawn(fig):
    """What a heatmap figure shows: the cell values, the row and column labels and the annotations."""
    ax = fig.axes[0]
    cells = np.asarray(ax.images[0].get_array())
    pyplot().close(fig)
    return (cells, [t.get_text() for t in ax.get_yticklabels()], [t.get_text() for t in ax.get_xticklabels()],
            [t.get_text() for t in ax.texts])


def test_imc_and_cp_heatmaps_draw_their_tables(tmp_path, heart):
    _, schema, prep, data = heart
    model = fresh(prep)
    t = imc(model, data, prep.targets)
    outputs = ["disease p(1)"] + [f"severity p({c})" for c in prep.targets["severity"]["classes"]]
    for value, fmt in (("mean_delta", "{:+.2f}"), ("mean_abs_delta", "{:.2f}")):
        cells, rows, cols, texts = drawn(imc_figure(t, value))
        assert rows == list(schema.modalities) and cols == outputs
        for i, m in enumerate(rows):
            for j, col in enumerate(cols):
                task, output = col.split(" ")
                v = t[(t.modality == m) & (t.task == task) & (t.output == output)][value].item()
                assert cells[i, j] == pytest.approx(v)
                assert texts[i * len(cols) + j] == fmt.format(v)
    c = cp(model, data, prep.targets, row=explained_row(data))
    cells, rows, cols, _ = drawn(cp_figure(c))
    assert rows == outputs
    assert cols == ["0:prior"] + [f"{i + 1}:{m}" for i, m in enumerate(schema.modalities)]  # all present
    for j in range(len(cols)):
        assert cells[0, j] == pytest.approx(c[(c.step == j) & (c.task == "disease")].prediction.item())
    missing = cp(model, data, prep.targets, row=int(np.flatnonzero(~data.present["imaging"].numpy())[0]))
    assert drawn(cp_figure(missing))[2][-1] == f"{len(schema.modalities)}:imaging (missing)"
    # the PNG is that figure: its height grows with the rows it draws (modalities for IMC, outputs for CP)
    # (above the minimum height a one- or two-row figure gets, so its colour bar has room for its labels)
    two = plot_imc(t[t.modality.isin(["rest", "imaging"])], tmp_path / "two.png")
    five = plot_imc(t, tmp_path / "five.png")
    h2, h5 = imread(two).shape[0], imread(five).shape[0]
    assert h5 - h2 == pytest.approx(3 * 0.5 * 110, abs=2)  # 0.5 inch per row at 110 dpi


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200), 1)  # ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auroc(y, s) == pytest.approx(brute)
    assert balanced_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.5
    m, lo, hi = mean_ci([0.8, 0.82, 0.84])
    assert lo < m < hi and m == pytest.approx(0.82)


def test_cli_train_writes_model_and_metrics(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mmn_fed.cli", "train", "--dataset", "heart", "--epochs", "3",
                        "--out", str(out), "--quiet", "--explain"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = json.loads((out / "metrics.json").read_text())
    assert {"model", "training", "seed", "condition", "site", "task", "metric", "value"} <= set(recs[0])
    assert (out / "model.pt").exists()
    assert {p.name for p in (out / "figures").iterdir()} == {"imc.png", "imc_abs.png", "cp.png"}
    assert set(pd.read_csv(out / "imc.csv").modality) == set(load_builtin("heart")[1].modalities)
    assert len(pd.read_csv(out / "cp.csv")) > 0
    bad = subprocess.run([sys.executable, "-m", "mmn_fed.cli", "train", "--dataset", "nope.csv", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--schema" in bad.stderr


def test_input_order_is_irrelevant_when_order_is_fixed(heart):
    _, _, prep, data = heart
    model = fresh(prep)
    rev_x = dict(reversed(list(data.x.items())))
    rev_p = dict(reversed(list(data.present.items())))
    with torch.no_grad():
        a, _ = model(data.x, data.present)
        b, _ = model(rev_x, rev_p)
    for s in range(len(a)):
        assert torch.equal(a[s]["disease"], b[s]["disease"])


def test_shuffled_order_training_makes_order_matter_less():
    df, schema = make_synthetic(600, {"a": 3, "b": 3, "c": 3}, seed=4)
    schema = schema.subset(tasks=["outcome"])
    gaps = {}
    for shuffle in (False, True):
        r = train_centralized(df, schema, ModelConfig(dropout=0.0),
                              TrainConfig(epochs=25, seed=0, patience=100, shuffle_order=shuffle))
        m, d = r.trained.model, encode(r.trained.preprocessor, df)
        with torch.no_grad():
            fwd, _ = m(d.x, d.present)
            rev, _ = m(d.x, d.present, order=list(reversed(m.modalities)))
        gaps[shuffle] = float((torch.sigmoid(fwd[-1]["outcome"]) - torch.sigmoid(rev[-1]["outcome"])).abs().mean())
    assert gaps[True] < gaps[False]
