"""Flower's deployment engine on loopback: one SuperLink and one SuperNode per site on 127.0.0.1,
with TLS certificates and SuperNode authentication keys generated here, then ``flwr run``.

``mmn-fed deploy-local`` runs the federation over the built-in dataset's hospitals this way and
stops every process it started. Real sites run the same pieces on separate machines
(docs/federation.md, "Deployment").
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from mmn_fed.settings import SETTING, SETTINGS, RunSettings, add_flags

from ..credentials import make_node_key, make_tls
from ..processes import (APP_DIR, MARK, child_preexec, flower_bin, flower_env, free_port, marked, sigterm_as_interrupt,
                         start_reaper, stop_tree, terminate, toml_config)
from .results import FederationResult, read_result, write_site_data

if TYPE_CHECKING:
    import pandas as pd

    from edge_runtime.schema import Schema

CONNECTION = "mmnfed-local"


class DeploymentError(RuntimeError):
    """A SuperLink/SuperNode did not start, or the run failed."""


def run_failure(output: str) -> str | None:
    """The exception that ended a ServerApp, from ``flwr run``'s output: the last line of its traceback
    (``server.app.FederationError: round 2: ...`` -> ``FederationError: round 2: ...``), or None."""
    found = None
    for line in output.splitlines():
        m = re.match(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$", line.strip())
        if m:
            found = f"{m.group(1)}: {m.group(2)}"
    return found


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
    node_ports: list[int] = field(default_factory=list)  # each SuperNode's own --port, in start order

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.mark = uuid.uuid4().hex  # in every process's environment: processes.marked finds them all
        self.reaper: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.home, **{MARK: self.mark})

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        # own session (Ctrl-C in a terminal reaches us, not it: we stop it, its group and its descendants);
        # SIGTERM from the kernel when we die, even by SIGKILL (Linux: processes.child_preexec)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                             start_new_session=True, preexec_fn=child_preexec)
        log.close()  # the child holds its own copy
        self.procs.append(p)
        return p

    def start(self) -> "LocalDeployment":
        if self.reaper is None and sys.platform.startswith("linux"):
            self.reaper = start_reaper(self.mark)  # stops everything marked if we die, even by SIGKILL
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # a fresh SuperLink state: the nodes of an earlier (crashed) deployment in this directory are gone; the
        # run itself resumes from run-dir's checkpoint (docs/federation.md, "Faults")
        for f in self.workdir.glob("superlink.db*"):
            f.unlink()
        creds = self.workdir / "credentials"
        link = [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
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
        started = [(self.add_node(nc), self.node_ports[-1]) for nc in self.node_configs]
        for i, (proc, port) in enumerate(started):  # every SuperNode up (its port open), or say which one died
            self._wait_port(port, f"SuperNode {i} ({self.node_configs[i].get('site-name', i)})", proc=proc)
        return self

    def add_node(self, node_config: Mapping[str, object], register: bool = True,
                 extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """Start one SuperNode (with a fresh key pair, registered with the SuperLink unless ``register``
        is False: such a node must be refused when authentication is on)."""
        i = sum(1 for p in self.logs.glob("supernode*.log"))
        creds = self.workdir / "credentials"
        self.node_ports.append(free_port())
        cmd = [flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(self.node_ports[-1]),
               "--node-config", toml_config(node_config)]
        cmd += ["--root-certificates", str(creds / "tls" / "ca.pem")] if self.tls else ["--insecure"]
        if self.auth:
            priv, pub = make_node_key(creds / "nodes", f"node{i}")
            if register:
                self.flwr(["supernode", "register", str(pub), CONNECTION], timeout=60)
            cmd += ["--auth-supernode-private-key", str(priv)]
        return self._spawn(f"supernode{i}", cmd + list(extra_args))

    def _wait_port(self, port: int, what: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
        """Wait until ``proc`` (default: the last process started) listens on ``port``; raise if it exits."""
        proc = proc if proc is not None else self.procs[-1]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise DeploymentError(f"{what} exited with code {proc.returncode}; see {self.logs}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {self.logs}")

    def flwr(self, args: list[str], timeout: float = 600, log_name: str | None = None) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment; raise with its output on failure."""
        res = subprocess.run([flower_bin("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                             text=True, timeout=timeout, preexec_fn=child_preexec)  # dies with us, as the nodes do
        if log_name:
            (self.logs / log_name).write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
        return res

    def run_app(self, app_dir: Path, run_config: Mapping[str, object], timeout: float = 1800) -> subprocess.CompletedProcess:
        """``flwr run APP CONNECTION --run-config ... --stream``: returns when the run has finished."""
        cfg = toml_config(run_config)
        args = ["run", str(app_dir), CONNECTION, "--stream"] + (["--run-config", cfg] if cfg else [])
        res = self.flwr(args, timeout=timeout, log_name="flwr_run.log")
        if "raised an exception" in res.stdout or "Exit Code:" in res.stdout:  # `flwr run` exits 0 regardless
            cause = run_failure(res.stdout)
            raise DeploymentError(f"the run failed: {cause}; the run's output: {self.logs / 'flwr_run.log'}" if cause
                                  else f"the run failed; see {self.logs / 'flwr_run.log'}:\n{res.stdout[-3000:]}")
        return res

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every process started here, their process groups and all their descendants (SuperExecs,
        flwr-serverapp and flwr-clientapp processes run in sessions of their own, so a process group is not
        enough): SIGTERM, ``timeout`` s, then SIGKILL. Runs on exit from the ``with`` block, also after
        Ctrl-C or SIGTERM (``mmn-fed deploy-local``: ``processes.sigterm_as_interrupt``)."""
        self.stopped_pids = stop_tree([p.pid for p in self.procs], timeout)
        left = marked(self.mark, exclude=self.reaper.pid if self.reaper else None)  # orphans of a dead parent
        if left:
            terminate(left, timeout)
            self.stopped_pids = sorted(set(self.stopped_pids) | set(left))
        if self.reaper is not None:
            self.reaper.stdin.close()  # nothing left for it to do: it exits
            try:
                self.reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.reaper.kill()
            self.reaper = None
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


# ---- the federation on loopback, and the `mmn-fed deploy-local` command -------------------

def run_deployment(sites: Mapping[str, "pd.DataFrame"], run_config: Mapping[str, object], workdir: Path,
                   tls: bool = True, auth: bool = True, timeout: float = 1800, *, schema: "Schema | None" = None,
                   test_sites: Mapping[str, "pd.DataFrame"] | None = None,
                   node_config: Mapping[str, Mapping[str, object]] | None = None) -> FederationResult:
    """Each site's rows to its own CSV; one SuperNode per site (node config: data-path, site-name, and
    ``node_config[site]`` when given, e.g. ``{"policy": "/path/policy.toml", "site-worker": "off"}``);
    SuperLink with TLS and SuperNode authentication; ``flwr run``; everything stopped afterwards.
    Returns the ``FederationResult`` read from ``run_config['run-dir']``.

    The server's schema: ``schema`` (the Schema itself, as ``run_federation`` takes it, e.g. a time-series
    schema; with ``test_sites``, the global model is also tested on them) is written with the sites' files
    (``schema.json``, ``sites.json``) and the run config's ``data-dir`` points the ServerApp there; the sites
    still read only their own ``data-path``. Without it, the run config's ``schema`` (a TOML path) or
    built-in ``dataset`` names it, as for ``flwr run``. The sites receive it from the server (a time-series
    schema with every message)."""
    workdir = Path(workdir).resolve()
    data = workdir / "site_data"
    if schema is not None:
        given = [k for k in ("schema", "data-dir") if run_config.get(k)]
        if given:
            raise ValueError(f"run_deployment: schema given twice (the schema argument and run config {given}); "
                             "pass one")
        write_site_data(data, sites, schema, test_sites)  # site_<i>.csv, schema.json, sites.json
        run_config = {**dict(run_config), "data-dir": str(data)}
    elif test_sites:
        raise ValueError("run_deployment: test_sites need the schema argument (they are written next to it)")
    data.mkdir(parents=True, exist_ok=True)
    node_configs = []
    for i, (name, df) in enumerate(sites.items()):
        path = data / f"site_{i}.csv"
        if schema is None:
            df.to_csv(path, index=False)
        node_configs.append({"site-name": str(name), "data-path": str(path), **dict((node_config or {}).get(name, {}))})
    rc = {"min-nodes": len(sites), **dict(run_config)}
    t0 = time.perf_counter()
    with LocalDeployment(workdir, node_configs, tls=tls, auth=auth) as dep:
        dep.run_app(APP_DIR, rc, timeout=timeout)
    res = read_result(Path(str(rc["run-dir"])), time.perf_counter() - t0)
    res.extra["stopped_pids"] = dep.stopped_pids
    return res


DEPLOY_LOCAL_ROUNDS = 3  # deploy-local's default --rounds (the setting's own default, 100, is for real runs)

# every setting is a flag of deploy-local (docs/settings.md), but these three, which it sets itself
DEPLOY_FLAGS = tuple(s.name for s in SETTINGS if s.name not in ("data-dir", "run-dir", "min-nodes"))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "deploy-local", help="federate over a dataset's hospitals with Flower's deployment engine on 127.0.0.1 "
                             "(SuperLink + one SuperNode per site, TLS, SuperNode authentication)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sites", type=int, default=0, help="use only the first N sites of --dataset (0 = all)")
    p.add_argument("--out", default="runs/deploy-local", help="run directory (model.pt, metrics.json, logs)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    p.add_argument("--site-policy", metavar="TOML",
                   help="a site policy every SuperNode enforces (docs/federation.md, 'Site policy'): each site gets "
                        "its own copy in OUT/policies/, with its own privacy ledger beside it")
    add_flags(p, DEPLOY_FLAGS, aliases={"num-server-rounds": "--rounds"})
    # a first try, not a training budget: each round costs Flower ~2 x 3 s of polling plus a process per message
    # (docs/federation.md, "Round time"); --rounds 100 lets early stopping decide, as the other engines do
    p.set_defaults(func=_deploy_local, **{SETTING["num-server-rounds"].field: DEPLOY_LOCAL_ROUNDS})


def site_policies(policy: Path, sites: Sequence[str], directory: Path) -> dict[str, dict[str, str]]:
    """Node config ``policy`` for every site: ``policy`` checked (a bad file is refused here, naming it and the
    key, before any process starts), then copied to ``directory/<site>.toml`` (each site's own privacy ledger
    is kept beside its copy)."""
    from clients.audit import safe_name
    from clients.policy import load_policy

    load_policy(policy)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in sites:
        copy = directory / f"{safe_name(name)}.toml"
        copy.write_bytes(policy.read_bytes())
        out[name] = {"policy": str(copy)}
    return out


def _deploy_local(args) -> int:
    from mmn_fed.data import load_builtin

    out = Path(args.out).resolve()
    settings = RunSettings.from_args(args, DEPLOY_FLAGS, run_dir=str(out / "run"))
    settings.check()  # refuse a bad combination before starting any process (the ServerApp checks it too)
    df, schema = load_builtin(settings.dataset)
    if not schema.site_column:
        raise ValueError(f"dataset '{settings.dataset}' names no site column ([sites] column in its schema); split "
                         "its rows into sites yourself and call server.engines.deployment.run_deployment(sites, "
                         "run_config, workdir, schema=schema)")
    sites = {str(n): g.reset_index(drop=True) for n, g in df.groupby(schema.site_column)}
    if args.sites:
        sites = dict(list(sites.items())[: args.sites])
    rc = {k: v for k, v in settings.to_run_config().items() if k in DEPLOY_FLAGS or k == "run-dir"}
    node_config = site_policies(Path(args.site_policy), list(sites), out / "policies") if args.site_policy else None
    print(f"deploy-local: SuperLink + {len(sites)} SuperNodes ({', '.join(sites)}) on 127.0.0.1, "
          f"{'insecure' if args.insecure else 'TLS + SuperNode auth'}"
          f"{', secure aggregation' if settings.secure_aggregation else ''}, aggregation {settings.aggregation}"
          f"{f', site policy {args.site_policy}' if args.site_policy else ''}"
          f"; {settings.num_server_rounds} round(s) at most (--rounds; ~7-13 s each on 2 idle cores, more under "
          f"load, docs/federation.md 'Round time'); logs in {out / 'logs'}", flush=True)
    try:
        with sigterm_as_interrupt():  # SIGTERM stops every process started, as Ctrl-C does
            res = run_deployment(sites, rc, out, tls=not args.insecure, auth=not args.insecure, node_config=node_config)
    except DeploymentError as e:  # a process that did not start, or the run's own failure: one line, named
        print(f"deploy-local: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as e:
        sig = getattr(e, "signum", signal.SIGINT)
        print(f"deploy-local: stopped by {sig.name}; every process it started was stopped", file=sys.stderr, flush=True)
        return 128 + int(sig)
    last = res.history[-1] if res.history else {}
    print(json.dumps({"run_dir": str(res.run_dir), "seconds": round(res.seconds, 1), "rounds": len(res.history),
                      "federated_eval": last.get("federated_eval", {})}, indent=1))
    return 0
