"""A site's rows and what it does with them: summaries, module counts, local training, evaluation.

Everything a ClientApp handler does, as plain functions of (site data, settings, parameters), so that
the Flower glue in ``clients/app.py`` stays thin.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from edge_runtime.preprocessing import Preprocessor
from edge_runtime.schema import Schema
from mmn_fed import sequences as seq
from mmn_fed.api import stratify_key
from mmn_fed.audit import presence_counts
from mmn_fed.correction import keep_probabilities, sequence_keep, thin, thin_sequences
from mmn_fed.data import TensorData, encode, load_builtin, read_table, site_summary
from mmn_fed.evaluation import evaluate
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.modules import module_of
from mmn_fed.settings import SETTING, SiteSettings
from mmn_fed.training import TrainConfig, eager_optimizers, module_counts, split_indices, train_epochs

from .manifest import read_manifest


class SiteDataError(ValueError):
    """A site cannot find or use its data (node config or run config points nowhere)."""


@dataclass(frozen=True)
class SiteSource:
    """Where a site's rows come from: a CSV (deployment, or a simulation data directory) or a
    built-in dataset split by its site column (simulation without a data directory)."""

    name: str
    path: str = ""
    dataset: str = ""
    partition: int = -1


def site_source(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSource:
    """Deployment: node config ``data-path`` (+ ``site-name``). Simulation: ``partition-id`` indexes the
    sites of the run config's ``data-dir`` (written by ``run_federation``) or of the built-in ``dataset``."""
    if node_config.get("data-path"):
        path = str(node_config["data-path"])
        return SiteSource(str(node_config.get("site-name") or Path(path).stem), path=path)
    if "partition-id" not in node_config:
        raise SiteDataError("node config has neither 'data-path' (deployment) nor 'partition-id' (simulation)")
    pid = int(node_config["partition-id"])
    data_dir, dataset = (SETTING[k].parse(run_config.get(k, SETTING[k].default)) for k in ("data-dir", "dataset"))
    if data_dir:
        manifest = read_manifest(data_dir)
        if pid >= len(manifest["sites"]):
            raise SiteDataError(f"partition-id {pid} but {data_dir} holds {len(manifest['sites'])} sites")
        site = manifest["sites"][pid]
        return SiteSource(site["name"], path=str(Path(data_dir) / site["file"]))
    names = builtin_site_names(dataset)
    if pid >= len(names):
        raise SiteDataError(f"partition-id {pid} but dataset '{dataset}' has {len(names)} sites: {names}")
    return SiteSource(names[pid], dataset=dataset, partition=pid)


def builtin_site_names(dataset: str) -> list[str]:
    df, schema = load_builtin(dataset)
    if not schema.site_column:
        raise SiteDataError(f"built-in dataset '{dataset}' names no site column; pass a data-dir")
    return sorted(df[schema.site_column].astype(str).unique())


@lru_cache(maxsize=16)
def _read(path: str, mtime: float) -> pd.DataFrame:
    return read_table(path)


@lru_cache(maxsize=4)
def _builtin_site(dataset: str, name: str) -> pd.DataFrame:
    df, schema = load_builtin(dataset)
    return df[df[schema.site_column].astype(str) == name].reset_index(drop=True)


def load_rows(src: SiteSource) -> pd.DataFrame:
    if src.path:
        p = Path(src.path)
        if not p.exists():
            raise SiteDataError(f"site '{src.name}': data file {p} not found")
        try:
            return _read(str(p), p.stat().st_mtime)
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise SiteDataError(f"site '{src.name}': cannot read {p} as a CSV table ({type(e).__name__}: {e})") from e
    return _builtin_site(src.dataset, src.name)


