"""P-Fusion over a window of steps: the common clinical baseline for time series (docs/timeseries.md, "Baselines").

At each step, every time-series variable is given its last value observed within the last W steps (the step's own
value when observed; ``ModelConfig.pfusion_window``, run setting ``pfusion-window``) and a missing indicator (1 when
no value lies within the window); the static modalities come from the subject's first step. Each modality's window
inputs then go through the paper's P-Fusion (``mmn_fed.model.PFusion``): one encoder per modality in parallel, a
modality with no value within the window zero-filled, the embeddings concatenated, one decoder per task.

Everything is derived from the encoded step rows (``TensorData`` ``x``/``present``, one row per step), where a
missing numeric value is imputed with the training mean (0 after standardization) and a missing category is an
all-zero one-hot block (``edge_runtime.preprocessing``). So a variable is read as observed at a step when its
modality is present and its features are not all zero; a modality of one variable is exact (its presence is the
variable's). In a modality of several variables, a numeric value exactly equal to the training mean reads as
missing (its older value, if any within the window, is carried instead).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from edge_runtime.preprocessing import Preprocessor

from .model import ModelConfig, PFusion


def variable_widths(prep: Preprocessor, modalities: Sequence[str]) -> dict[str, list[int]]:
    """The encoded features of each variable of these modalities, in order: 1 for a numeric column, one per
    category for a categorical column (``Preprocessor.feature_names`` order)."""
    out = {}
    for m in modalities:
        if m not in prep.schema.modalities:
            raise ValueError(f"time-series modality '{m}' is not a modality of the schema "
                             f"({sorted(prep.schema.modalities)})")
        out[m] = [1 if prep.columns[c]["kind"] == "numeric" else len(prep.columns[c]["categories"])
                  for c in prep.schema.modalities[m]]
    return out


def observed_variables(x: Tensor, present: Tensor, widths: Sequence[int]) -> Tensor:
    """(rows, variables) bool: which variables of one modality each encoded row observed (see the module's
    docstring for how an imputed value is told apart)."""
    if len(widths) == 1:
        return present.unsqueeze(-1)
    owner = torch.repeat_interleave(torch.arange(len(widths)), torch.as_tensor(widths))  # feature -> variable
    nonzero = torch.zeros(x.shape[0], len(widths), dtype=x.dtype).index_add_(1, owner, (x != 0).to(x.dtype))
    return present.unsqueeze(-1) & (nonzero > 0)


def carry_forward(x: Tensor, present: Tensor, index: Tensor, widths: Sequence[int],
                  window: int) -> tuple[Tensor, Tensor]:
    """One time-series modality over the steps of ``index`` (N, T; -1 after a subject's last step): (values
    (N, T, d), missing (N, T, V)). ``values`` holds, per variable, its last value observed within steps
    t - window + 1 .. t (zeros when none); ``missing`` is True where none is (and after a subject's last step).
    One pass per window offset, batched
    over subjects, steps and variables."""
    if window < 1:
        raise ValueError(f"pfusion-window (ModelConfig.pfusion_window) must be at least 1 step, got {window}")
    valid = index >= 0
    rows = index.clamp(min=0)
    values = x[rows]  # (N, T, d)
    seen = observed_variables(x, present, widths)[rows] & valid.unsqueeze(-1)  # (N, T, V)
    spread = torch.as_tensor(widths)
    out = torch.zeros_like(values)
    have = torch.zeros_like(seen)
    steps = index.shape[1]
    for k in range(min(window, steps)):  # offset k: the value observed k steps earlier, if nothing more recent
        seen_k = torch.zeros_like(seen)
        seen_k[:, k:] = seen[:, : steps - k]
        take = seen_k & ~have
        values_k = torch.zeros_like(values)
        values_k[:, k:] = values[:, : steps - k]
        out = torch.where(torch.repeat_interleave(take, spread, dim=-1), values_k, out)
        have = have | seen_k
    have = have & valid.unsqueeze(-1)  # after a subject's last step there is no step to carry a value to
    return out * valid.unsqueeze(-1), ~have


class WindowPFusion(PFusion):
    """P-Fusion on time series over a window of steps (the module's docstring). A time-series modality's encoder
    reads its window values and one missing indicator per variable; a static modality's encoder reads the
    subject's first step. Module names are P-Fusion's (``encoders.<modality>``, ``decoders.<task>``; no initial
    state), so per-module federation applies. Exposes MultiModN's ``forward_sequence`` interface, so
    ``mmn_fed.sequences.fit_sequences``, ``predict_steps`` and ``step_metrics`` use it unchanged."""

    def __init__(self, modality_dims: Mapping[str, int], task_dims: Mapping[str, int], config: ModelConfig,
                 variables: Mapping[str, Sequence[int]]):
        """``variables``: each time-series modality's variable widths (``variable_widths``); the other modalities
        are static."""
        if config.pfusion_window < 1:
            raise ValueError(f"pfusion-window (ModelConfig.pfusion_window) must be at least 1 step, "
                             f"got {config.pfusion_window}")
        for m, w in variables.items():
            if m not in modality_dims or sum(w) != modality_dims[m]:
                raise ValueError(f"time-series modality '{m}': variable widths {list(w)} do not match its "
                                 f"{modality_dims.get(m)} encoded features")
        widths = {m: [int(v) for v in w] for m, w in variables.items()}
        super().__init__({m: d + len(widths.get(m, ())) for m, d in modality_dims.items()}, task_dims, config)
        self.variables = widths
        self.window = config.pfusion_window

    def window_inputs(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor],
                      index: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """P-Fusion's inputs at every existing step (R rows, subject-major as ``index[index >= 0]``): a
        time-series modality as [window values, missing indicators], present when any variable has a value
        within the window; a static modality as the subject's first step."""
        valid = index >= 0
        first = index[:, :1].clamp(min=0).expand_as(index)
        xs, ps = {}, {}
        for m in self.modalities:
            if m in self.variables:
                values, missing = carry_forward(x[m], present[m], index, self.variables[m], self.window)
                xs[m] = torch.cat([values, missing.to(values.dtype)], dim=-1)[valid]
                ps[m] = (~missing).any(-1)[valid]
            else:
                xs[m], ps[m] = x[m][first][valid], present[m][first][valid]
        return xs, ps

    def forward(self, x, present, order=None, return_states: bool = False):
        """Refused: its inputs are a window of steps, which one row does not have."""
        raise TypeError("a P-Fusion window model (time series) scores a subject's steps: use forward_sequence "
                        "(mmn_fed.sequences.predict_steps), not a row-by-row forward")

    def forward_sequence(self, x: Mapping[str, Tensor], present: Mapping[str, Tensor], index: Tensor,
                         dynamic: Sequence[str], every_encoder: bool = False) -> tuple[dict[str, Tensor], Tensor]:
        """As ``MultiModN.forward_sequence``: (logits {task: (R, k)}, step rows (R,)), one decoded fusion per
        existing step. ``dynamic`` must name the time-series modalities this model was built with;
        ``every_encoder`` is ignored (P-Fusion decodes once per step)."""
        if set(dynamic) != set(self.variables):
            raise ValueError(f"this P-Fusion window model was built with time-series modalities "
                             f"{sorted(self.variables)}, not {sorted(dynamic)}")
        xs, ps = self.window_inputs(x, present, index)
        logits, _, _ = self.forward_stacked(xs, ps)
        return {t: lg[0] for t, lg in logits.items()}, index[index >= 0]
