"""A site's worker on Flower's deployment engine: one long-lived process that handles the site's messages.

Flower 1.42's SuperNode runs every message in a new ``flwr-clientapp`` process (hard-coded), so a handler that
imports torch, pandas and our library and reads and encodes the site's rows pays all of it again for every
message: ~1.4 s of CPU per message, ~3 s of a 4-site round on 2 cores (docs/federation.md, "Round time").
The ClientApp (``clients/app.py``) therefore imports none of it. Its summary, profile, train and evaluate
handlers hand the message to this site's worker, which imported ``clients.handlers`` once and keeps the
site (rows, encoded tensors, model; ``clients.cache``) for the run, as the in-process and Ray engines keep it
in their long-lived processes; the replies are the same bit for bit (a kept site trains like a fresh one).

What the site enforces and records stays in the message's own process, around the worker's handler: the
audit log, the site policy, differential privacy, secure aggregation (the ClientApp's mods) and
``context.state`` (the DP ledger, secure-aggregation secrets), which is never sent to the worker.

The worker
- is started by the first message that finds none (a lock lets one start it); the message waits until it
  listens (``START_SECONDS``), then every message of this SuperNode uses it;
- listens on a Unix socket in a directory only this user can enter (``private_dir``), named after its owner
  (the process that starts the ClientApp processes: the SuperNode's executor), the node and the app's code;
- handles one message at a time (another waits its turn), with the handlers' own code and data;
- exits when its owner exits (checked every second), after ``IDLE_SECONDS`` without a message, or on
  SIGTERM / SIGINT; it carries the environment of the SuperNode (deploy-local's mark included, so
  ``mmn-fed deploy-local`` stops it with everything else).

When no worker can serve a message (none could be started, it died mid-message, or node config
``site-worker="off"``), the message's own process runs the handler, as before: slower, never different.
Off Flower's per-message processes (in-process and Ray engines) no worker is involved.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Message, RecordDict

PROTOCOL = 1
HANDLERS = ("summary", "profile", "train", "evaluate")  # the functions of clients.handlers the worker runs
NODE_CONFIG = "site-worker"  # node config: "off" = every message handled in its own process
IDLE_SECONDS = 1800.0  # a worker without a message for this long exits (the next message starts another)
START_SECONDS = 120.0  # how long a message waits for a new worker to listen before handling itself
STALE_SECONDS = 7 * 86400  # the lock and log files of workers gone this long are removed
_MAX_PATH = 100  # bytes of a Unix socket path (sun_path: 104 on macOS, 108 on Linux, with the NUL)
_OFF = ("off", "false", "0", "no")
_STARTED: list[subprocess.Popen] = []  # workers this process started (kept: no "still running" warning at exit)


class WorkerError(RuntimeError):
    """The handler raised in the worker. Raised as a subclass named after the handler's own exception
    (``SiteDataError``...) with its text, so that the audit log and Flower's report to the server name it as
    when the handler runs in the message's process."""


_REMOTE: dict[str, type] = {}


def _remote_error(name: str, text: str) -> WorkerError:
    """A ``WorkerError`` whose class is named ``name`` (an exception's type name), carrying ``text``."""
    if not name.isidentifier():
        name = "WorkerError"
    if name not in _REMOTE:
        _REMOTE[name] = WorkerError if name == "WorkerError" else type(name, (WorkerError,), {"__module__": __name__})
    return _REMOTE[name](text)


def wanted(node_config: Mapping[str, Any]) -> bool:
    """Whether this site's messages go to its worker: this process is one of Flower's per-message ClientApp
    processes (``flwr-clientapp``) and the node config does not say ``site-worker="off"``."""
    if str(node_config.get(NODE_CONFIG, "auto")).strip().lower() in _OFF:
        return False
    return Path(sys.argv[0]).name == "flwr-clientapp" and hasattr(socket, "AF_UNIX")


# ---- the message's side ------------------------------------------------------------------------------------

