"""server.exchange: replies are pulled every 0.2 s through the Grid's own push/pull (Flower 1.42's
send_and_receive sleeps 3 s between pulls); a Grid that delivers synchronously is called as it is."""
from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server import exchange
from server.engines.inprocess import as_stored, claim_task_identity


class SlowSites(Grid):
    """Replies become available ``delays[node]`` seconds after the push (a node absent from ``delays`` never
    replies). Counts the pulls. Push / pull as a SuperLink's Grid offers them; send_and_receive is Flower's
    contract that exchange must not call here."""

    def __init__(self, delays):
        self.delays, self.ready, self.pulls = delays, {}, 0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m = as_stored(m)
            if m.metadata.dst_node_id in self.delays:
                reply = Message(RecordDict({"c": ConfigRecord({"node": m.metadata.dst_node_id})}), reply_to=m)
                self.ready[m.metadata.message_id] = (time.monotonic() + self.delays[m.metadata.dst_node_id], reply)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic()
        return [r for i, (t, r) in list(self.ready.items()) if i in set(message_ids) and t <= now]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("exchange pulls through push/pull, not Flower's 3 s loop")

    # the rest of Grid's interface, unused here
    run = property(lambda self: None)
    set_run = create_message = get_node_ids = lambda self, *a, **k: None


def _msgs(nodes, kind="train", rnd="2"):
    claim_task_identity(run_id=1, node_id=0)
    return [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=kind, group_id=rnd)
            for n in nodes]


def test_every_reply_is_collected_and_the_phase_is_timed():
    exchange.timings.take()
    grid = SlowSites({1: 0.0, 2: 0.3, 3: 0.5})
    got = exchange.send_and_receive(grid, _msgs([1, 2, 3]), timeout=30)
    assert sorted(int(r.content["c"]["node"]) for r in got) == [1, 2, 3]
    assert 3 <= grid.pulls <= 20  # a pull every 0.2 s, not one per 3 s
    (phase,) = exchange.timings.take()
    assert phase["type"] == "train" and phase["round"] == "2" and len(phase["replies"]) == 3
    assert phase["replies"] == sorted(phase["replies"]) and phase["replies"][-1] <= phase["seconds"]


def test_the_timeout_returns_the_replies_received_so_far():
    grid = SlowSites({1: 0.0, 2: 0.1})  # node 3 never replies
    got = exchange.send_and_receive(grid, _msgs([1, 2, 3]), timeout=0.7)
    assert sorted(int(r.content["c"]["node"]) for r in got) == [1, 2]


def test_a_synchronous_grid_is_called_as_it_is():
    class Synchronous(SlowSites):
        synchronous = True

        def send_and_receive(self, messages, *, timeout=None):
            return [Message(RecordDict({"c": ConfigRecord({"node": m.metadata.dst_node_id})}), reply_to=as_stored(m))
                    for m in messages]

    got = exchange.send_and_receive(Synchronous({}), _msgs([5, 6]), timeout=1)
    assert sorted(int(r.content["c"]["node"]) for r in got) == [5, 6]
