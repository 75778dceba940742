"""Process plumbing shared by the coordinator's side (``server``: engines, enrolment, consortium) and a site's
side (``clients.kit``), which the layering keeps from importing each other: the environment of every Flower
process we start, console scripts next to this interpreter, free loopback ports, TOML values for Flower's
``--run-config`` / ``--node-config``, and process trees: a child in its own session that dies with us, SIGTERM
as Ctrl-C, running a command in the foreground, marking and finding a deployment's processes, stopping a
process tree within seconds. Standard library only (no torch, no Flower import).
Linux only where it reads /proc (finding a listener, a process's descendants, a mark)."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping


def flower_env(flwr_home: Path | str | None = None, **extra: str) -> dict[str, str]:
    """Environment for every Flower process we start: no telemetry, no runtime dependency installs, no
    update check, unbuffered output, a 0.2 s SuperExec poll; our own FLWR_HOME when given (else the caller's); ``extra`` on top."""
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
                # the SuperExec's poll for a message to run (default 1 s): a ClientApp / ServerApp starts sooner
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


def flower_bin(name: str) -> str:
    """A console script (``flwr``, ``flower-superlink``, ``ray``, ...) next to this interpreter (falls back to PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


PR_SET_PDEATHSIG = 1  # linux/prctl.h
try:  # resolved here, not between fork and exec
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


def child_preexec() -> None:
    """``preexec_fn`` of every long-running Flower process we start (in its own session): on Linux, ask the
    kernel to send it SIGTERM when its parent dies, so that a SIGKILLed ``mmn-fed deploy-local`` does not leave
    a SuperLink or SuperNodes behind (SIGTERM, not SIGKILL: Flower then stops its own children). Elsewhere a
    no-op. Runs between fork and exec: no Python objects beyond this call."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM received inside ``sigterm_as_interrupt``: handled wherever Ctrl-C is."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a supervisor, ``timeout``, ``kill``) raises ``Terminated``, a
    KeyboardInterrupt, in the main thread, as Ctrl-C does: the same clean shutdown (every ``with
    LocalDeployment`` stops what it started). The previous handler is restored afterwards. Main thread only
    (elsewhere: a no-op)."""
    def handler(signum, frame):
        raise Terminated("SIGTERM")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


MARK = "MMN_FED_DEPLOYMENT"  # environment variable every process of one deployment inherits (its id)


def marked(mark: str, exclude: int | None = None) -> list[int]:
    """Live processes whose environment holds ``MARK=mark``: all of a deployment's processes, also those whose
    parent died (Flower's flwr-serverapp / flwr-clientapp run in sessions of their own)."""
    needle = f"{MARK}={mark}".encode()
    out = []
    for pid in _all_pids():
        if pid in (os.getpid(), exclude):
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and _alive(pid):
            out.append(pid)
    return out


# The reaper: a small process that outlives us. It waits for EOF on its stdin (our end of the pipe closes when
# we exit, however we exit, SIGKILL included), then stops every process carrying the deployment's mark.
_REAPER = r"""
import os, signal, sys, time
sys.stdin.buffer.read()
needle = ("%s=" + sys.argv[1]).encode()
def marked():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        with open(f"/proc/{d}/stat") as g:
                            if g.read().rsplit(")", 1)[1].split()[0] not in "ZX":
                                out.append(int(d))
            except OSError:
                pass
    return out
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    pids = marked()
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    end = time.monotonic() + wait
    while pids and time.monotonic() < end and marked():
        time.sleep(0.2)
""" % MARK


def start_reaper(mark: str) -> subprocess.Popen:
    """Start the reaper of deployment ``mark`` (Linux /proc): when this process dies or closes the reaper's
    stdin, every process carrying the mark gets SIGTERM, then SIGKILL after 5 s."""
    env = {k: v for k, v in os.environ.items() if k != MARK}
    return subprocess.Popen([sys.executable, "-c", _REAPER, mark], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True)


_GIVEN: set[int] = set()  # ports free_port has handed out in this process


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and never one this process handed out before: the OS may offer a
    port again before the child it was given to has bound it (a SuperNode importing Flower takes seconds), and
    two SuperNodes given the same port leave one of them dead ("address already in use")."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise OSError("no free TCP port on 127.0.0.1 that this process has not handed out already")


def toml_value(v: object) -> str:
    """One value of Flower's ``--run-config`` / ``--node-config`` strings (``key=value ...``), in TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def toml_config(values: Mapping[str, object]) -> str:
    """``key=value key=value`` for Flower's ``--run-config`` / ``--node-config``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def listener_pid(port: int) -> int | None:
    """PID of the process listening on 127.0.0.1:``port`` (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f[9])
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid_dir.name)
        except OSError:
            continue
    return None


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Flower's SuperExec, flwr-serverapp and flwr-clientapp processes
    run in sessions of their own, so a process group is not enough)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def terminate(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL whatever is still running."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_tree(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Stop the processes ``pids`` and all their descendants, and the process groups ``pids`` lead (a member
    whose parent already died is no longer a descendant): SIGTERM to all, wait up to ``timeout`` s, SIGKILL
    what is left. Returns every pid stopped (sorted)."""
    tree = {d for p in pids for d in descendants(p)}
    leaders = [p for p in pids if _pgid(p) == p]
    tree |= {q for q in _all_pids() if _pgid(q) in leaders}
    tree = sorted(tree)
    terminate(tree, timeout)
    return tree


def foreground(cmd: list[str], env: Mapping[str, str], cwd: Path | str,
               after_start: Callable[[subprocess.Popen], None] | None = None, log=None) -> int:
    """Run ``cmd`` (in a session of its own; output to ``log`` when given) until it exits, or until we get
    SIGINT/SIGTERM: then stop it and all its descendants (Flower's SuperExec, flwr-serverapp and flwr-clientapp
    processes run in sessions of their own), SIGKILL after 10 s. ``after_start(proc)`` runs once it is started.
    Returns its exit code (0 when stopped by a signal)."""
    proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, start_new_session=True, stdout=log, stderr=log)
    stopping: list[int] = []

    def handler(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if after_start is not None:
            after_start(proc)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None or stopping:
            stopped = stop_tree([proc.pid])
            print(f"stopped {len(stopped)} process(es)", file=sys.stderr, flush=True)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def stop_listener(port: int, timeout: float = 10.0) -> None:
    """Stop the process listening on ``port`` and all its descendants: the local SuperLink that
    ``flwr run`` starts (detached) for a simulation, with its SuperExec and simulation processes."""
    pid = listener_pid(port)
    if pid is not None:
        stop_tree([pid], timeout)


def _all_pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _pgid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "X")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
