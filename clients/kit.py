"""A site's side of a consortium (docs/federation.md, "A consortium: provisioning"): its key pair and its
SuperNode, from the startup kit the coordinator wrote (``server/consortium.py``, ``consortium add-site``).

``mmn-fed site keygen KIT`` writes ``KIT/keys/site.key`` (EC P-384, OpenSSH format, mode 0600: it never leaves
the site) and ``site.key.pub`` (the only file that goes back to the coordinator). ``mmn-fed site start KIT
--data D`` checks the kit's CA against its fingerprint, generates the key pair if there is none yet, and runs
``flower-supernode`` in the foreground with the kit's CA and SuperLink address, the site's key and node config
(``site-name``, ``data-path``); SIGINT/SIGTERM stop it and every process below it.

The kit's format (``site.toml``: ``consortium``, ``site``, ``superlink``, ``ca-fingerprint``,
``supernode-port``, ``[node-config]``) is written by ``server.consortium.kit_toml``; this module only reads it
(the layout forbids clients -> server imports: the process helpers it shares with the coordinator's side live in
``mmn_fed.processes``).
"""
from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mmn_fed.processes import flower_bin, flower_env, foreground, toml_value

KIT_FILE = "site.toml"
KEY = "site.key"  # in KIT/keys
SUPERNODE_PORT = 9094
SUPERNODE_NOT_ADMITTED = 305  # flower-supernode's exit code when the SuperLink refuses the node


class KitError(ValueError):
    """A startup kit, data file or key that cannot be used (the message says why)."""


def fingerprint(cert_pem: bytes) -> str:
    """``sha256:hex`` of a certificate's DER encoding (the kit's ``ca-fingerprint``)."""
    return "sha256:" + x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def read_kit(kit: Path | str) -> tuple[Path, dict]:
    kit = Path(kit).resolve()
    path = kit / KIT_FILE
    if not path.is_file():
        raise KitError(f"{kit} is not a startup kit (no {KIT_FILE}); the coordinator makes one with "
                       "`mmn-fed consortium add-site DIR NAME`")
    try:
        return kit, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise KitError(f"{path}: {e}") from e


def keygen(kit: Path | str) -> tuple[Path, Path]:
    """The site's key pair in ``KIT/keys``: (``site.key``, mode 0600; ``site.key.pub``). Refuses to overwrite."""
    kit, _ = read_kit(kit)
    priv, pub = kit / "keys" / KEY, kit / "keys" / f"{KEY}.pub"
    if priv.exists():
        raise KitError(f"{priv} exists already; the coordinator enrolled (or will enrol) its public key: keep it "
                       "(delete it only to replace a compromised key, then have the new one enrolled)")
    priv.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                    + b"\n")
    return priv, pub


def supernode_command(kit: Path, cfg: Mapping, data: str, port: int | None = None) -> list[str]:
    """``flower-supernode`` for this kit: TLS with the kit's CA, authentication with the site's key, node
    config from the kit's ``[node-config]`` (empty values and ``schema`` left out) with ``data-path``."""
    node = {"site-name": cfg["site"],
            **{k: v for k, v in cfg.get("node-config", {}).items() if v != "" and k != "schema"}, "data-path": data}
    return [flower_bin("flower-supernode"), "--superlink", str(cfg["superlink"]), "--root-certificates",
            str(kit / "ca.pem"), "--auth-supernode-private-key", str(kit / "keys" / KEY),
            "--port", str(port or cfg.get("supernode-port", SUPERNODE_PORT)),
            "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node.items())]


def start(kit: Path | str, data: str | None = None, port: int | None = None, extra_args: Sequence[str] = ()) -> int:
    """Run the site's SuperNode in the foreground until it exits or SIGINT/SIGTERM; returns its exit code
    (0 when stopped by a signal)."""
    kit, cfg = read_kit(kit)
    if fingerprint((kit / "ca.pem").read_bytes()) != cfg.get("ca-fingerprint"):
        raise KitError(f"{kit / 'ca.pem'} is not the consortium's CA (its fingerprint differs from {KIT_FILE}'s "
                       "ca-fingerprint): ask the coordinator for the kit again")
    data = data or cfg.get("node-config", {}).get("data-path") or ""
    if not data:
        raise KitError(f"no data file: pass --data PATH or set [node-config] data-path in {kit / KIT_FILE}")
    if not Path(data).is_file():
        raise KitError(f"data file {data} not found")
    data = str(Path(data).resolve())
    schema = cfg.get("node-config", {}).get("schema")
    if schema:  # refuse a file in the wrong format before joining (the same check as `mmn-fed train`)
        from mmn_fed.data import check_table, load_dataset

        df, sch = load_dataset(data, schema)
        check_table(sch, df)
    if not (kit / "keys" / KEY).exists():
        _, pub = keygen(kit)
        print(f"site: generated this site's key pair; send {pub} to the coordinator "
              f"(mmn-fed consortium enrol DIR {cfg['site']} site.key.pub) before it can join", flush=True)
    cmd = supernode_command(kit, cfg, data, port) + list(extra_args)
    print(f"site: '{cfg['site']}' joining {cfg['superlink']} (consortium '{cfg.get('consortium')}'); Ctrl-C stops it",
          flush=True)
    rc = foreground(cmd, flower_env(kit / "flwr_home"), kit)
    if rc == SUPERNODE_NOT_ADMITTED:
        print(f"site: the SuperLink refused this site: its key is not enrolled (send {kit / 'keys' / (KEY + '.pub')} "
              "to the coordinator) or it was revoked", file=sys.stderr)
    return rc


# ---- CLI: `mmn-fed site keygen | start` (added to the `site` command group) -----------------

def register_kit(site_subparsers) -> None:
    """Add ``keygen`` and ``start`` to the ``mmn-fed site`` command group."""
    q = site_subparsers.add_parser("keygen", help="generate the site's key pair in KIT/keys (send site.key.pub only)")
    q.add_argument("kit", help="the startup kit directory the coordinator sent")
    q.set_defaults(func=lambda a: print("private: %s (stays here)\npublic: %s (send it to the coordinator)"
                                        % keygen(a.kit)) or 0)
    q = site_subparsers.add_parser("start", help="join the consortium: the site's SuperNode, foreground; Ctrl-C / "
                                                 "SIGTERM stop it")
    q.add_argument("kit")
    q.add_argument("--data", help="the site's CSV (default: site.toml's [node-config] data-path)")
    q.add_argument("--port", type=int, help="the SuperNode's local port (default: site.toml's supernode-port)")
    q.set_defaults(func=lambda a: start(a.kit, a.data, a.port))


def main(argv: list[str] | None = None) -> int:
    """``python -m clients.kit {keygen,start} ...`` (the same as ``mmn-fed site keygen | start``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clients.kit", description=__doc__.split("\n")[0])
    register_kit(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
