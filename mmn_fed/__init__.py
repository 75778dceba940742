"""mmn-fed: MultiModN made federated. Model library: schema, preprocessing, models, training,
metrics, interpretability and model files.

Its public names are imported lazily (PEP 562), so ``import mmn_fed.cli`` (the ``mmn-fed`` entry point) works
on the edge-only install, which has no torch or pandas: the command asked for then names the extra it needs.
"""
from edge_runtime.preprocessing import DataError, Preprocessor
from edge_runtime.schema import Schema, SchemaError

from .version import __version__

_LAZY = {
    "TrainResult": "api", "evaluate_frame": "api", "save_trained": "api", "train_centralized": "api",
    "encode": "data", "fit_preprocessor": "data", "load_builtin": "data", "load_dataset": "data",
    "make_synthetic": "data", "site_summary": "data",
    "ModelConfig": "model", "MultiModN": "model", "PFusion": "model", "build_model": "model",
    "TrainedModel": "model_io", "load_model": "model_io", "save_model": "model_io",
    "TrainConfig": "training",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'mmn_fed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "DataError", "ModelConfig", "MultiModN", "PFusion", "Preprocessor", "Schema", "SchemaError", "TrainConfig",
    "TrainResult", "TrainedModel", "build_model", "encode", "evaluate_frame", "fit_preprocessor", "load_builtin",
    "load_dataset", "load_model", "make_synthetic", "save_model", "save_trained", "site_summary", "train_centralized",
]
