"""Model files: weights + JSON metadata in one torch file, loadable with weights_only=True.

Layout: {"format": "mmn-fed-model", "version": 1, "state_dict": {...tensors}, "metadata": "<json>"}
metadata = {model_config, preprocessing (schema + statistics), train_config, provenance}.
torch.save writes a zip archive whose data.pkl pickles only plain containers and tensors (no classes);
torch.load(weights_only=True) unpickles nothing else. The model is rebuilt from its JSON config and the
weights loaded in.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from edge_runtime.preprocessing import Preprocessor
from edge_runtime.schema import Schema

from .model import ModelConfig, build_model

FORMAT = "mmn-fed-model"
VERSION = 1


STANDARD_KEYS = ("model_config", "preprocessing", "train_config", "provenance")  # metadata every file has


def model_id(path: str | Path) -> str:
    """A model file's identity: the first 16 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ModelFileError(ValueError):
    """A model file is missing, not ours, or of an unsupported version."""


@dataclass
class TrainedModel:
    """A model with everything needed to use it on raw rows."""

    model: nn.Module
    preprocessor: Preprocessor
    config: ModelConfig
    metadata: dict[str, Any]

    @property
    def schema(self):
        return self.preprocessor.schema


def build_from_preprocessor(prep: Preprocessor, config: ModelConfig, ts: Schema | None = None) -> nn.Module:
    """The model ``config`` asks for, sized by the fitted preprocessing. ``ts``: the time-series schema of a
    sequence model (its ``[timeseries]`` modalities are the time-series ones): P-Fusion then is the window model
    (``mmn_fed.pfusion_window``); MultiModN is the same model either way."""
    task_dims = {t: prep.task_out_dim(t) for t in prep.schema.tasks}
    if config.kind == "pfusion" and ts is not None and ts.timeseries is not None:
        from .pfusion_window import WindowPFusion, variable_widths
        return WindowPFusion(prep.modality_dims, task_dims, config, variable_widths(prep, ts.timeseries.step_modalities))
    return build_model(prep.modality_dims, task_dims, config)


def save_model(path: str | Path, model: nn.Module, prep: Preprocessor, config: ModelConfig,
               train_config: Mapping | None = None, provenance: Mapping | None = None,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write a model file. ``extra``: more JSON metadata, e.g. ``audit`` (the training sites' missingness
    audit, ``AuditResult.to_dict()``) or ``recalibration`` (where a site recalibrated it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model_config": config.to_dict(),
        "preprocessing": prep.to_dict(),
        "train_config": dict(train_config or {}),
        "provenance": {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            **dict(provenance or {}),
        },
        **{k: v for k, v in dict(extra or {}).items() if k not in STANDARD_KEYS},
    }
    payload = {"format": FORMAT, "version": VERSION,
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
               "metadata": json.dumps(meta)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path) -> TrainedModel:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{path} is not a readable mmn-fed model file: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an mmn-fed model file")
    if payload.get("version") != VERSION:
        raise ModelFileError(f"{path} has model format version {payload.get('version')}; this mmn-fed reads {VERSION}")
    meta = json.loads(payload["metadata"])
    prep = Preprocessor.from_dict(meta["preprocessing"])
    config = ModelConfig.from_dict(meta["model_config"])
    ts = meta.get("timeseries_schema")  # a sequence model (mmn_fed.sequences)
    model = build_from_preprocessor(prep, config, Schema.from_dict(ts) if ts else None)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return TrainedModel(model, prep, config, meta)
