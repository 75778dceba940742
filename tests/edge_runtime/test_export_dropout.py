"""Regression: exporting a model trained with dropout (the CLI default) must export and check in eval mode."""
import numpy as np
import torch

from edge_runtime.bundle import load_bundle
from mmn_fed import ModelConfig, TrainConfig, encode, make_synthetic, train_centralized
from mmn_fed.evaluation import predict_final
from mmn_fed.export import export_bundle


def test_export_of_a_dropout_model_matches_torch(tmp_path):
    df, schema = make_synthetic(200, {"a": 3, "b": 2}, seed=5)
    schema = schema.subset(tasks=["outcome"])
    r = train_centralized(df, schema, ModelConfig(dropout=0.3), TrainConfig(epochs=2, seed=0))
    out = export_bundle(r.trained, tmp_path / "bundle")
    bundle = load_bundle(out, allow_unsigned=True)
    rows = df.head(20).to_dict(orient="records")
    got = bundle.predict(rows).values["outcome"]
    with torch.no_grad():
        want = predict_final(r.trained.model, encode(r.trained.preprocessor, df.head(20)),
                             r.trained.preprocessor.targets)["outcome"]
    assert np.allclose(got, want, atol=1e-5)
    assert not r.trained.model.training  # exporting leaves the model in eval mode
