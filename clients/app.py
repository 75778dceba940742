"""Flower ClientApp: a site. It loads its own rows (simulation: by partition id; deployment: a CSV and a
site name from node config), and for each message uses only the modules the server sent it.

Handlers are thin: they unpack a message, call ``clients.site``, and pack the reply
(``clients/handlers.py``; names in ``mmn_fed.protocol``, conversion in ``mmn_fed.records``). This module imports
neither torch nor pandas: on Flower's deployment engine, which starts one process per message, each message
goes to the site's worker (``clients/worker.py``), which imports the handlers once and keeps the site for the
run; elsewhere (in-process and Ray engines, or node config ``site-worker="off"``) the handlers run here.
The train handler's reply passes through two mods: ``privacy_mod`` (clip + Gaussian noise per module when
``dp-noise-multiplier`` > 0) and, outside it, ``secagg_mod`` (masks the reply when the message carries a
secure-aggregation record). Both pass through otherwise. Around every handler, ``policy_mod`` (``clients.policy``) enforces
the site's own policy file (node config ``policy``; none: passes through). ``build_app`` wires the handlers; ``app`` is the
site every engine runs (``simulations.attacks`` builds a misbehaving one with an extra train mod). The mods and
``context.state`` stay in the message's own process, also when a worker computes the reply.
"""
from __future__ import annotations

from typing import Callable, Sequence

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from mmn_fed import protocol as P

from . import worker
from .audit import audit_mod
from .policy import policy_mod
from .privacy import privacy_mod
from .secagg import register_handlers, secagg_mod


def _handler(name: str) -> Callable[[Message, Context], Message]:
    """``clients.handlers.<name>``, computed by the site's worker when one serves this process, else here."""
    def handle(msg: Message, context: Context) -> Message:
        if worker.wanted(context.node_config):
            content = worker.forward(name, msg, context)
            if content is not None:
                return Message(content, reply_to=msg)
        from . import handlers  # torch, pandas, the library: only where the handler runs
        return getattr(handlers, name)(msg, context)

    handle.__name__ = handle.__qualname__ = name
    return handle


summary, profile, train, evaluate = (_handler(name) for name in worker.HANDLERS)


def build_app(train_mods: Sequence[Mod] = ()) -> ClientApp:
    """The site's ClientApp: the handlers above plus the secure-aggregation queries. The train handler runs
    inside ``privacy_mod`` inside ``secagg_mod`` (both pass through unless the server switched them on);
    ``train_mods`` go between the two: they see the plaintext reply after DP and before masking. ``audit_mod``
    (``clients.audit``) wraps every handler: the site's audit log of each message in and out.
    ``policy_mod`` (``clients.policy``), inside it, enforces the site's own policy file (node config ``policy``)."""
    # outermost on every handler: the audit log of what arrives and what leaves (masked, or a policy refusal);
    # inside it the site's own policy (node config "policy")
    app = ClientApp(mods=[audit_mod, policy_mod])
    register_handlers(app)  # query.secagg_keys / secagg_shares / secagg_unmask: used only under secure aggregation
    app.query(P.SUMMARY_ACTION)(summary)
    app.query(P.PROFILE_ACTION)(profile)
    app.train(mods=[secagg_mod, *train_mods, privacy_mod])(train)
    app.evaluate()(evaluate)
    return app


app = build_app()
