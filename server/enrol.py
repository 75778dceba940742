"""Enrol and revoke sites on a SuperLink that runs with ``--enable-supernode-auth``.

A site is known to the federation by the public half of an EC (P-384) key pair it generates itself; the
private key never leaves the site (its SuperNode starts with ``--auth-supernode-private-key``). The
federation operator enrols the public key (``flwr supernode register``), which gives the site a node id,
and revokes a site by that id (``flwr supernode unregister``). A SuperNode whose key is not enrolled is
refused by the SuperLink (it exits with Flower's exit code 305, "Failed to activate SuperNode").

Functions wrap Flower 1.42's CLI (``flwr supernode register | unregister | list --format json``) against a
named SuperLink connection in ``$FLWR_HOME/config.toml``; ``register`` adds the ``mmn-fed site-key``,
``mmn-fed enrol``, ``mmn-fed revoke`` and ``mmn-fed sites`` commands.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .credentials import make_node_key
from .processes import flower_bin, flower_env


class EnrolmentError(RuntimeError):
    """``flwr supernode ...`` failed or the key file is not an EC public key in OpenSSH/PEM format."""


def _run(args: list[str], flwr_home: Path | str | None, timeout: float) -> dict:
    res = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], env=flower_env(flwr_home),
                         capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        out = {"success": False, "error-message": (res.stdout + res.stderr)[-2000:]}
    if res.returncode != 0 or not out.get("success", False):
        raise EnrolmentError(f"flwr {' '.join(args)} failed: {out.get('error-message', out)}")
    return out


def new_site_key(directory: Path | str, name: str) -> tuple[Path, Path]:
    """A site's key pair (P-384; private key in OpenSSH format, mode 0600): (private, public) paths.
    Run at the site; only the ``.pub`` file goes to the federation operator."""
    return make_node_key(Path(directory), name)


def check_public_key(path: Path | str) -> None:
    """Refuse anything but an EC public key before asking the SuperLink (clearer than Flower's error)."""
    data = Path(path).read_bytes()
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----")
               else serialization.load_ssh_public_key(data))
    except (ValueError, TypeError) as e:
        raise EnrolmentError(f"{path} is not an OpenSSH/PEM public key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EnrolmentError(f"{path} holds a {type(key).__name__}; SuperNode authentication needs an EC "
                             "(NIST curve, e.g. P-384) key")


def enrol(public_key: Path | str, connection: str, flwr_home: Path | str | None = None,
          name: str | None = None, timeout: float = 60) -> int:
    """Enrol a site's SuperNode public key; returns its node id (keep it to revoke the site)."""
    check_public_key(public_key)
    args = ["supernode", "register", str(public_key), connection] + (["--name", name] if name else [])
    return int(_run(args, flwr_home, timeout)["node-id"])


def revoke(node_id: int, connection: str, flwr_home: Path | str | None = None, timeout: float = 60) -> None:
    """Revoke an enrolled SuperNode: the SuperLink refuses it from now on."""
    _run(["supernode", "unregister", str(int(node_id)), connection], flwr_home, timeout)


def list_sites(connection: str, flwr_home: Path | str | None = None, timeout: float = 60) -> list[dict]:
    """Enrolled SuperNodes as Flower reports them (node-id, status: registered | online | offline | ...)."""
    return list(_run(["supernode", "list", connection], flwr_home, timeout).get("nodes", []))


# ---- CLI ------------------------------------------------------------------------------------

def register(subparsers) -> None:
    home = dict(help="FLWR_HOME holding config.toml with the connection (default: $FLWR_HOME or ~/.flwr)")
    p = subparsers.add_parser("site-key", help="generate a site's SuperNode key pair (run at the site)")
    p.add_argument("directory")
    p.add_argument("name")
    p.set_defaults(func=lambda a: print("private: %s\npublic: %s" % new_site_key(a.directory, a.name)) or 0)

    p = subparsers.add_parser("enrol", help="enrol a site's SuperNode public key on the SuperLink")
    p.add_argument("public_key")
    p.add_argument("connection", help="SuperLink connection name in $FLWR_HOME/config.toml")
    p.add_argument("--name", help="a label for the site")
    p.add_argument("--flwr-home", **home)
    p.set_defaults(func=lambda a: print(enrol(a.public_key, a.connection, a.flwr_home, a.name)) or 0)

    p = subparsers.add_parser("revoke", help="revoke an enrolled SuperNode by node id")
    p.add_argument("node_id", type=int)
    p.add_argument("connection")
    p.add_argument("--flwr-home", **home)
    p.set_defaults(func=lambda a: revoke(a.node_id, a.connection, a.flwr_home) or 0)

    p = subparsers.add_parser("sites", help="list enrolled SuperNodes and their status")
    p.add_argument("connection")
    p.add_argument("--flwr-home", **home)
    p.set_defaults(func=lambda a: print(json.dumps(list_sites(a.connection, a.flwr_home), indent=2)) or 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m server.enrol {site-key,enrol,revoke,sites} ...`` (the same commands as ``mmn-fed``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m server.enrol", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EnrolmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
