"""Flower process plumbing of the engines (``server.engines``), site enrolment (``server.enrol``) and the
consortium (``server.consortium``): where the Flower App lives; everything else (Flower's environment and
console scripts, free ports, TOML config values, process trees) is ``mmn_fed.processes``, shared with a site's
side (``clients.kit``) and re-exported here."""
from __future__ import annotations

from pathlib import Path

from mmn_fed.processes import (MARK, PR_SET_PDEATHSIG, Terminated, child_preexec, descendants, flower_bin,
                               flower_env, foreground, free_port, listener_pid, marked, sigterm_as_interrupt,
                               start_reaper, stop_listener, stop_tree, terminate, toml_config, toml_value)

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower App: pyproject.toml's [tool.flwr.app]

__all__ = ["APP_DIR", "MARK", "PR_SET_PDEATHSIG", "Terminated", "child_preexec", "descendants", "flower_bin",
           "flower_env", "foreground", "free_port", "listener_pid", "marked", "sigterm_as_interrupt", "start_reaper",
           "stop_listener", "stop_tree", "terminate", "toml_config", "toml_value"]