def split_site(schema: Schema, df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A site's local (train, validation) rows, stratified, deterministic in ``seed``."""
    if val_fraction <= 0 or len(df) < 10:
        return df, df.iloc[:0]
    keep, val = split_indices(len(df), val_fraction, seed, stratify_key(schema, df))
    return df.iloc[keep].reset_index(drop=True), df.iloc[val].reset_index(drop=True)


def site_seed(seed: int, server_round: int, site: str) -> int:
    """Seed of a site's local training in a round: the same on every engine and every restart."""
    return (seed * 1_000_003 + server_round * 10_007 + zlib.crc32(site.encode())) % (2**31 - 1)


class Site:
    """One site's data with the federation's settings: the object ClientApp handlers talk to."""

    def __init__(self, name: str, rows: pd.DataFrame):
        self.name = name
        self.rows = rows
        self.absent: tuple[str, ...] = ()  # modalities ``hold`` found without any column
        self._encoded: dict[tuple, tuple[TensorData, TensorData]] = {}
        self._keep: dict[tuple, tuple[dict, TensorData | None]] = {}
        self._seqs: dict[tuple, tuple] = {}
        self._seq_data: dict[tuple, tuple] = {}
        # (key, model, its state_dict): built once, reused every round
        self._model: tuple[tuple, torch.nn.Module, dict[str, torch.Tensor]] | None = None

    # ---- the model, built once per (preprocessing, architecture) and reused by every message ------------
    def model(self, prep: Preprocessor, prep_key: str, model_config: ModelConfig, ts: Schema | None = None) -> torch.nn.Module:
        """This site's model for ``model_config``, built on first use and kept (``clients.cache`` keeps the site for
        the run). Callers load the received parameters into it (``load_partial``); the parameters not received
        keep whatever they hold and are never used: no row passes through them (a site receives every module its
        rows reach) and they are not trained."""
        key = (prep_key, json.dumps(model_config.to_dict(), sort_keys=True),
               json.dumps(ts.to_dict(), sort_keys=True) if ts is not None else None)
        if self._model is None or self._model[0] != key:
            model = build_from_preprocessor(prep, model_config, ts)
            self._model = (key, model, model.state_dict())
        return self._model[1]

    def state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` (tensors sharing the parameters' storage), kept with the kept model."""
        if self._model is not None and self._model[1] is model:
            return self._model[2]
        return model.state_dict()

    @property
    def n_models(self) -> int:
        return int(self._model is not None)

    def nbytes(self) -> int:
        """Memory this site holds: its rows, encoded tensors and model parameters (bytes)."""
        n = int(self.rows.memory_usage(index=True, deep=False).sum())
        seen: set[int] = set()

        def tensors(obj) -> int:
            if isinstance(obj, torch.Tensor):
                if id(obj) in seen:
                    return 0
                seen.add(id(obj))
                return obj.element_size() * obj.nelement()
            if isinstance(obj, TensorData):
                return sum(tensors(d) for d in (obj.x, obj.present, obj.y, obj.y_present))
            if isinstance(obj, dict):
                return sum(tensors(v) for v in obj.values())
            if isinstance(obj, (tuple, list)):
                return sum(tensors(v) for v in obj)
            return 0

        n += tensors(list(self._encoded.values())) + tensors(list(self._keep.values()))
        if self._model is not None:
            n += sum(tensors(p) for p in self._model[1].state_dict().values())
        return n

    # ---- time series (docs/timeseries.md): the site's subjects, split by subject -----------------------
    def sequences(self, ts: Schema, settings: SiteSettings) -> tuple[seq.Sequences, seq.Sequences | None]:
        """(training, validation) sequences of this site's subjects (a validation share of the subjects, none
        below 10 subjects); the step table is built once per schema and split."""
        key = (json.dumps(ts.to_dict(), sort_keys=True), settings.val_fraction, settings.seed)
        if key not in self._seqs:
            self.absent = tuple(self.hold(ts))
            all_seqs = seq.build_sequences(ts, self.rows)
            fraction = settings.val_fraction if len(all_seqs.ids) >= 10 else 0.0
            keep, val = all_seqs.holdout(ts.timeseries, fraction, settings.seed)
            self._seqs = {key: (all_seqs.subjects(keep), all_seqs.subjects(val) if len(val) else None)}
        return self._seqs[key]

    def sequence_data(self, prep: Preprocessor, prep_key: str, ts: Schema, settings: SiteSettings):
        key = (prep_key, settings.val_fraction, settings.seed)
        if key not in self._seq_data:
            train, val = self.sequences(ts, settings)
            dyn = ts.timeseries.step_modalities
            self._seq_data = {key: (seq.encode_sequences(prep, train, dyn),
                                    seq.encode_sequences(prep, val, dyn) if val is not None else None)}
        return self._seq_data[key]

    def sequence_keep(self, prep: Preprocessor, prep_key: str, ts: Schema, settings: SiteSettings,
                      correct: Mapping[str, str]):
        """A time series' correction (``mmn_fed.correction.sequence_keep``) on the training subjects, computed
        once per site and correction from the site's own steps, and the validation subjects' steps with one fixed
        balanced subset hidden (None for both without a correction)."""
        key = ("seq", prep_key, settings.val_fraction, settings.seed, json.dumps(dict(correct), sort_keys=True))
        if key not in self._keep:
            train, val = self.sequence_data(prep, prep_key, ts, settings)
            keep = sequence_keep(train, correct) if correct else None
            if keep is not None and val is not None:
                gen = torch.Generator().manual_seed(site_seed(settings.seed, 0, self.name))
                val = thin_sequences(val, *sequence_keep(val, correct), gen)
            self._keep = {key: (keep, val)}
        return self._keep[key]

    def hold(self, schema: Schema) -> list[str]:
        """Make the rows fit ``schema`` where a site legitimately differs: a modality none of whose columns are
        in the file is one this site does not hold (its columns are added, empty, so that its rows train every
        other module). Returns those modalities. A modality with only some of its columns missing is left to
        the schema check (a typo, or a broken export). No rows at all raises ``SiteDataError``."""
        if self.rows.empty:
            where = self.rows.attrs.get("source")
            raise SiteDataError(f"site '{self.name}': no data rows" + (f" in {where}" if where else ""))
        absent = [m for m, cols in schema.modalities.items() if cols and not any(c in self.rows.columns for c in cols)]
        if absent:
            rows = self.rows.copy()  # the rows are shared by the read cache
            for m in absent:
                for c in schema.modalities[m]:
                    rows[c] = np.nan
            self.rows = rows
        return sorted(set(absent) | set(self.absent))

    def splits(self, schema: Schema, settings: SiteSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
        self.absent = tuple(self.hold(schema))
        return split_site(schema, self.rows, settings.val_fraction, settings.seed)

    def summary(self, schema: Schema, settings: SiteSettings) -> dict:
        """Mergeable preprocessing summary of the local training rows (never rows)."""
        self.absent = tuple(self.hold(schema))
        if schema.timeseries is not None:  # the step rows of the training subjects
            train_seqs, _ = self.sequences(schema, settings)
            return site_summary(seq.row_schema(schema), train_seqs.steps)
        site_summary(schema, self.rows)  # every row parses, checked before the split: a bad value names the file's line
        train, _ = self.splits(schema, settings)
        return site_summary(schema, train)

    def audit_counts(self, schema: Schema, settings: SiteSettings) -> dict:
        """Missingness audit counts of the local training rows (time series: steps); cells below
        ``audit-min-cell`` suppressed."""
        if schema.timeseries is not None:
            train_seqs, _ = self.sequences(schema, settings)
            return presence_counts(seq.row_schema(schema), train_seqs.steps, min_cell=settings.audit_min_cell)
        train, _ = self.splits(schema, settings)
        return presence_counts(schema, train, min_cell=settings.audit_min_cell)

    def keep(self, prep: Preprocessor, prep_key: str, settings: SiteSettings,
             correct: Mapping[str, str]) -> tuple[dict, TensorData | None]:
        """Keep probabilities of the corrected modalities on the training rows (computed once per site and
        correction), and the validation rows with one fixed balanced subset hidden."""
        key = (prep_key, settings.val_fraction, settings.seed, json.dumps(dict(correct), sort_keys=True))
        if key not in self._keep:
            train, val = self.encoded(prep, prep_key, settings)
            keep = keep_probabilities(train, correct)
            if keep and val is not None:
                gen = torch.Generator().manual_seed(site_seed(settings.seed, 0, self.name))
                val = thin(val, keep_probabilities(val, correct), gen)
            self._keep = {key: (keep, val)}
        return self._keep[key]

    def encoded(self, prep: Preprocessor, prep_key: str, settings: SiteSettings) -> tuple[TensorData, TensorData]:
        key = (prep_key, settings.val_fraction, settings.seed)
        if key not in self._encoded:
            train, val = self.splits(prep.schema, settings)
            self._encoded = {key: (encode(prep, train), encode(prep, val) if len(val) else None)}
        return self._encoded[key]

    def module_counts(self, prep: Preprocessor, prep_key: str, settings: SiteSettings, model_config: ModelConfig,
                      ts: Schema | None = None) -> dict[str, int]:
        model = self.model(prep, prep_key, model_config, ts)
        if ts is not None:
            return seq.sequence_module_counts(model, self.sequence_data(prep, prep_key, ts, settings)[0])
        train, _ = self.encoded(prep, prep_key, settings)
        return module_counts(model, train)

    def train(self, prep: Preprocessor, prep_key: str, model_config: ModelConfig, settings: SiteSettings,
              params: Mapping[str, np.ndarray], server_round: int,
              correct: Mapping[str, str] | None = None, ts: Schema | None = None,
              ) -> tuple[dict[str, np.ndarray], dict[str, int], dict]:
        """Train the received modules only; return (their new values, per-module counts, metrics).
        ``correct``: the modalities whose presence is balanced against the label (``mmn_fed.correction``).
        ``ts``: the time-series schema: train on this site's sequences (counts are observed steps)."""
        if ts is not None:
            return self._train_sequences(prep, prep_key, model_config, settings, params, server_round, ts, correct or {})
        eager_optimizers()  # a ClientApp process trains once and exits: no 2.5 s torch._dynamo import
        train, _ = self.encoded(prep, prep_key, settings)
        keep, _ = self.keep(prep, prep_key, settings, correct or {})
        seed = site_seed(settings.seed, server_round, self.name)
        model = self.model(prep, prep_key, model_config)
        load_partial(model, params, self.state(model))
        torch.default_generator.manual_seed(seed)  # dropout (CPU); seeded after the model is built or reused, so both train alike
        modules = {module_of(k) for k in params}
        tc = TrainConfig.from_settings(settings, epochs=settings.local_epochs, seed=seed)
        stats = train_epochs(model, prep.schema, train, tc, tc.epochs, torch.Generator().manual_seed(seed),
                             prox_mu=settings.mu, trainable=lambda n: module_of(n) in modules, keep=keep)
        state = self.state(model)
        new = {k: state[k].detach().cpu().numpy().copy() for k in params}
        model.zero_grad(set_to_none=True)  # the kept model holds no gradients between messages
        counts = {m: c for m, c in module_counts(model, train).items() if m in modules}
        return new, counts, {"train_loss": stats["loss"], "steps": stats["steps"], "n": len(train)}

    def _train_sequences(self, prep, prep_key, model_config, settings, params, server_round, ts, correct):
        eager_optimizers()
        train, _ = self.sequence_data(prep, prep_key, ts, settings)
        keep, _ = self.sequence_keep(prep, prep_key, ts, settings, correct)
        seed = site_seed(settings.seed, server_round, self.name)
        model = self.model(prep, prep_key, model_config, ts)
        load_partial(model, params, self.state(model))
        torch.default_generator.manual_seed(seed)  # dropout (CPU); seeded after the model is built or reused
        modules = {module_of(k) for k in params}
        tc = TrainConfig.from_settings(settings, epochs=settings.local_epochs, seed=seed)
        stats = seq.train_epochs_sequences(model, prep.schema, train, tc, tc.epochs, torch.Generator().manual_seed(seed),
                                           prox_mu=settings.mu, trainable=lambda n: module_of(n) in modules, keep=keep)
        state = self.state(model)
        new = {k: state[k].detach().cpu().numpy().copy() for k in params}
        model.zero_grad(set_to_none=True)  # the kept model holds no gradients between messages
        counts = {m: c for m, c in seq.sequence_module_counts(model, train).items() if m in modules}
        return new, counts, {"train_loss": stats["loss"], "steps": stats["steps"], "n": len(train)}

    def evaluate(self, prep: Preprocessor, prep_key: str, model_config: ModelConfig, settings: SiteSettings,
                 params: Mapping[str, np.ndarray], context: Mapping[str, Any],
                 correct: Mapping[str, str] | None = None, ts: Schema | None = None) -> list[dict]:
        """Tidy records of the received modules on the local validation rows (training rows if none); under a
        correction, on the validation rows with the same balanced subset hidden every round. Time series: on
        the validation subjects' steps."""
        if ts is not None:
            train, val = self.sequence_data(prep, prep_key, ts, settings)
            if correct and val is not None:
                _, val = self.sequence_keep(prep, prep_key, ts, settings, correct)
            data, split = (val, "validation") if val is not None else (train, "train")
            model = self.model(prep, prep_key, model_config, ts)
            load_partial(model, params, self.state(model))
            return seq.data_records(model, prep, data, {**context, "site": self.name, "split": split})
        train, _ = self.encoded(prep, prep_key, settings)
        _, val = self.keep(prep, prep_key, settings, correct or {})
        data, split = (val, "validation") if val is not None else (train, "train")
        model = self.model(prep, prep_key, model_config)
        load_partial(model, params, self.state(model))
        return evaluate(model, prep.schema, prep.targets, data, {**context, "site": self.name, "split": split},
                        per_state=False, per_combination=False)


def load_partial(model: torch.nn.Module, params: Mapping[str, np.ndarray],
                 state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load the given parameters into ``model`` (``state``: its ``state_dict()``, when the caller has it); the others
    keep their values (and are not used)."""
    state = model.state_dict() if state is None else state
    unknown = [k for k in params if k not in state]
    if unknown:
        raise SiteDataError(f"received parameters the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for k, v in params.items():
            state[k].copy_(torch.from_numpy(np.asarray(v)))
