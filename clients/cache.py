"""What a process running ClientApps keeps between messages: each site's ``Site`` (its rows, encoded tensors
and model), for the length of one run.

The in-process engine and Ray's simulation engine run every site of a federation in one (or a few) long-lived
processes, message after message. Re-reading a site's CSV, re-encoding it and rebuilding its model for every
message cost ~30 ms per site-round (docs/federation.md, "Scale"), so a site is built once per run and kept
until the run ends: nothing is evicted while the run lasts, whatever the number of sites. The run is told
apart by Flower's run id and the run config (the in-process engine gives every run id 1, and a sweep runs many
federations one after the other in one process: each has its own run config, e.g. its ``run-dir``); the first
message of another run frees the previous run's sites. What the cache holds is measured by ``stats()``
(rows, encoded tensors and model parameters; ``benchmarks/bench_scale.py`` prints it): about the size of the
sites' data as float32, plus one small model per site.

A deployed site (Flower's deployment engine starts one process per message) holds one site in it, for one
message.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flwr.app import Context

from .site import Site, load_rows, site_source

_RUN: tuple | None = None  # the run whose sites are held
_SITES: dict[tuple, Site] = {}


def run_key(context: Context) -> tuple:
    """Which run a message belongs to: Flower's run id and a digest of the run config."""
    text = json.dumps({str(k): str(v) for k, v in dict(context.run_config).items()}, sort_keys=True)
    return context.run_id, hashlib.sha1(text.encode()).hexdigest()


def site(context: Context) -> Site:
    """The site of this message's node, built on the run's first message to it and kept until another run starts.
    Keyed on the data file's mtime too: a re-run that rewrites the same data dir must not train on stale rows."""
    global _RUN
    run = run_key(context)
    if run != _RUN:
        clear()
        _RUN = run
    src = site_source(context.node_config, context.run_config)
    path = Path(src.path) if getattr(src, "path", None) else None
    key = (src, path.stat().st_mtime_ns if path is not None and path.exists() else None)
    if key not in _SITES:
        _SITES[key] = Site(src.name, load_rows(src))
    return _SITES[key]


def clear() -> None:
    """Free every cached site (the next message rebuilds its site)."""
    global _RUN
    _SITES.clear()
    _RUN = None


def stats() -> dict[str, Any]:
    """What the cache holds: sites, built models and their memory in MiB (rows, encoded tensors, parameters)."""
    nbytes = sum(s.nbytes() for s in _SITES.values())
    return {"sites": len(_SITES), "models": sum(s.n_models for s in _SITES.values()), "mib": nbytes / 2**20}
