"""P-Fusion over a window of steps (mmn_fed.pfusion_window): the carry-forward and per-variable indicators, causality,
training in the sequence harness, the model file, the CLI and the refused export."""
import json

import numpy as np
import pytest
import torch

from mmn_fed import ModelConfig, TrainConfig
from mmn_fed.data import fit_preprocessor
from mmn_fed.metrics import auroc
from mmn_fed.model_io import build_from_preprocessor, load_model
from mmn_fed.pfusion_window import WindowPFusion, carry_forward, variable_widths
from mmn_fed.sequences import (build_sequences, encode_sequences, make_synthetic_sequences, predict_steps, row_schema,
                               train_sequences)

# One modality of three variables: a and b numeric, c categorical with two categories (features: a, b, c=0, c=1).
WIDTHS = [1, 1, 2]
# Subject A's five steps are rows 2-6, subject B's two steps rows 0-1 (rows need not be in subject order).
X = torch.tensor([
    [0.0, 0.0, 0.0, 0.0],   # B step 0: nothing observed
    [0.0, -1.0, 0.0, 0.0],  # B step 1: b = -1
    [1.0, 0.0, 1.0, 0.0],   # A step 0: a = 1, c = 0
    [0.0, 2.0, 0.0, 0.0],   # A step 1: b = 2
    [0.0, 0.0, 0.0, 0.0],   # A step 2: nothing observed
    [3.0, 0.0, 0.0, 0.0],   # A step 3: a = 3 (observed again after its window expired at step 2)
    [4.0, 0.0, 0.0, 1.0],   # A step 4: a = 4 (its own value, not step 3's), c = 1
])
PRESENT = torch.tensor([False, True, True, True, False, True, True])
INDEX = torch.tensor([[2, 3, 4, 5, 6], [0, 1, -1, -1, -1]])


def test_carry_forward_keeps_each_variables_last_value_within_the_window_and_flags_the_others():
    values, missing = carry_forward(X, PRESENT, INDEX, WIDTHS, window=2)
    expected_a = [[1, 0, 1, 0], [1, 2, 1, 0], [0, 2, 0, 0], [3, 0, 0, 0], [4, 0, 0, 1]]  # window 2: steps t-1 and t
    expected_a_missing = [[0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 1, 1], [0, 1, 0]]
    assert values[0].tolist() == expected_a
    assert missing[0].int().tolist() == expected_a_missing
    assert values[1, :2].tolist() == [[0, 0, 0, 0], [0, -1, 0, 0]]
    assert missing[1, :2].int().tolist() == [[1, 1, 1], [1, 0, 1]]
    assert missing[1, 2:].all()  # after B's last step: nothing
    # window 1: each step's own values only; a long window carries a as far back as step 0
    values1, missing1 = carry_forward(X, PRESENT, INDEX, WIDTHS, window=1)
    assert torch.equal(values1[0], X[INDEX[0]]) and missing1[0, 2].all() and missing1[0, 1].int().tolist() == [1, 0, 1]
    values9, missing9 = carry_forward(X, PRESENT, INDEX, WIDTHS, window=9)
    assert values9[0, 2].tolist() == [1, 2, 1, 0] and not missing9[0, 1:].any()
    with pytest.raises(ValueError, match="pfusion-window"):
        carry_forward(X, PRESENT, INDEX, WIDTHS, window=0)


def test_a_one_variable_modality_is_observed_by_its_presence_even_at_the_mean():
    x = torch.tensor([[0.0], [0.0]])  # a value equal to the training mean encodes as 0; row 1 is truly missing
    values, missing = carry_forward(x, torch.tensor([True, False]), torch.tensor([[0, 1]]), [1], window=3)
    assert missing[0].flatten().tolist() == [False, False] and values[0].flatten().tolist() == [0.0, 0.0]


def test_the_model_reads_window_inputs_and_the_static_modalities_from_the_first_step():
    config = ModelConfig(kind="pfusion", state_size=4, hidden=8, pfusion_window=2)
    model = WindowPFusion({"static": 2, "labs": 4}, {"y": 1}, config, {"labs": WIDTHS})
    static = torch.arange(14, dtype=torch.float32).reshape(7, 2)
    xs, ps = model.window_inputs({"static": static, "labs": X},
                                 {"static": torch.ones(7, dtype=torch.bool), "labs": PRESENT}, INDEX)
    # rows subject-major: A's five steps, then B's two; static = each subject's first step row (A: row 2, B: row 0)
    assert xs["static"].tolist() == [static[2].tolist()] * 5 + [static[0].tolist()] * 2
    assert xs["labs"][2].tolist() == [0, 2, 0, 0, 1, 0, 1]  # window values, then a/b/c missing indicators
    assert ps["labs"].tolist() == [True, True, True, True, True, False, True]  # B step 0: nothing within the window
    assert model.encoders["labs"][0][0].in_features == 4 + 3
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoders", "decoders"}
    with pytest.raises(TypeError, match="use forward_sequence"):
        model({"static": static, "labs": X}, {"static": PRESENT, "labs": PRESENT})


