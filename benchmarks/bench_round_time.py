"""Where a round of the deployment engine (``mmn-fed deploy-local``) goes (issue 13, item 6).

One round on the deployment engine = Flower's fixed cost + the sites' training + the rest:

(a) **Flower**: a minimal ServerApp/ClientApp pair (written below into a temp folder; it imports nothing but
    flwr) sends the same messages as mmn-fed (a summary and a profile query, then one train message per site
    per round, whose reply is a new update of the heart model's size, and one evaluate message after the last
    round) through the same machinery (``LocalDeployment``: SuperLink + one SuperNode per site, TLS + SuperNode
    auth unless ``--insecure``; one ``flwr-clientapp`` process per message; the SuperNode's 3 s poll; the
    server pulls replies every 0.2 s as ``server.exchange`` does; ``--flower-poll`` adds a run with Flower's
    own ``send_and_receive``, 3 s between pulls).
(b) **training**: the sites' local training and evaluation, measured in-process on the same rows and settings
    (``clients.site.Site.train`` / ``.evaluate``, after a warm-up), and the handler time the sites' audit
    logs record on the real run (message in -> reply out: data loading + encoding + training, no imports).
(c) **the rest** = real round - (a) - (b): what our code adds (the ClientApp processes' imports, the hand-over
    to the site's worker, the server's own work). Each phase of the real run is also split (server
    ``timing.json`` + the sites' audit logs) into: push -> handlers start, handlers, handlers end -> replies
    at the server.

The real federation runs twice in the same run: as deployed (each site's messages handled by its worker,
``clients/worker.py``: torch, pandas and the site's rows loaded once per site) and, as the baseline, with node
config ``site-worker="off"`` (every message's own process imports torch & co. and reads and encodes the
site's rows again: what every round paid before the worker; ``--skip-no-worker`` leaves it out).

    PYTHONPATH=. python benchmarks/bench_round_time.py [--sites 4] [--rounds 3] [--insecure] [--flower-poll]

The target (issue 13): real round <= 1.2 x (minimal round + training + one torch import per training message,
the CPU of parallel work divided over the cores).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIN_SERVER = '''
import json, time
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
import numpy as np

app = ServerApp()

def _send(grid, nodes, kind, content, poll):
    # the transport mmn-fed's server uses (server.exchange): push, then pull every `poll` s (0 = Flower's own
    # send_and_receive, which sleeps 3 s between pulls)
    msgs = [Message(content=content, message_type=kind, dst_node_id=n) for n in nodes]
    if not poll:
        return list(grid.send_and_receive(msgs, timeout=600))
    pending, got = set(grid.push_messages(msgs)), []
    while pending:
        for r in grid.pull_messages(pending):
            got.append(r)
            pending.discard(r.metadata.reply_to_message_id)
        if pending:
            time.sleep(poll)
    return got

@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, rounds, poll = int(cfg["min-nodes"]), int(cfg["rounds"]), float(cfg["poll"])
    while len(list(grid.get_node_ids())) < n:
        time.sleep(1.0)
    nodes = sorted(grid.get_node_ids())
    # ~ the heart model's size (84 KiB), as mmn-fed sends it: one packed Array and its index
    arrays = ArrayRecord({"packed": Array(np.zeros(84376, dtype=np.uint8)), "index": Array(np.zeros(2000, dtype=np.uint8))})
    t0 = time.perf_counter()
    _send(grid, nodes, "query.summary", RecordDict({"config": ConfigRecord({"x": 1})}), poll)
    _send(grid, nodes, "query.profile", RecordDict({"config": ConfigRecord({"x": 1})}), poll)
    out = {"setup": time.perf_counter() - t0, "rounds": []}
    for r in range(1, rounds + 1):  # as mmn-fed: one train message per site per round ...
        t0 = time.perf_counter()
        _send(grid, nodes, "train", RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": r})}), poll)
        if r == rounds:  # ... and one evaluate message after the last round
            _send(grid, nodes, "evaluate", RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": r})}), poll)
        out["rounds"].append(time.perf_counter() - t0)
    with open(str(cfg["out"]), "w") as f:
        json.dump(out, f)
'''

MIN_CLIENT = '''
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"m": MetricRecord({"n": 1})}), reply_to=msg)

@app.train()
def train(msg: Message, context: Context) -> Message:
    # a new update (new bytes: uploaded like a real one, not deduplicated by Flower against the download)
    up = ArrayRecord({k: Array(msg.content["arrays"][k].numpy() + 1) for k in msg.content["arrays"].keys()})
    return Message(RecordDict({"arrays": up, "m": MetricRecord({"n": 1})}), reply_to=msg)

@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"m": MetricRecord({"n": 1})}), reply_to=msg)
'''

MIN_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "minround"
version = "0.1.0"
description = "minimal round"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "minround.server:app"
clientapp = "minround.client:app"

[tool.flwr.app.config]
min-nodes = 1
rounds = 1
poll = 0.2
out = ""
'''


def heart_sites(n: int):
    from mmn_fed.data import load_builtin
    df, schema = load_builtin("heart")
    sites = {str(k): g.reset_index(drop=True) for k, g in df.groupby(schema.site_column)}
    return dict(list(sites.items())[:n] if n else sites.items()), schema


def minimal_rounds(n_sites: int, rounds: int, tls: bool, work: Path, poll: float = 0.2) -> dict:
    """(a): the minimal app through LocalDeployment; per-round seconds as its ServerApp measures them."""
    from server.engines.deployment import LocalDeployment
    app = work / "minapp"
    (app / "minround").mkdir(parents=True)
    (app / "minround" / "__init__.py").write_text("")
    (app / "minround" / "server.py").write_text(textwrap.dedent(MIN_SERVER))
    (app / "minround" / "client.py").write_text(textwrap.dedent(MIN_CLIENT))
    (app / "pyproject.toml").write_text(textwrap.dedent(MIN_PYPROJECT))
    out = work / "minimal.json"
    t0 = time.perf_counter()
    with LocalDeployment(work / "dep", [{"site-name": f"s{i}"} for i in range(n_sites)], tls=tls, auth=tls) as dep:
        dep.run_app(app, {"min-nodes": n_sites, "rounds": rounds, "out": str(out), "poll": poll})
    res = json.loads(out.read_text())
    res["wall"] = time.perf_counter() - t0
    return res


def _utc(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def audit_handler_seconds(audit_root: Path) -> dict[int, dict[str, list[float]]]:
    """round -> message type -> [handler seconds per site] from the sites' audit logs (in -> out)."""
    out: dict[int, dict[str, list[float]]] = {}
    for log in audit_root.glob("*/audit.jsonl"):
        pending = {}
        for line in log.read_text().splitlines():
            e = json.loads(line)
            if e["dir"] == "in":
                pending[e["message_id"]] = e
            elif e.get("reply_to") in pending:
                i = pending.pop(e["reply_to"])
                out.setdefault(int(i.get("round") or 0), {}).setdefault(i["type"], []).append(
                    _utc(e["time"]) - _utc(i["time"]))
    return out


