"""One small heart model, exported once per test session as a signed bundle (and an unsigned copy)."""
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Heart:
    df: object  # pandas DataFrame of the built-in heart table
    trained: object  # mmn_fed TrainedModel
    model_path: Path
    bundle: Path  # signed
    unsigned: Path
    private_key: Path
    public_key: Path
    other_public_key: Path


@pytest.fixture(scope="session")
def heart(tmp_path_factory) -> Heart:
    import torch

    from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
    from mmn_fed.api import save_trained
    from mmn_fed.export import export_bundle, generate_keypair

    root = tmp_path_factory.mktemp("edge")
    df, schema = load_builtin("heart")
    torch.manual_seed(0)
    res = train_centralized(df, schema, ModelConfig(dropout=0.0), TrainConfig(epochs=3, patience=3, seed=0))
    model_path = save_trained(root / "model.pt", res.trained)
    priv, pub = generate_keypair(root / "keys")
    _, other_pub = generate_keypair(root / "other-keys")
    bundle = export_bundle(model_path, root / "bundle", sign_key=priv)
    unsigned = export_bundle(model_path, root / "unsigned")
    res.trained.model.eval()
    return Heart(df, res.trained, model_path, bundle, unsigned, priv, pub, other_pub)


@pytest.fixture(scope="session")
def bundle(heart):
    from edge_runtime import load_bundle

    return load_bundle(heart.bundle, trust_key=heart.public_key)


@pytest.fixture()
def bundle_copy(heart, tmp_path) -> Path:
    """A private copy of the signed bundle, free to damage."""
    return Path(shutil.copytree(heart.bundle, tmp_path / "bundle"))


@dataclass
class Support2:  # also the weather fixture's type
    df: object
    bundle: Path  # signed with heart's key
    public_key: Path


@pytest.fixture(scope="session")
def support2(tmp_path_factory, heart) -> Support2:
    """A small support2 model (binary, multiclass tasks; string missing codes) as a signed bundle."""
    from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
    from mmn_fed.export import export_bundle

    root = tmp_path_factory.mktemp("support2")
    df, schema = load_builtin("support2")
    res = train_centralized(df.iloc[:3000], schema, ModelConfig(dropout=0.0), TrainConfig(epochs=1, patience=1, seed=0))
    return Support2(df, export_bundle(res.trained, root / "bundle", sign_key=heart.private_key), heart.public_key)


@pytest.fixture(scope="session")
def weather(tmp_path_factory, heart) -> Support2:
    """A small regression model (next-day temperature, nycflights13 weather) as a signed bundle."""
    from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
    from mmn_fed.export import export_bundle

    root = tmp_path_factory.mktemp("weather")
    df, schema = load_builtin("nycflights13_weather")
    df = df.iloc[:2000]
    res = train_centralized(df, schema, ModelConfig(dropout=0.0), TrainConfig(epochs=1, patience=1, seed=0))
    return Support2(df, export_bundle(res.trained, root / "bundle", sign_key=heart.private_key), heart.public_key)


@pytest.fixture(scope="session")
def odd(tmp_path_factory, heart) -> Support2:
    """Heart with odd corners, exported at opset 12 (Unsqueeze takes axes as an attribute there): a modality
    whose one categorical column was never observed (no features), a text missing code ('unk') in the numeric
    column age, and column names with spaces, dots, quotes, commas and accents."""
    import numpy as np

    from edge_runtime.schema import Schema
    from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
    from mmn_fed.export import export_bundle

    root = tmp_path_factory.mktemp("odd")
    df, schema = load_builtin("heart")
    d = schema.to_dict()
    df = df.rename(columns={"age": "age (yrs).1", "sex": 'sëx, "q"'}).assign(never=np.nan)
    d["modalities"][0]["columns"] = ["age (yrs).1", 'sëx, "q"']
    d["modalities"].append({"name": "extra", "columns": ["never"]})
    d["columns"]["categorical"] = [c if c != "sex" else 'sëx, "q"' for c in d["columns"]["categorical"]] + ["never"]
    d["columns"]["missing_codes"]["age (yrs).1"] = ["unk", -1]
    schema = Schema.from_dict(d)
    res = train_centralized(df, schema, ModelConfig(dropout=0.0), TrainConfig(epochs=1, patience=1, seed=0))
    return Support2(df, export_bundle(res.trained, root / "bundle", sign_key=heart.private_key, opset=12),
                    heart.public_key)
