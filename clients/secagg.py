"""Secure aggregation, site side: the ClientApp handlers and the train mod that carry a round of
``mmn_fed.secagg`` (pairwise masking per module; the protocol, its arithmetic and its fixed-point error bound
are described there and in docs/security.md) over Flower messages.
"""
from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.secagg import KEYS_ACTION, MASKED, SECAGG, SHARES_ACTION, UNMASK_ACTION, RoundPlan, SecAggClient, SecAggError

# Message types (server.secagg.SecAggRound sends them): query.secagg_keys, query.secagg_shares (before the
# train message), query.secagg_unmask (after it). The server names each node's site in the plan in every
# secagg record ("site"), so the handlers need nothing from the site loader. Secrets between messages live
# in ``context.state`` (on the site's SuperNode), never in a message.


def _client(context: Context) -> SecAggClient:
    if SECAGG not in context.state:
        raise SecAggError("no secure-aggregation round in progress at this site")
    return SecAggClient.from_state(bytes(context.state[SECAGG]["state"]))


def _store(context: Context, client: SecAggClient) -> None:
    context.state[SECAGG] = ConfigRecord({"state": client.export_state()})


def handle_keys(msg: Message, context: Context) -> Message:
    """Step 1: a fresh client for this round (the plan comes with the message); reply with public keys."""
    rec = msg.content[SECAGG]
    client = SecAggClient(str(rec["site"]), RoundPlan.from_json(str(rec["plan"])))
    _store(context, client)
    return Message(RecordDict({SECAGG: ConfigRecord(client.advertise_keys())}), reply_to=msg)


def handle_shares(msg: Message, context: Context) -> Message:
    """Step 2: encrypted shares for every other site, keyed by destination site."""
    client = _client(context)
    adverts = {s: {"c_pk": bytes.fromhex(c), "s_pk": bytes.fromhex(p)}
               for s, (c, p) in json.loads(str(msg.content[SECAGG]["adverts"])).items()}
    outbox = client.share_keys(adverts)
    _store(context, client)
    return Message(RecordDict({SECAGG: ConfigRecord({"outbox": json.dumps({d: c.hex() for d, c in outbox.items()})})}),
                   reply_to=msg)


def handle_unmask(msg: Message, context: Context) -> Message:
    """Step 4: shares of survivors' self-mask seeds and dropped members' keys; the round's secrets are then
    deleted from the site's state."""
    client = _client(context)
    reply = client.unmask_shares([str(s) for s in msg.content[SECAGG]["survivors"]])
    del context.state[SECAGG]
    return Message(RecordDict({SECAGG: ConfigRecord({"shares": json.dumps(reply)})}), reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Train mod: when the train message carries a ``secagg`` record (the inbox of step 2), the handler's
    reply ("arrays" + per-module "counts") leaves the site only as masked vectors (step 3)."""
    if SECAGG not in msg.content:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    client = _client(context)
    inbox = {s: bytes.fromhex(c) for s, c in json.loads(str(msg.content[SECAGG]["inbox"])).items()}
    params = R.from_arrayrecord(reply.content[P.ARRAYS])
    sent = {n for m in client.my_modules for n, _ in client.plan.layout[m]}
    counts = {m: float(c) for m, c in reply.content[P.COUNTS].items()}
    masked = client.mask_update({k: v for k, v in params.items() if k in sent}, counts, inbox)
    _store(context, client)
    content = RecordDict({k: v for k, v in reply.content.items() if k not in (P.ARRAYS, P.COUNTS)})
    content[MASKED] = ArrayRecord({m: Array(v) for m, v in masked.items()})
    return Message(content, reply_to=msg)


def register_handlers(app) -> None:
    """Add the three secure-aggregation query handlers to a ClientApp (the train handler takes
    ``mods=[secagg_mod]``)."""
    app.query(KEYS_ACTION)(handle_keys)
    app.query(SHARES_ACTION)(handle_shares)
    app.query(UNMASK_ACTION)(handle_unmask)