def phase_breakdown(work: Path) -> list[dict]:
    """Per phase of the real run (the server's ``timing.json``, the sites' audit logs): seconds from the push
    to the handlers' start (SuperNode poll, SuperExec poll, a fresh ClientApp process and its imports), in the
    handlers (mean over sites) and from the last handler's end to the last reply at the server."""
    phases = json.loads((work / "run" / "timing.json").read_text())
    entries = []
    for log in (work / "site_data" / "mmn-fed-audit").glob("*/audit.jsonl"):
        entries += [json.loads(line) for line in log.read_text().splitlines()]
    out = []
    for p in phases:
        key = lambda e: (e["type"], str(e.get("round") or 0)) == (p["type"], str(p["round"] or 0))  # noqa: E731
        ins = [_utc(e["time"]) for e in entries if e["dir"] == "in" and key(e)]
        outs = [_utc(e["time"]) for e in entries if e["dir"] == "out" and e["type"] == p["type"]
                and str(e.get("round") or 0) == str(p["round"] or 0)]
        if not ins or not outs or not p["replies"]:
            continue
        out.append({"type": p["type"], "round": p["round"], "seconds": p["seconds"],
                    "to_handler": statistics.mean(ins) - p["sent"], "handler": statistics.mean(outs) - statistics.mean(ins),
                    "back": p["sent"] + max(p["replies"]) - max(outs)})
    return out


