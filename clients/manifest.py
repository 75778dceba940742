"""A simulation data directory's ``sites.json`` (written by ``server.engines.write_site_data``), parsed once per
version of the file: every message of every simulated site reads it (``clients.site.site_source``,
``clients.audit.locate``), and parsing it each time cost O(sites) per message. Stdlib only (the audit CLI imports it)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "sites.json"
    return _manifest(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _manifest(path: str, mtime_ns: int) -> dict:
    return json.loads(Path(path).read_text())
