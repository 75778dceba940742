"""A site's worker (clients/worker.py): on Flower's deployment engine, the ClientApp process of each message hands
it to one long-lived process per site, which replies exactly as the handlers do in-process. These tests start
real worker processes (owned by a process the test controls, stopped by the test)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import serde

from clients import handlers, worker
from clients.app import app as client_app
from mmn_fed import ModelConfig, fit_preprocessor
from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.settings import SiteSettings

MC = ModelConfig(state_size=8, hidden=8)


@pytest.fixture
def short_tmp(monkeypatch):
    """A short temporary directory for the worker's private dir (a Unix socket path has ~100 bytes at most)."""
    d = tempfile.mkdtemp(prefix="mw", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", d)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def owner():
    """A process standing in for the SuperNode's executor: the workers the test starts exit when it does."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started = len(worker._STARTED)
    yield proc
    proc.kill()
    proc.wait()
    for w in worker._STARTED[started:]:
        if w.poll() is None:
            w.terminate()
        w.wait(timeout=20)
    del worker._STARTED[started:]


def messages(heart, make_message, site_context):
    """(context, {handler: message}) of one heart site, as the server would send them."""
    df, schema = heart
    rows = df[df.dataset == "Hungary"].reset_index(drop=True)
    ctx = site_context(rows, "Hungary")
    settings = {P.SETTINGS: SiteSettings(val_fraction=0.2, seed=3, local_epochs=2).to_record()}
    prep = fit_preprocessor(schema, rows)
    params = {k: v.numpy() for k, v in build_from_preprocessor(prep, MC).state_dict().items()}
    cfg = {"prep": json.dumps(prep.to_dict()), "model-config": json.dumps(MC.to_dict()), "server-round": 1, **settings}
    return ctx, {
        "summary": make_message(P.SUMMARY, RecordDict({"config": ConfigRecord({"schema": json.dumps(schema.to_dict()),
                                                                              **settings})})),
        "profile": make_message(P.PROFILE, RecordDict({"config": ConfigRecord(cfg)})),
        "train": make_message(P.TRAIN, RecordDict({"arrays": R.to_arrayrecord(params),
                                                   "config": ConfigRecord({**cfg, P.EVALUATE_ROUND: 0})})),
        "evaluate": make_message(P.EVALUATE, RecordDict({"arrays": R.to_arrayrecord(params), "config": ConfigRecord(cfg)})),
    }


def same_content(a: RecordDict, b: RecordDict) -> None:
    assert set(a) == set(b)
    for key in a:
        if key == P.ARRAYS:
            x, y = R.from_arrayrecord(a[key]), R.from_arrayrecord(b[key])
            assert set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x), key
        elif key in (P.RECORDS, P.SUMMARY_RECORD, P.AUDIT_RECORD):
            assert R.from_json_record(a[key]) == R.from_json_record(b[key]), key
        else:
            assert dict(a[key]) == dict(b[key]), key


def test_the_worker_replies_to_every_handler_exactly_as_the_handlers_do_here(heart, make_message, site_context,
                                                                           short_tmp, owner):
    ctx, msgs = messages(heart, make_message, site_context)
    for name in worker.HANDLERS:  # the handlers' own replies, in this process (a fresh site cache)
        from clients import cache
        cache.clear()
        local = getattr(handlers, name)(msgs[name], ctx).content
        remote = worker.forward(name, msgs[name], ctx, owner=owner.pid)
        assert remote is not None, name
        same_content(remote, local)
    # one worker served the four messages, and it is still there for the next one
    assert len(worker._STARTED) == 1 and worker._STARTED[0].poll() is None
    again = worker.forward("train", msgs["train"], ctx, owner=owner.pid)
    same_content(again, handlers.train(msgs["train"], ctx).content)
    assert len(worker._STARTED) == 1
    # a handler's own error reaches the message's process with its type and text
    lost = Context(run_id=1, node_id=1000, node_config={"data-path": str(short_tmp / "nope.csv")},
                   state=RecordDict(), run_config={})
    with pytest.raises(worker.WorkerError, match=r"nope\.csv") as raised:
        worker.forward("profile", msgs["profile"], lost, owner=owner.pid)
    assert type(raised.value).__name__ == "SiteDataError"  # as the audit log and Flower name it in-process
    assert "SiteDataError" in _log(ctx, owner) and "nope" not in _log(ctx, owner)  # the type, no values


def _log(ctx, owner) -> str:
    return worker.socket_path(owner.pid, ctx.node_id).with_suffix(".log").read_text()


def test_the_worker_exits_with_its_owner_and_removes_its_socket(heart, make_message, site_context, short_tmp, owner):
    ctx, msgs = messages(heart, make_message, site_context)
    assert worker.forward("summary", msgs["summary"], ctx, owner=owner.pid) is not None
    proc, path = worker._STARTED[-1], worker.socket_path(owner.pid, ctx.node_id)
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    owner.kill()
    owner.wait()
    proc.wait(timeout=10)  # checked every second
    assert not path.exists()  # its lock file stays: another message may hold it to start the next worker


def _serve(path: Path, *idle: str) -> subprocess.Popen:
    """``python -m clients.worker PATH OWNER [IDLE]`` owned by this process, once it listens."""
    env = {**os.environ, "PYTHONPATH": str(worker.code_root())}
    proc = subprocess.Popen([sys.executable, "-m", "clients.worker", str(path), str(os.getpid()), *idle], env=env)
    deadline = time.monotonic() + 90
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"worker exited with {proc.poll()} before listening"
    return proc


def test_an_idle_worker_exits(short_tmp):
    path = worker.private_dir() / "idle.sock"
    proc = _serve(path, "3.0")
    try:
        assert proc.wait(timeout=20) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_stops_a_worker(short_tmp):
    path = worker.private_dir() / "term.sock"
    proc = _serve(path)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_worker_whose_caller_went_away_serves_the_next_message(heart, make_message, site_context, short_tmp,
                                                                 owner):
    ctx, msgs = messages(heart, make_message, site_context)
    assert worker.forward("summary", msgs["summary"], ctx, owner=owner.pid) is not None
    proc, path = worker._STARTED[-1], worker.socket_path(owner.pid, ctx.node_id)
    for _ in range(3):  # a request whose sender closes before the reply (the message's process was stopped)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        request = worker._frames(json.dumps({"protocol": worker.PROTOCOL, "handler": "summary"}).encode(),
                                 serde.message_to_proto(msgs["summary"]).SerializeToString(),
                                 serde.context_to_proto(worker._stateless(ctx)).SerializeToString())
        s.sendall(request)
        s.close()
    assert worker.forward("summary", msgs["summary"], ctx, owner=owner.pid) is not None
    assert proc.poll() is None and len(worker._STARTED) == 1


def test_a_killed_worker_is_replaced_by_the_next_message(heart, make_message, site_context, short_tmp, owner):
    ctx, msgs = messages(heart, make_message, site_context)
    assert worker.forward("summary", msgs["summary"], ctx, owner=owner.pid) is not None
    first, path = worker._STARTED[-1], worker.socket_path(owner.pid, ctx.node_id)
    first.kill()
    first.wait()
    assert path.exists()  # SIGKILL: the socket file stays behind, nobody listens
    assert worker.forward("summary", msgs["summary"], ctx, owner=owner.pid) is not None
    assert len(worker._STARTED) == 2 and worker._STARTED[-1].poll() is None


def test_concurrent_first_messages_start_one_worker(heart, make_message, site_context, short_tmp, owner):
    ctx, msgs = messages(heart, make_message, site_context)
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(worker.forward("summary", msgs["summary"], ctx,
                                                                             owner=owner.pid))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(replies) == 3 and all(r is not None for r in replies)
    assert len(worker._STARTED) == 1


class Peer:
    """A process listening where a worker would, to see what a message's process sends it: it reads one request
    and either closes (a worker lost mid-message) or replies with an empty content."""

    def __init__(self, path: Path, reply: bool):
        self.request = b""
        path.unlink(missing_ok=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.srv.settimeout(30)  # never hangs the test run
        self.thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self.thread.start()

    def _serve(self, reply: bool) -> None:
        conn, _ = self.srv.accept()
        with conn:
            self.request = b"".join(worker._read_frames(conn, 3))
            if reply:
                conn.sendall(worker._frames(b'{"ok": true}', serde.recorddict_to_proto(RecordDict()).SerializeToString()))
        self.srv.close()


def test_the_worker_never_gets_the_context_state_and_a_lost_worker_means_handling_here(
        heart, make_message, site_context, short_tmp, monkeypatch, capsys):
    ctx, msgs = messages(heart, make_message, site_context)
    ctx.state["secret"] = ConfigRecord({"key": "s3cr3t-dp-ledger"})
    me = os.getpid()
    peer = Peer(worker.socket_path(me, ctx.node_id), reply=True)
    assert worker.forward("summary", msgs["summary"], ctx, owner=me) is not None
    peer.thread.join(10)
    assert b"Hungary" in peer.request and b"s3cr3t-dp-ledger" not in peer.request
    # a worker that goes away before replying: the caller handles the message itself
    peer = Peer(worker.socket_path(me, ctx.node_id), reply=False)
    assert worker.forward("summary", msgs["summary"], ctx, owner=me) is None
    assert "lost during the summary message" in capsys.readouterr().err
    peer.thread.join(10)


def test_the_clientapp_uses_the_worker_only_in_flowers_per_message_processes(heart, make_message, site_context,
                                                                             short_tmp, monkeypatch, capsys):
    assert not worker.wanted({})  # pytest is no flwr-clientapp process
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-clientapp", "--token", "x"])
    assert worker.wanted({}) and worker.wanted({"site-worker": "auto"})
    assert not worker.wanted({"site-worker": "off"})
    # no worker can be started (its directory is not private): the ClientApp process handles the message itself
    worker.private_dir().chmod(0o755)
    ctx, msgs = messages(heart, make_message, site_context)
    reply = client_app(msgs["summary"], ctx)
    assert "not a directory private to this user" in capsys.readouterr().err
    assert reply.content[P.SITE]["name"] == "Hungary" and P.SUMMARY_RECORD in reply.content


def test_the_socket_is_named_by_owner_node_code_and_library(short_tmp, monkeypatch):
    a = worker.socket_path(1, 2)
    assert a == worker.socket_path(1, 2) and len(str(a)) < 100  # a Unix socket path's limit is ~104-108 bytes
    assert len({a, worker.socket_path(3, 2), worker.socket_path(1, 4)}) == 3
    monkeypatch.setattr(worker, "_library", lambda: ("9.9.9", 0))  # mmn-fed upgraded: a new worker, new code
    assert worker.socket_path(1, 2) != a
