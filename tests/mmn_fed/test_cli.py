"""`mmn-fed` finds the subcommands of higher packages through the ``mmn_fed.commands`` entry points of
pyproject.toml: it names none of them, imports only the one asked for, and says what is missing when one
cannot load."""
import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mmn_fed.cli import COMMANDS, OWN, main

ROOT = Path(__file__).resolve().parents[2]
DECLARED = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][COMMANDS]


def _run(*args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_installed_entry_points_are_pyprojects():
    installed = {ep.name: ep.value for ep in entry_points(group=COMMANDS)}
    assert installed == DECLARED, ("the installed mmn-fed's metadata is stale: reinstall it (pip install -e \".[all]\") "
                                   "after changing [project.entry-points] in pyproject.toml")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    listed = out.split("positional arguments:")[1].split("\n")[1].strip().strip("{}").split(",")
    assert set(listed) == set(OWN) | set(DECLARED)


def test_only_the_module_of_the_command_asked_for_is_imported():
    code = ("import sys, json; from mmn_fed.cli import build_parser; build_parser([sys.argv[1]]); "
            "print(json.dumps(sorted({m for m in sys.modules if m.split('.')[0] in ('server', 'simulations', 'clients')})))")
    simulate = json.loads(_run("-c", code, "simulate").stdout)
    enrol = json.loads(_run("-c", code, "enrol").stdout)
    assert "simulations.cli" in simulate and not any(m.startswith(("server", "clients")) for m in simulate)
    assert "server.enrol" in enrol and not any(m.startswith(("simulations", "server.engines")) for m in enrol)


def test_a_command_that_cannot_load_names_what_is_missing(tmp_path):
    """A real distribution on the path whose entry points name a module that is not installed."""
    dist = tmp_path / "mmn_fed_extra-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmn-fed-extra\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{COMMANDS}]\nfederate-more = mmn_fed_extra_missing.cli:register\n"
                                           f"federate-less = mmn_fed_extra_missing.cli:register\n")
    res = _run("-m", "mmn_fed.cli", "federate-more", "--rounds", "3", extra_path=tmp_path)
    assert res.returncode == 2
    assert "mmn-fed federate-more: error: command 'federate-more' is registered by entry point " \
           "'mmn_fed_extra_missing.cli:register'" in res.stderr
    assert "No module named 'mmn_fed_extra_missing'" in res.stderr
    listing = _run("-m", "mmn_fed.cli", "-h", extra_path=tmp_path).stdout
    assert "federate-more" in listing and "federate-less" in listing and "unavailable" in listing


BLOCK = "import sys\nfor m in ('torch', 'pandas', 'flwr', 'onnx', 'matplotlib', 'scipy', 'sklearn'): sys.modules[m] = None\n"


@pytest.mark.parametrize("argv, extra", [(["train", "--out", "OUT"], "train"), (["export", "m.pt", "--out", "OUT"], "train"),
                                         (["audit", "heart"], "train"), (["simulate"], "federation")])
def test_a_command_whose_extra_is_missing_names_it(tmp_path, argv, extra):
    """The edge-only install (no torch, pandas, flwr, ...; tests/edge_runtime/test_edge_install.py installs it
    for real): one line naming the extra, exit 2, no traceback; `-h` still lists every command."""
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    res = _run("-c", BLOCK + f"from mmn_fed.cli import main\nsys.exit(main({argv!r}))")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "\n".join(res.stderr.strip().splitlines()[:1])  # one line
    assert res.stderr.startswith(f"mmn-fed {argv[0]} needs the '{extra}' extra: pip install \"mmn-fed[{extra}]\"")
    assert not (tmp_path / "out").exists()


def test_help_without_the_train_extra_lists_every_command():
    res = _run("-c", BLOCK + "from mmn_fed.cli import main\nmain(['-h'])")
    assert res.returncode == 0, res.stderr
    listed = res.stdout.split("positional arguments:")[1].split("\n")[1].strip().strip("{}").split(",")
    assert set(listed) == set(OWN) | set(DECLARED)
