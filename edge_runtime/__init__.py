"""mmn-fed edge runtime: numpy + onnxruntime (+ cryptography). Never imports torch, pandas or flwr."""
from .preprocessing import DataError, Preprocessor, RowIssue
from .schema import Schema, SchemaError, Task

__all__ = ["DataError", "Preprocessor", "RowIssue", "Schema", "SchemaError", "Task"]
