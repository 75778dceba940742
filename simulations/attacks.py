"""A malicious site for robustness experiments: the real ClientApp with one site's train replies replaced.

``attacking_client_app(attacker, kind, k)`` is ``clients.app.build_app`` with one more train mod,
``attack_mod``: for the site named ``attacker`` (the name its own reply carries), the reply's arrays become

- ``kind="scale"``: ``global + k * (honest - global)``, ``honest`` being what the site really trained and
  ``global`` the modules it received (k = -1 sign flip, -10 boosted sign flip, +10 boosted step, any float);
- ``kind="nan"``: every value NaN.

Every other site, and every other message, is the honest ClientApp's. Run it with any in-process federation:
``run_federation(..., client_app=attacking_client_app("Cleveland", "scale", -10))``.

Secure aggregation: supported. The mod sits inside ``secagg_mod`` (and outside ``privacy_mod``: an attacker
does not clip its own update), so the attack acts on the plaintext reply before masking, as a malicious site
would; the server then sees only the masked sum and can check structure alone (``server.secagg``).

``holdout_split`` is the per-site train / held-out split the robustness figures (``benchmarks/bench_robustness.py``)
and tests use.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from clients.app import build_app
from mmn_fed import protocol as P
from mmn_fed.records import from_arrayrecord, to_arrayrecord

ATTACKS = ("scale", "nan")


def _check_kind(kind: str) -> None:
    if kind not in ATTACKS:
        raise ValueError(f"attack kind '{kind}' unknown; expected one of {', '.join(ATTACKS)}")


def attacked_update(received: Mapping[str, np.ndarray], honest: Mapping[str, np.ndarray], kind: str = "scale",
                    k: float = -1.0) -> dict[str, np.ndarray]:
    """What the attacker sends instead of ``honest`` (its trained modules), given the ``received`` global ones."""
    _check_kind(kind)
    if kind == "nan":
        return {name: np.full_like(v, np.nan) for name, v in honest.items()}
    return {name: (received[name] + k * (v - received[name])).astype(v.dtype) for name, v in honest.items()}


def attack_mod(attacker: str, kind: str = "scale", k: float = -1.0) -> Mod:
    """A train mod that replaces the reply arrays of the site named ``attacker`` with ``attacked_update``."""
    _check_kind(kind)

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if reply.has_error() or str(reply.content[P.SITE]["name"]) != attacker:
            return reply
        received = from_arrayrecord(msg.content[P.ARRAYS])
        honest = from_arrayrecord(reply.content[P.ARRAYS])
        reply.content[P.ARRAYS] = to_arrayrecord(attacked_update(received, honest, kind, k))
        return reply

    return mod


def attacking_client_app(attacker: str, kind: str = "scale", k: float = -1.0) -> ClientApp:
    """The real ClientApp, except that site ``attacker`` sends ``attacked_update`` in every train reply."""
    return build_app(train_mods=[attack_mod(attacker, kind, k)])


def holdout_split(df: pd.DataFrame, site_column: str, test_fraction: float = 0.3, seed: int = 0
                  ) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """Per site (sorted by name), a random ``test_fraction`` of its rows held out: ({site: train}, {site: test})."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if site_column not in df.columns:
        raise ValueError(f"site column '{site_column}' is not in the data")
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for name, g in df.groupby(site_column, sort=True):
        g = g.reset_index(drop=True)
        idx = rng.permutation(len(g))
        cut = int(len(g) * test_fraction)
        test[str(name)] = g.iloc[idx[:cut]].reset_index(drop=True)
        train[str(name)] = g.iloc[idx[cut:]].reset_index(drop=True)
    return train, test