@pytest.fixture(scope="module")
def synthetic():
    df, schema = make_synthetic_sequences(40, 10, seed=0)
    return build_sequences(schema, df), schema


def test_a_prediction_depends_only_on_the_steps_up_to_it(synthetic):
    seqs, schema = synthetic
    prep = fit_preprocessor(row_schema(schema), seqs.steps)
    torch.manual_seed(0)
    model = build_from_preprocessor(prep, ModelConfig(kind="pfusion", pfusion_window=3), schema).eval()
    data = encode_sequences(prep, seqs, schema.timeseries.modalities)
    with torch.no_grad():
        full, rows = model.forward_sequence(data.rows.x, data.rows.present, data.index, data.dynamic)
        k = 4
        cut, cut_rows = model.forward_sequence(data.rows.x, data.rows.present, data.index[:, : k + 1], data.dynamic)
    kept = torch.isin(rows, cut_rows)
    assert int(kept.sum()) == len(cut_rows) == len(seqs.ids) * (k + 1)
    order = torch.argsort(cut_rows)
    assert torch.allclose(full["high_risk"][kept][torch.argsort(rows[kept])], cut["high_risk"][order], atol=1e-6)


def test_train_sequences_trains_pfusion_above_chance_and_the_model_file_round_trips(synthetic, tmp_path):
    from mmn_fed.api import save_trained

    seqs, schema = synthetic
    train, test = seqs.subjects(np.arange(30)), seqs.subjects(np.arange(30, 40))
    res = train_sequences(train, schema, ModelConfig(kind="pfusion", pfusion_window=2), TrainConfig(epochs=8, seed=0))
    trained = res.trained
    assert isinstance(trained.model, WindowPFusion) and trained.config.encoder == "mlp"  # no GRU override
    data = encode_sequences(trained.preprocessor, test, schema.timeseries.modalities)
    p = predict_steps(trained.model, data, trained.preprocessor.targets, trained.preprocessor.schema)["high_risk"]
    assert auroc(data.rows.y["high_risk"].numpy(), p) > 0.85  # 0.93 here; inputs zeroed: 0.70
    loaded = load_model(save_trained(tmp_path / "model.pt", trained))
    assert isinstance(loaded.model, WindowPFusion) and loaded.model.window == 2 == loaded.config.pfusion_window
    again = predict_steps(loaded.model, data, loaded.preprocessor.targets, loaded.preprocessor.schema)["high_risk"]
    np.testing.assert_allclose(again, p, atol=1e-6)


def test_variable_widths_follow_the_encoded_features():
    from mmn_fed import load_builtin

    df, schema = load_builtin("pbcseq")
    prep = fit_preprocessor(row_schema(schema), build_sequences(schema, df[df["id"] <= 30]).steps)
    widths = variable_widths(prep, schema.timeseries.modalities)
    assert widths["labs"] == [1] * 6 and widths["lipids"] == [1]
    assert all(sum(w) == prep.modality_dims[m] for m, w in widths.items())
    assert widths["signs"] == [len(prep.columns[c]["categories"]) for c in schema.modalities["signs"]]


def test_mmn_fed_train_pfusion_on_pbcseq_writes_a_model_that_export_refuses(tmp_path, capsys):
    from mmn_fed.cli import main
    from mmn_fed.export import ExportError, export_bundle

    assert main(["train", "--dataset", "pbcseq", "--model", "pfusion", "--pfusion-window", "4", "--epochs", "2",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["test"]["death_or_transplant_2y:auroc"] > 0.5
    trained = load_model(tmp_path / "out" / "model.pt")
    assert isinstance(trained.model, WindowPFusion) and trained.model.window == 4
    with pytest.raises(ExportError, match="P-Fusion time-series model \\(window of 4 steps\\) is not exported"):
        export_bundle(trained, tmp_path / "bundle")
