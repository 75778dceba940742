"""mmn-fed: MultiModN made federated. Model library: schema, preprocessing, models, training,
metrics, interpretability and model files."""
from edge_runtime.preprocessing import DataError, Preprocessor
from edge_runtime.schema import Schema, SchemaError

from .api import TrainResult, evaluate_frame, save_trained, train_centralized
from .data import encode, fit_preprocessor, load_builtin, load_dataset, make_synthetic, site_summary
from .model import ModelConfig, MultiModN, PFusion, build_model
from .model_io import TrainedModel, load_model, save_model
from .training import TrainConfig

__version__ = "0.1.0"
__all__ = [
    "DataError", "ModelConfig", "MultiModN", "PFusion", "Preprocessor", "Schema", "SchemaError", "TrainConfig",
    "TrainResult", "TrainedModel", "build_model", "encode", "evaluate_frame", "fit_preprocessor", "load_builtin",
    "load_dataset", "load_model", "make_synthetic", "save_model", "save_trained", "site_summary", "train_centralized",
]
