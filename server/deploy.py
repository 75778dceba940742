"""Flower's deployment engine on loopback: one SuperLink and one SuperNode per site on 127.0.0.1,
with TLS certificates and SuperNode authentication keys generated here, then ``flwr run``.

``mmn-fed deploy-local`` runs the federation over the built-in dataset's hospitals this way and
stops every process it started. Real sites run the same pieces on separate machines
(docs/federation.md, "Deployment").
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    import pandas as pd

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CONNECTION = "mmnfed-local"


class DeploymentError(RuntimeError):
    """A SuperLink/SuperNode did not start, or the run failed."""


# ---- credentials ------------------------------------------------------------------------

def make_tls(directory: Path, host: str = "127.0.0.1") -> dict[str, Path]:
    """A throwaway CA and a server certificate for ``host`` (SAN IP), PEM files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmn-fed local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
          .not_valid_after(now + _dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC (P-384) key pair in OpenSSH format, as ``flwr supernode register`` expects."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = directory / f"{name}", directory / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    os.chmod(priv, 0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- processes --------------------------------------------------------------------------

def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for every Flower process we start: own FLWR_HOME, no telemetry, no installs."""
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1"})
    return env


def _bin(name: str) -> str:
    """A Flower console script next to this interpreter (falls back to PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 with TLS and SuperNode authentication, under ``workdir``.

    Use as a context manager: every process started is stopped on exit (also on errors).
    ``node_configs`` holds one node-config mapping per SuperNode (e.g. site name and data path).
    """

    workdir: Path
    node_configs: Sequence[Mapping[str, object]]
    tls: bool = True
    auth: bool = True
    procs: list[subprocess.Popen] = field(default_factory=list)
    port: int = 0
    stopped_pids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        # own process group: stopping it also stops the flwr-serverapp/flwr-clientapp children
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def start(self) -> "LocalDeployment":
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        creds = self.workdir / "credentials"
        link = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]
        conn = [f"[superlink.{CONNECTION}]", f'address = "127.0.0.1:{self.port}"']
        if self.tls:
            t = make_tls(creds / "tls")
            link += ["--ssl-ca-certfile", str(t["ca"]), "--ssl-certfile", str(t["cert"]), "--ssl-keyfile", str(t["key"])]
            conn.append(f'root-certificates = "{t["ca"]}"')
        else:
            link.append("--insecure")
            conn.append("insecure = true")
        if self.auth:
            link.append("--enable-supernode-auth")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n' + "\n".join(conn) + "\n")
        self._spawn("superlink", link)
        self._wait_port(self.port, "SuperLink")
        for nc in self.node_configs:
            self.add_node(nc)
        return self

    def add_node(self, node_config: Mapping[str, object], register: bool = True,
                 extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """Start one SuperNode (with a fresh key pair, registered with the SuperLink unless ``register``
        is False: such a node must be refused when authentication is on)."""
        i = sum(1 for p in self.logs.glob("supernode*.log"))
        creds = self.workdir / "credentials"
        cmd = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
               "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())]
        cmd += ["--root-certificates", str(creds / "tls" / "ca.pem")] if self.tls else ["--insecure"]
        if self.auth:
            priv, pub = make_node_key(creds / "nodes", f"node{i}")
            if register:
                self.flwr(["supernode", "register", str(pub), CONNECTION], timeout=60)
            cmd += ["--auth-supernode-private-key", str(priv)]
        return self._spawn(f"supernode{i}", cmd + list(extra_args))

    def _wait_port(self, port: int, what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.procs[-1].poll() is not None:
                raise DeploymentError(f"{what} exited with code {self.procs[-1].returncode}; see {self.logs}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {self.logs}")

    def flwr(self, args: list[str], timeout: float = 600, log_name: str | None = None) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment; raise with its output on failure."""
        res = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                             text=True, timeout=timeout)
        if log_name:
            (self.logs / log_name).write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
        return res

    def run_app(self, app_dir: Path, run_config: Mapping[str, object], timeout: float = 1800) -> subprocess.CompletedProcess:
        """``flwr run APP CONNECTION --run-config ... --stream``: returns when the run has finished."""
        cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        args = ["run", str(app_dir), CONNECTION, "--stream"] + (["--run-config", cfg] if cfg else [])
        res = self.flwr(args, timeout=timeout, log_name="flwr_run.log")
        if "raised an exception" in res.stdout or "Exit Code:" in res.stdout:  # `flwr run` exits 0 regardless
            raise DeploymentError(f"the run failed; see {self.logs / 'flwr_run.log'}:\n{res.stdout[-3000:]}")
        return res

    def stop(self) -> None:
        """Stop every process started here and all their descendants (SuperExecs, flwr-serverapp and
        flwr-clientapp processes run in sessions of their own, so a process group is not enough)."""
        pids = [d for p in self.procs for d in _descendants(p.pid)]
        self.stopped_pids = sorted(set(pids))
        _terminate(pids)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "LocalDeployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def _listener_pid(port: int) -> int | None:
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


def _descendants(pid: int) -> list[int]:
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


def stop_listener(port: int, timeout: float = 10.0) -> None:
    """Stop the process listening on ``port`` and all its descendants: the local SuperLink that
    ``flwr run`` starts (detached) for a simulation, with its SuperExec and simulation processes."""
    pid = _listener_pid(port)
    if pid is not None:
        _terminate(_descendants(pid), timeout)


def _terminate(pids: list[int], timeout: float = 10.0) -> None:
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


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "X")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