def forward(handler: str, msg: Message, context: Context, owner: int | None = None) -> RecordDict | None:
    """The content of ``handler``'s reply to ``msg``, computed by this node's worker (started when none
    runs). None when no worker can serve it: the caller handles the message itself. Raises ``WorkerError``
    when the handler raised. ``owner``: the process whose exit ends the worker (default: our parent, the
    process that starts the ClientApp processes)."""
    from flwr.common import serde

    owner = os.getppid() if owner is None else owner
    try:
        path = socket_path(owner, context.node_id)
        request = _frames(json.dumps({"protocol": PROTOCOL, "handler": handler}).encode(),
                          serde.message_to_proto(msg).SerializeToString(),
                          serde.context_to_proto(_stateless(context)).SerializeToString())
        sock = _connect(path) or _start(path, owner)
    except OSError as e:
        _say(f"no site worker ({e}); handling the {handler} message in this process")
        return None
    with sock:
        try:
            sock.sendall(request)
            header, body = _read_frames(sock, 2)
        except (OSError, EOFError) as e:
            _say(f"the site worker was lost during the {handler} message ({e}); handling it in this process")
            return None
    head = json.loads(header)
    if not head.get("ok"):
        raise _remote_error(str(head.get("type") or "WorkerError"), str(head.get("error")))
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    return serde.recorddict_from_proto(ProtoRecordDict.FromString(body))


def socket_path(owner: int, node_id: int) -> Path:
    """The socket of the worker that serves ``node_id`` for ``owner`` (the process starting the ClientApp
    processes) with this code, library and interpreter."""
    key = json.dumps([PROTOCOL, owner, _start_time(owner), int(node_id), str(code_root()), sys.executable,
                      *_library()])
    path = private_dir() / f"w-{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"
    if len(os.fsencode(path)) > _MAX_PATH:
        raise OSError(f"the worker's socket path {path} is longer than a Unix socket allows ({_MAX_PATH} bytes)")
    return path


def private_dir() -> Path:
    """``<tmp>/mmn-fed-<uid>``: created 0700; refused (OSError) if another user owns it or others may enter it."""
    d = Path(tempfile.gettempdir()) / f"mmn-fed-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.lstat()
    if not d.is_dir() or d.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{d} is not a directory private to this user (mode {oct(st.st_mode & 0o777)})")
    return d


def code_root() -> Path:
    """The directory holding this ``clients`` package (the installed app's copy on a SuperNode)."""
    return Path(__file__).resolve().parent.parent


def _library() -> tuple[str, int]:
    """The installed library's version and when it was installed: after an upgrade, the next message starts a
    worker with the new code instead of using the old one."""
    from mmn_fed import version

    return version.__version__, Path(version.__file__).stat().st_mtime_ns


def _stateless(context: Context) -> Context:
    """``context`` without its state: the handlers do not use it and the worker never sees it."""
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(context.node_config),
                   state=RecordDict(), run_config=dict(context.run_config))


