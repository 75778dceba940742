"""The one place that names parameters and modules.

Contract (docs/design.md, "Parameter and module names"): parameters are named ``init_state``, ``encoders.<modality>.<...>`` and
``decoders.<task>.<...>``; the module of a parameter is its first two dotted parts
(``init_state`` alone for the initial state). Federation, export and checkpoints key on these.
"""
from __future__ import annotations

from typing import Iterable, Mapping, TypeVar

V = TypeVar("V")

INIT_STATE = "init_state"


def module_of(param_name: str) -> str:
    """'encoders.labs.net.0.weight' -> 'encoders.labs'; 'init_state' -> 'init_state'."""
    parts = param_name.split(".")
    if parts[0] == INIT_STATE:
        return INIT_STATE
    if parts[0] not in ("encoders", "decoders") or len(parts) < 3:
        raise ValueError(f"parameter name '{param_name}' does not follow init_state / encoders.<m>.* / decoders.<t>.*")
    return ".".join(parts[:2])


def encoder_module(modality: str) -> str:
    return f"encoders.{modality}"


def decoder_module(task: str) -> str:
    return f"decoders.{task}"


def group_by_module(params: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """Split a flat state dict into {module: {param_name: value}} (names kept whole)."""
    out: dict[str, dict[str, V]] = {}
    for k, v in params.items():
        out.setdefault(module_of(k), {})[k] = v
    return out


def select_modules(params: Mapping[str, V], modules: Iterable[str]) -> dict[str, V]:
    """The entries of ``params`` that belong to ``modules``."""
    keep = set(modules)
    return {k: v for k, v in params.items() if module_of(k) in keep}