# ---- the federation on loopback, and the `mmn-fed deploy-local` command -------------------

def run_deployment(sites: Mapping[str, "pd.DataFrame"], run_config: Mapping[str, object], workdir: Path,
                   tls: bool = True, auth: bool = True, timeout: float = 1800):
    """Each site's rows to its own CSV; one SuperNode per site (node config: data-path, site-name);
    SuperLink with TLS and SuperNode authentication; ``flwr run``; everything stopped afterwards.
    Returns ``server.engine.FederationResult`` read from ``run_config['run-dir']``."""
    from .engine import APP_DIR, read_result

    workdir = Path(workdir).resolve()
    data = workdir / "site_data"
    data.mkdir(parents=True, exist_ok=True)
    node_configs = []
    for i, (name, df) in enumerate(sites.items()):
        path = data / f"site_{i}.csv"
        df.to_csv(path, index=False)
        node_configs.append({"site-name": str(name), "data-path": str(path)})
    rc = {"min-nodes": len(sites), **dict(run_config)}
    t0 = time.perf_counter()
    with LocalDeployment(workdir, node_configs, tls=tls, auth=auth) as dep:
        dep.run_app(APP_DIR, rc, timeout=timeout)
    res = read_result(Path(str(rc["run-dir"])), time.perf_counter() - t0)
    res.extra["stopped_pids"] = dep.stopped_pids
    return res


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy-local", help="federate over a dataset's hospitals with Flower's deployment engine on 127.0.0.1 "
                             "(SuperLink + one SuperNode per site, TLS, SuperNode authentication)")
    p.add_argument("--dataset", default="heart", help="built-in dataset whose site column names the hospitals")
    p.add_argument("--sites", type=int, default=0, help="use only the first N sites (0 = all)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal term (0 = FedAvg)")
    p.add_argument("--model", choices=["multimodn", "pfusion"], default="multimodn")
    p.add_argument("--tasks", default="", help="comma list of tasks (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/deploy-local", help="run directory (model.pt, metrics.json, logs)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    p.add_argument("--aggregation", choices=["mean", "trimmed-mean", "median"], default="mean",
                   help="per-module aggregation rule (robust rules against a malicious site; not with secure aggregation)")
    p.add_argument("--trim", type=float, default=0.25, help="trimmed-mean: share of sites cut at each end")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="pairwise-masked secure aggregation: the server learns only per-module sums")
    p.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                   help="differential privacy at the sites: Gaussian noise std / clip (0 = off)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="differential privacy: L2 bound per module update")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="differential privacy: delta of the reported epsilon")
    p.set_defaults(func=_deploy_local)


def _deploy_local(args) -> int:
    from mmn_fed.data import load_builtin

    df, schema = load_builtin(args.dataset)
    if not schema.site_column:
        raise ValueError(f"dataset '{args.dataset}' names no site column ([sites] column in its schema)")
    sites = {str(n): g.reset_index(drop=True) for n, g in df.groupby(schema.site_column)}
    if args.sites:
        sites = dict(list(sites.items())[: args.sites])
    out = Path(args.out).resolve()
    rc = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "lr": args.lr, "mu": args.mu,
          "model": args.model, "tasks": args.tasks, "seed": args.seed, "dataset": args.dataset,
          "run-dir": str(out / "run"), "aggregation": args.aggregation, "trim": args.trim,
          "secure-aggregation": args.secure_aggregation, "dp-clip": args.dp_clip,
          "dp-noise-multiplier": args.dp_noise_multiplier, "dp-delta": args.dp_delta}
    if args.secure_aggregation and args.aggregation != "mean":
        raise ValueError("--aggregation trimmed-mean/median needs each site's update: not with --secure-aggregation")
    print(f"deploy-local: SuperLink + {len(sites)} SuperNodes ({', '.join(sites)}) on 127.0.0.1, "
          f"{'insecure' if args.insecure else 'TLS + SuperNode auth'}"
          f"{', secure aggregation' if args.secure_aggregation else ''}, aggregation {args.aggregation}"
          f"; logs in {out / 'logs'}", flush=True)
    res = run_deployment(sites, rc, out, tls=not args.insecure, auth=not args.insecure)
    last = res.history[-1] if res.history else {}
    print(json.dumps({"run_dir": str(res.run_dir), "seconds": round(res.seconds, 1), "rounds": len(res.history),
                      "federated_eval": last.get("federated_eval", {})}, indent=1))
    return 0