def real_rounds(sites, rounds: int, tls: bool, work: Path, node_config=None) -> dict:
    """The real federation through run_deployment (what deploy-local runs), a fixed number of rounds."""
    from server.engines.deployment import run_deployment
    rc = {"num-server-rounds": rounds, "patience-rounds": 0, "run-dir": str(work / "run")}
    t0 = time.perf_counter()
    res = run_deployment(sites, rc, work, tls=tls, auth=tls, node_config=node_config)
    wall = time.perf_counter() - t0
    return {"wall": wall, "rounds": [h["seconds"] for h in res.history],
            "auroc": [h.get("federated_eval", {}).get("disease/auroc") for h in res.history],
            "handlers": audit_handler_seconds(work / "site_data" / "mmn-fed-audit"), "phases": phase_breakdown(work)}


def inprocess_training(sites, schema, rounds: int) -> dict:
    """(b): each site's local training and evaluation in this process, the same rows and default settings;
    round 1 is a warm-up for the data caches, the figures are the mean over the other rounds."""
    import torch
    torch.set_num_threads(1)
    from clients.site import Site
    from edge_runtime.preprocessing import merge_summaries, Preprocessor
    from mmn_fed.model import ModelConfig
    from mmn_fed.model_io import build_from_preprocessor
    from mmn_fed.settings import SiteSettings
    from mmn_fed import protocol as P
    settings = SiteSettings()
    objs = {n: Site(n, df) for n, df in sites.items()}
    summaries = [s.summary(schema, settings) for s in objs.values()]
    prep = Preprocessor.from_summary(schema, merge_summaries(summaries)) if hasattr(Preprocessor, "from_summary") \
        else None
    if prep is None:
        from mmn_fed.data import fit_preprocessor
        prep = fit_preprocessor(schema, [s.splits(schema, settings)[0] for s in objs.values()])
    key = P.digest(json.dumps(prep.to_dict(), sort_keys=True))
    mc = ModelConfig()
    params = {k: v.detach().numpy().copy() for k, v in build_from_preprocessor(prep, mc).state_dict().items()}
    t_enc = {}
    for n, s in objs.items():
        t0 = time.perf_counter()
        s.encoded(prep, key, settings)
        t_enc[n] = time.perf_counter() - t0
    train_t: dict[str, list[float]] = {n: [] for n in objs}
    eval_t: dict[str, list[float]] = {n: [] for n in objs}
    for r in range(1, max(rounds, 2) + 1):
        for n, s in objs.items():
            t0 = time.perf_counter()
            new, _, _ = s.train(prep, key, mc, settings, params, r)
            t1 = time.perf_counter()
            s.evaluate(prep, key, mc, settings, new, {"round": r})
            t2 = time.perf_counter()
            if r > 1:
                train_t[n].append(t1 - t0)
                eval_t[n].append(t2 - t1)
    return {"encode": t_enc, "train": {n: statistics.mean(v) for n, v in train_t.items()},
            "evaluate": {n: statistics.mean(v) for n, v in eval_t.items()}}