def _connect(path: Path) -> socket.socket | None:
    """A connection to the worker listening on ``path``, or None when none does."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return s
    except OSError:
        s.close()
        return None


def _start(path: Path, owner: int) -> socket.socket:
    """Start the worker of ``path`` (one process at a time: the others wait on the lock, then connect to it)
    and return a connection to it once it listens. OSError if it exits or does not listen in time."""
    with open(path.with_suffix(".lock"), "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.utime(lock.fileno())  # in use: not stale
        sock = _connect(path)  # started by the process that held the lock before us
        if sock is not None:
            return sock
        path.unlink(missing_ok=True)  # a socket left by a worker that was killed
        _remove_stale(path.parent)
        log_path = path.with_suffix(".log")
        root = str(code_root())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "clients.worker", str(path), str(owner)], cwd=root,
                                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        _STARTED.append(proc)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            if proc.poll() is not None:
                raise OSError(f"the site worker exited at start with code {proc.returncode} (log: {log_path})")
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        raise OSError(f"the site worker did not listen within {START_SECONDS:.0f} s (log: {log_path})")


def _remove_stale(directory: Path) -> None:
    """Remove the lock and log files of workers whose socket is gone and that were last used over
    ``STALE_SECONDS`` ago (a SuperNode that stopped long ago); a worker that is running keeps its files."""
    cutoff = time.time() - STALE_SECONDS
    for lock in directory.glob("w-*.lock"):
        try:
            if lock.with_suffix(".sock").exists() or lock.stat().st_mtime > cutoff:
                continue
            log = lock.with_suffix(".log")
            if log.exists() and log.stat().st_mtime > cutoff:
                continue
            log.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        except OSError:
            continue


def _say(text: str) -> None:
    print(f"mmn-fed site: {text}", file=sys.stderr, flush=True)


# ---- the worker's side -------------------------------------------------------------------------------------

def serve(path: Path, owner: int, idle: float = IDLE_SECONDS) -> None:
    """Handle messages on ``path`` one at a time until ``owner`` exits, ``idle`` s pass without a message, or
    SIGTERM / SIGINT."""
    from flwr.common import serde
    from flwr.proto.message_pb2 import Context as ProtoContext, Message as ProtoMessage

    from . import handlers  # torch, pandas, the library: imported once, before the socket says "ready"

    def stop(signum, frame):
        raise SystemExit(0)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop)
    born = _start_time(owner)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file: this user only
    try:
        srv.bind(str(path))
    finally:
        os.umask(old)
    inode = path.stat().st_ino
    srv.listen(16)
    srv.settimeout(1.0)
    last = time.monotonic()
    try:
        while _alive(owner, born) and time.monotonic() - last < idle:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    header, message, ctx = _read_frames(conn, 3)
                except (OSError, EOFError):
                    continue
                reply = _handle(header, message, ctx, handlers, serde, ProtoMessage, ProtoContext)
                try:
                    conn.sendall(reply)
                except OSError:  # the message's process went away (stopped, timed out): serve the next one
                    pass
            last = time.monotonic()
    finally:
        srv.close()
        try:
            if path.stat().st_ino == inode:  # still ours (not a successor's); the lock file stays (someone may
                path.unlink()                  # hold it to start the next worker)
        except OSError:
            pass


def _handle(header: bytes, message: bytes, ctx: bytes, handlers, serde, ProtoMessage, ProtoContext) -> bytes:
    """One request: run the handler it names on its message and context; the reply frames."""
    try:
        head = json.loads(header)
        if head.get("protocol") != PROTOCOL or head.get("handler") not in HANDLERS:
            raise ValueError(f"unknown request {head!r} (this worker speaks protocol {PROTOCOL}: {HANDLERS})")
        msg = serde.message_from_proto(ProtoMessage.FromString(message))
        context = serde.context_from_proto(ProtoContext.FromString(ctx))
        reply = getattr(handlers, head["handler"])(msg, context)
        return _frames(json.dumps({"ok": True}).encode(), serde.recorddict_to_proto(reply.content).SerializeToString())
    except Exception as e:  # the handler's own failure: reported to the message, which raises it as its own
        # the log gets the type and where, not the text (it may quote a patient's value, as audit_mod knows)
        print(f"handler raised {type(e).__name__}\n{''.join(traceback.format_tb(e.__traceback__))}", file=sys.stderr,
              flush=True)
        return _frames(json.dumps({"ok": False, "type": type(e).__name__, "error": str(e)}).encode(), b"")


def _frames(*blobs: bytes) -> bytes:
    return b"".join(struct.pack("!Q", len(b)) + b for b in blobs)


def _read_frames(sock: socket.socket, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        (size,) = struct.unpack("!Q", _read_exact(sock, 8))
        out.append(_read_exact(sock, size))
    return out


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (Linux: clock ticks since boot), to tell it from a later process given the same pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, born: int | None) -> bool:
    """``pid`` runs (not a zombie) and is the process that started at ``born`` (where /proc tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    return born is None or _start_time(pid) == born


def main(argv: list[str] | None = None) -> int:
    """``python -m clients.worker SOCKET OWNER [IDLE]``: what ``_start`` runs."""
    args = sys.argv[1:] if argv is None else argv
    serve(Path(args[0]), int(args[1]), float(args[2]) if len(args) > 2 else IDLE_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
