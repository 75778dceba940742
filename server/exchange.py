"""Send messages to the sites and wait for their replies, polling the SuperLink every ``POLL`` seconds.

Flower 1.42's ``Grid.send_and_receive`` sleeps 3 s between two pulls, so a phase whose replies arrive just
after a pull waits up to 3 s more at the server: with two or more phases per round that was several seconds of
every round on the deployment engine (docs/federation.md, "Round time"). ``send_and_receive`` here uses the
Grid's own public ``push_messages`` / ``pull_messages`` with a short poll (a pull is one small request to the
SuperLink). A Grid that delivers synchronously (``server.engines.inprocess.InProcessGrid``, flagged
``synchronous``) is called as it is.

``timings`` records, per phase, when the messages went out and when each reply came back (seconds since the
push): what ``benchmarks/bench_round_time.py`` splits a round with.
"""
from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL = 0.2  # seconds between two pulls while replies are outstanding


class PhaseTimer:
    """Wall-clock record of the phases of a run: ``phases`` = [{"type", "round", "sent" (epoch seconds),
    "replies": [seconds after the push], "seconds"}]."""

    def __init__(self) -> None:
        self.phases: list[dict] = []

    def take(self) -> list[dict]:
        """The phases recorded since the last call (and forget them)."""
        out, self.phases = self.phases, []
        return out


timings = PhaseTimer()


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float | None, poll: float = POLL) -> list[Message]:
    """Push ``messages``, then pull their replies every ``poll`` seconds until every one has replied or
    ``timeout`` seconds have passed (the replies received by then; as ``Grid.send_and_receive``)."""
    messages = list(messages)
    kind = messages[0].metadata.message_type if messages else ""
    rnd = messages[0].metadata.group_id if messages else ""
    t0 = time.monotonic()
    if getattr(grid, "synchronous", False) or not messages:
        got = list(grid.send_and_receive(messages, timeout=timeout))
        timings.phases.append({"type": kind, "round": rnd, "sent": time.time(), "replies": [time.monotonic() - t0] * len(got),
                               "seconds": time.monotonic() - t0})
        return got
    sent = time.time()
    pending = set(grid.push_messages(messages))
    end = None if timeout is None else t0 + timeout
    got: list[Message] = []
    arrived: list[float] = []
    while pending:
        replies = list(grid.pull_messages(pending))
        now = time.monotonic() - t0
        for r in replies:
            got.append(r)
            arrived.append(now)
            pending.discard(r.metadata.reply_to_message_id)
        if not pending or (end is not None and time.monotonic() >= end):
            break
        time.sleep(poll)
    timings.phases.append({"type": kind, "round": rnd, "sent": sent, "replies": arrived, "seconds": time.monotonic() - t0})
    return got