def import_seconds(module: str, repeats: int = 3) -> float:
    """Wall seconds of ``python -c 'import module'`` in a fresh process, minus a bare interpreter's start."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    def run(code):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env)
            best = min(best, time.perf_counter() - t0)
        return best
    return run(f"import {module}") - run("pass")


def print_rounds(label: str, real: dict, mins: list, minimal: float, training: float, torch_imp: float, par: int,
                 min_res: dict) -> None:
    """One real run's rounds against the minimal app's, and its phases."""
    print(f"\n{label}:\n| round | real round (s) | (a) Flower minimal round | (b) training (/ {par} cores) "
          "| torch import per train msg | (c) rest | target 1.2x(a+b+torch) | real / (a+b+torch) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = real.get("rounds", []) or [float("nan")] * len(mins)
    for i, sec in enumerate(rows):  # each round against the same round of the minimal app (the last has 2 phases)
        a = mins[i] if i < len(mins) else minimal
        print(f"| {i + 1} | {sec:.1f} | {a:.1f} | {training:.1f} | {torch_imp:.1f} | {sec - a - training:.1f} | "
              f"{1.2 * (a + training + torch_imp):.1f} | {sec / (a + training + torch_imp):.2f} |")
    if rows and len(mins) >= len(rows):
        base = sum(mins[:len(rows)]) + len(rows) * (training + torch_imp)
        print(f"| all | {sum(rows):.1f} | {sum(mins[:len(rows)]):.1f} | | | | {1.2 * base:.1f} | {sum(rows) / base:.2f} |")
    if not real:
        return
    h = real["handlers"]
    for r in sorted(h):
        print(f"round {r}: handler seconds per site (audit in->out): " +
              "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in sorted(h[r].items())))
    print("phases (s): push -> handlers start (polls, process start, imports) | in the handlers (mean) | last "
          "handler end -> last reply at the server")
    for p in real.get("phases", []):
        print(f"  {p['type']:<14} r{p['round']:<3} {p['seconds']:6.1f} = {p['to_handler']:5.1f} | {p['handler']:5.2f} | "
              f"{p['back']:5.1f}")
    print("federated disease AUROC after each round: " + " / ".join(f"{a:.4f}" for a in real["auroc"] if a is not None))
    print(f"real wall {real['wall']:.0f} s (setup included); minimal wall {min_res.get('wall', 0):.0f} s, "
          f"minimal setup (summary + profile) {min_res.get('setup', 0):.1f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--insecure", action="store_true", help="no TLS / SuperNode auth (deploy-local's default is on)")
    ap.add_argument("--skip-minimal", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-no-worker", action="store_true",
                    help="leave out the baseline run with node config site-worker=off (one process per message)")
    ap.add_argument("--flower-poll", action="store_true",
                    help="also time the minimal app with Flower's own send_and_receive (3 s between pulls): what "
                         "server.exchange's 0.2 s poll saves")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args(argv)
    tls = not args.insecure
    cores = os.cpu_count() or 1
    sites, schema = heart_sites(args.sites)
    n = len(sites)
    par = min(n, cores)  # how many ClientApp processes really run at once
    res: dict = {"sites": list(sites), "rounds": args.rounds, "tls": tls, "cores": cores,
                 "load_before": os.getloadavg()}
    res["imports"] = {m: import_seconds(m) for m in ("flwr.clientapp", "torch", "clients.app", "clients.handlers")}
    print(f"imports: {res['imports']}", file=sys.stderr, flush=True)
    res["inprocess"] = (inprocess_training(sites, schema, args.rounds) if not args.skip_inprocess else
                        {"encode": {}, "train": {}, "evaluate": {}})
    print(f"in-process: {res['inprocess']}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_round_") as tmp:
        tmp = Path(tmp)
        if not args.skip_minimal:
            res["minimal"] = minimal_rounds(n, args.rounds, tls, tmp / "minimal")
            print(f"minimal: {res['minimal']}", file=sys.stderr, flush=True)
        if args.flower_poll:
            res["minimal_flower_poll"] = minimal_rounds(n, args.rounds, tls, tmp / "minimal3", poll=0)
            print(f"minimal, Flower's 3 s poll: {res['minimal_flower_poll']}", file=sys.stderr, flush=True)
        if not args.skip_real:
            res["real"] = real_rounds(sites, args.rounds, tls, tmp / "real")
            print(f"real: {res['real']['rounds']}", file=sys.stderr, flush=True)
            if not args.skip_no_worker:
                res["real_no_worker"] = real_rounds(sites, args.rounds, tls, tmp / "real_nw",
                                                     {n: {"site-worker": "off"} for n in sites})
    res["load_after"] = os.getloadavg()

    ip = res["inprocess"]
    train_cpu = sum(ip["train"].values()) + sum(ip["evaluate"].values())  # CPU seconds per round, all sites
    training = train_cpu / par
    torch_imp = n * res["imports"]["torch"] / par  # one torch import per training message
    mins = res.get("minimal", {}).get("rounds", [])
    minimal = statistics.mean(mins) if mins else float("nan")
    print(f"\n{n} sites, {args.rounds} rounds, {'TLS + node auth' if tls else 'insecure'}, {cores} cores, "
          f"load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}")
    print(f"imports in a fresh process (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["imports"].items()))
    print(f"in-process per round (s, all sites, CPU): train {sum(ip['train'].values()):.2f}, "
          f"evaluate {sum(ip['evaluate'].values()):.2f}; reading+encoding once: {sum(ip['encode'].values()):.2f}")
    for label, key in (("site workers (as deployed)", "real"), ('baseline: site-worker="off", one process per message',
                                                                  "real_no_worker")):
        if key in res or (key == "real" and not res.get("real_no_worker")):
            print_rounds(label, res.get(key, {}), mins, minimal, training, torch_imp, par,
                         res.get("minimal", {}))
    if "minimal_flower_poll" in res:
        print(f"minimal round with Flower's send_and_receive (3 s between pulls): "
              f"{statistics.mean(res['minimal_flower_poll']['rounds']):.1f} s (vs {minimal:.1f} s with a 0.2 s poll)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
