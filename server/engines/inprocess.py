"""The in-process engine: a Grid that calls ClientApps directly (fast, for tests and sweeps). The real
ServerApp and ClientApp code paths, minus transport; the one module that imports ``clients.app``."""
from __future__ import annotations

import copy
import uuid
from typing import Any, Iterable, Mapping

from flwr.app import ArrayRecord, Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


# ---- the two Flower internals the in-process engine needs ------------------------------------------------
# Flower 1.42 has no public API for what its processes and its SuperLink do around a message, and this engine
# plays both parts. These two functions are the only places that touch Flower's internals;
# tests/server/test_flower_internals.py fails with a message naming them when a Flower upgrade changes them.

def claim_task_identity(run_id: int, node_id: int, task_id: int = 0) -> None:
    """Make this process the sender ``node_id`` of run ``run_id``: ``Message(content, dst_node_id, ...)``
    (called by the ServerApp and by Flower's strategies) reads the sender from ``TaskIdentity``, which
    Flower's own processes set when they start (flwr/superlink/runtime/run_serverapp.py,
    flwr/simulation/run_simulation.py); it is not a public API."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id


def as_stored(message: Message, content: RecordDict | Error | None = None) -> Message:
    """``message`` as the SuperLink hands it on: a fresh message id (the SuperLink sets ids when it stores
    a message; Flower's own InMemoryGrid writes ``metadata.__dict__["_message_id"]``), with ``content``
    (default: the message's own). Built from the public ``Metadata`` class through ``Message``'s
    ``metadata=`` argument, which Flower marks for internal use."""
    md = message.metadata
    stamped = Metadata(run_id=md.run_id, message_id=uuid.uuid4().hex, src_node_id=md.src_node_id,
                       dst_node_id=md.dst_node_id, reply_to_message_id=md.reply_to_message_id, group_id=md.group_id,
                       created_at=md.created_at, ttl=md.ttl, message_type=md.message_type,
                       src_task_id=md.src_task_id, dst_task_id=md.dst_task_id)
    if content is None:
        content = message.error if message.has_error() else message.content
    return Message(content, metadata=stamped)


class InProcessGrid(Grid):
    """A Grid that delivers each message straight to a ClientApp in this process and returns its reply.

    Nodes are simulated SuperNodes with ``partition-id``/``num-partitions`` (or any node config), so the
    ServerApp and ClientApp code paths are exactly those of Flower's engines, minus transport.
    """

    synchronous = True  # server.exchange calls send_and_receive as it is (no push / pull)

    def __init__(self, client_app: ClientApp, node_configs: list[Mapping[str, Any]], run_config: Mapping[str, Any],
                 run_id: int = 1):
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.run_id = run_id
        self.run_config = dict(run_config)
        # node ids are arbitrary (as in Flower, where they are random); 1000 + i keeps logs readable
        self.contexts = {1000 + i: Context(run_id=run_id, node_id=1000 + i, node_config=dict(nc), state=RecordDict(),
                                           run_config=dict(run_config)) for i, nc in enumerate(node_configs)}
        claim_task_identity(run_id, SERVER_NODE_ID)  # the ServerApp's messages are sent from here

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            delivered = as_stored(msg, own_copy(msg.content))  # the site gets its own copy, as over a wire
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # a failing site is a failed reply, as in Flower's engines
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=delivered)
            replies.append(as_stored(reply))
        return replies


def own_copy(content: RecordDict) -> RecordDict:
    """A copy of a message's content that shares nothing the receiver could change with the sender: every record
    is deep-copied, except that each ``Array`` is copied shallowly (its ``data`` is immutable ``bytes``; a deep copy
    of every array's fields cost ~3 ms per message)."""
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = ArrayRecord()
            for k in record.keys():
                arrays[k] = copy.copy(record[k])
            out[name] = arrays
        else:
            out[name] = copy.deepcopy(record)
    return out


def server_context(run_config: Mapping[str, Any], run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config))


def run_inprocess(run_config: Mapping[str, Any], num_sites: int, server_app: ServerApp | None = None,
                  client_app: ClientApp | None = None, grid_cls: type[InProcessGrid] = InProcessGrid) -> None:
    """Run the ServerApp's main against ``num_sites`` in-process ClientApps (simulation node configs)."""
    from clients.app import app as default_client
    from server.app import app as default_server

    grid = grid_cls(client_app or default_client,
                    [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)], run_config)
    (server_app or default_server)(grid, server_context(run_config))
