"""mmn-fed edge runtime: numpy + onnxruntime (+ cryptography). Never imports torch, pandas or flwr.

    from edge_runtime import load_bundle
    bundle = load_bundle("bundle/", trust_key="signer.pub")   # verifies before any ONNX session exists
    bundle.describe(); bundle.predict(rows, explain=True)

The bundle API is imported lazily, so the training side (which uses only the schema and preprocessing
from here) does not pay for importing onnxruntime.
"""
from .preprocessing import DataError, Preprocessor, RowIssue
from .schema import Schema, SchemaError, Task

_LAZY = {
    "load_bundle": "bundle", "Bundle": "bundle", "Predictions": "bundle", "Step": "bundle",
    "BundleError": "trust", "UntrustedBundleError": "trust", "verify_bundle": "trust",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")


__all__ = ["DataError", "Preprocessor", "RowIssue", "Schema", "SchemaError", "Task", *_LAZY]
