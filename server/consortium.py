"""A consortium on Flower's deployment engine, the coordinator's side: provisioning, enrolment, its SuperLink, runs.

The coordinator keeps a consortium directory (``mmn-fed consortium init DIR``)::

    consortium.toml          name, address, ports, CA fingerprint, mmn-fed version, sites (name, status,
                             public key, its fingerprint, node id)
    ca/ca.pem, ca/ca.key     the consortium's CA (EC P-384, valid for years; the key stays here, mode 0600)
    superlink/server.pem     the SuperLink's certificate for the address (SAN: its IP or DNS name, plus
    superlink/server.key     127.0.0.1 and localhost for the coordinator's own ``flwr`` CLI), key mode 0600
    sites/NAME.pub           each enrolled site's public key (the SuperLink's authorized keys)
    kits/NAME/               each site's startup kit (``consortium add-site``): no private key in it
    flwr_home/config.toml    the ``flwr`` CLI connection to this SuperLink (``consortium`` by default)
    state/superlink.db       the SuperLink's database (registered keys survive a restart)

A site receives its kit (``ca.pem``, ``site.toml``, ``START.txt``), generates its key pair there
(``mmn-fed site keygen KIT``, or on the first ``mmn-fed site start``: clients/kit.py), and sends back only
``keys/site.key.pub``; the coordinator records it (``mmn-fed consortium enrol DIR NAME PUBKEY``). The
SuperLink always runs with TLS and ``--enable-supernode-auth`` (``mmn-fed coordinator start DIR``): on start,
and on every enrol / revoke while it runs, the enrolled keys are registered with it (``flwr supernode
register``) and revoked ones unregistered. ``mmn-fed run DIR`` starts a federation (``flwr run``).
docs/federation.md, "A consortium: provisioning", has the commands.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .processes import APP_DIR, flower_bin, flower_env, foreground, toml_config

FILE = "consortium.toml"
KIT_FILE = "site.toml"
CONNECTION = "consortium"  # the flwr CLI connection name in DIR/flwr_home/config.toml
DEFAULT_PORT = 9091
SUPERNODE_PORT = 9094  # the SuperNode's local Runtime API port (Flower's default)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _run_flags() -> tuple[str, ...]:
    """The settings `mmn-fed run` takes as flags: deploy-local's (server/engines/deployment.py DEPLOY_FLAGS),
    computed here because that module imports pandas and `mmn-fed -h` must not (tests/mmn_fed/test_cli.py)."""
    from mmn_fed.settings import SETTINGS

    return tuple(s.name for s in SETTINGS if s.name not in ("data-dir", "run-dir", "min-nodes"))


class ConsortiumError(ValueError):
    """A consortium directory, startup kit, site name or public key that cannot be used (the message says why)."""


# ---- certificates ---------------------------------------------------------------------------

def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600: never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a certificate's DER encoding, ``sha256:hex`` (what a site checks its ca.pem against)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def key_fingerprint(public_key_text: str) -> str:
    """SHA-256 of an OpenSSH public key's blob, as ``ssh-keygen -l`` prints it (``SHA256:base64``)."""
    import base64

    blob = base64.b64decode(public_key_text.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def make_ca(directory: Path, name: str, years: int = 10) -> dict[str, Path]:
    """The consortium's CA: an EC P-384 key (``ca.key``, 0600) and a self-signed certificate (``ca.pem``)
    valid for ``years`` years, allowed to sign end-entity certificates only (path length 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = _now()
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} consortium CA (mmn-fed)")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=365 * years + years // 4))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "ca_key": directory / "ca.key"}
    paths["ca"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["ca_key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


def _san(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([host, "127.0.0.1", "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_server_cert(ca_dir: Path, directory: Path, host: str, years: int = 2) -> dict[str, Path]:
    """The SuperLink's certificate for ``host`` (SAN: IP or DNS name, plus 127.0.0.1 and localhost), signed
    by the CA in ``ca_dir``; ``server.pem`` and ``server.key`` (0600) in ``directory``."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    now = _now()
    key = ec.generate_private_key(ec.SECP384R1())
    not_after = min(now + _dt.timedelta(days=365 * years), ca.not_valid_after_utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(_san(host)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"cert": directory / "server.pem", "key": directory / "server.key"}
    directory.mkdir(parents=True, exist_ok=True)
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


# ---- the consortium file --------------------------------------------------------------------

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmn-fed")
    except PackageNotFoundError:
        return "unknown"


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); a clear error otherwise."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", address.strip())
    if not m:
        raise ConsortiumError(f"address '{address}' is not HOST:PORT (e.g. coordinator.example.org:{DEFAULT_PORT})")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 < int(port) < 65536:
        raise ConsortiumError(f"address '{address}': port {port} is out of range")
    return host, int(port)


def check_name(name: str, what: str = "site name") -> str:
    if not NAME_RE.match(name or ""):
        raise ConsortiumError(f"{what} '{name}' is not valid: letters, digits, '.', '_', '-' (up to 64, not "
                              "starting with a punctuation mark)")
    return name


@dataclass
class Consortium:
    """A consortium directory and its ``consortium.toml`` (read with ``Consortium.open``)."""

    directory: Path
    data: dict

    @classmethod
    def open(cls, directory: Path | str) -> "Consortium":
        directory = Path(directory).resolve()
        path = directory / FILE
        if not path.is_file():
            raise ConsortiumError(f"{directory} is not a consortium directory (no {FILE}; create one with "
                                  f"`mmn-fed consortium init {directory}`)")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConsortiumError(f"{path}: {e}") from e
        data.setdefault("sites", [])
        return cls(directory, data)

    def save(self) -> None:
        import tomli_w

        tmp = self.directory / (FILE + ".tmp")
        tmp.write_text(HEADER + tomli_w.dumps(self.data))
        tmp.replace(self.directory / FILE)

    # paths
    @property
    def ca(self) -> Path:
        return self.directory / "ca" / "ca.pem"

    @property
    def home(self) -> Path:
        return self.directory / "flwr_home"

    @property
    def address(self) -> str:
        return self.data["address"]

    @property
    def port(self) -> int:
        return int(self.data["ports"]["superlink"])

    def site(self, name: str) -> dict:
        for s in self.data["sites"]:
            if s["name"] == name:
                return s
        known = ", ".join(s["name"] for s in self.data["sites"]) or "none yet"
        raise ConsortiumError(f"no site '{name}' in consortium '{self.data['name']}' (sites: {known}); add it with "
                              f"`mmn-fed consortium add-site {self.directory} {name}`")

    def enrolled(self) -> list[dict]:
        return [s for s in self.data["sites"] if s.get("status") == "enrolled"]

    def superlink_command(self) -> list[str]:
        """``flower-superlink`` with TLS and SuperNode authentication, always (no flag turns them off)."""
        link = self.data["superlink"]
        d = self.directory
        return [flower_bin("flower-superlink"), "--host", str(link["host"]), "--port", str(self.port),
                "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(d / "superlink" / "server.pem"),
                "--ssl-keyfile", str(d / "superlink" / "server.key"), "--enable-supernode-auth",
                "--database", str(d / link["database"]), "--disable-runtime-dependency-installation"]


HEADER = ("# mmn-fed consortium file (written by `mmn-fed consortium ...`; docs/federation.md, "
          "\"A consortium: provisioning\")\n")


def init(directory: Path | str, address: str = f"127.0.0.1:{DEFAULT_PORT}", name: str | None = None,
         listen_host: str = "0.0.0.0", ca_years: int = 10, cert_years: int = 2) -> Consortium:
    """Create a consortium directory: CA, the SuperLink's certificate for ``address``, SuperLink settings,
    the ``flwr`` connection, and ``consortium.toml``. Refuses a directory that already holds one."""
    directory = Path(directory).resolve()
    if (directory / FILE).exists():
        raise ConsortiumError(f"{directory} already holds a consortium ({FILE}); pick another directory")
    host, port = split_address(address)
    name = check_name(name or directory.name, "consortium name")
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory / "ca", name, years=ca_years)
    make_server_cert(directory / "ca", directory / "superlink", host, years=cert_years)
    for sub in ("sites", "kits", "state", "logs", "runs"):
        (directory / sub).mkdir(exist_ok=True)
    con = Consortium(directory, {
        "name": name, "address": f"{address.strip()}", "mmn-fed-version": _version(),
        "created": _now().replace(microsecond=0).isoformat(),
        "ca-fingerprint": fingerprint(ca["ca"].read_bytes()),
        "ports": {"superlink": port, "supernode": SUPERNODE_PORT},
        "superlink": {"host": listen_host, "database": "state/superlink.db", "connection": CONNECTION},
        "sites": []})
    con.save()
    write_connection(con)
    return con


def write_connection(con: Consortium) -> Path:
    """``flwr_home/config.toml``: the coordinator's ``flwr`` CLI talks to its own SuperLink on 127.0.0.1
    (in the certificate's SAN) with the consortium's CA."""
    con.home.mkdir(parents=True, exist_ok=True)
    path = con.home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                    f'address = "127.0.0.1:{con.port}"\nroot-certificates = "{con.ca}"\n')
    return path


# ---- sites: kits, keys, enrolment -----------------------------------------------------------

def add_site(directory: Path | str, name: str) -> Path:
    """A startup kit for site ``name`` in ``DIR/kits/NAME``: the CA certificate, ``site.toml`` (consortium,
    SuperLink address, CA fingerprint, node config template) and ``START.txt`` (the commands). No private key:
    the site generates its own."""
    con = Consortium.open(directory)
    check_name(name)
    if any(s["name"] == name for s in con.data["sites"]):
        raise ConsortiumError(f"site '{name}' is already in consortium '{con.data['name']}'")
    kit = con.directory / "kits" / name
    kit.mkdir(parents=True, exist_ok=True)
    (kit / "ca.pem").write_bytes(con.ca.read_bytes())
    (kit / KIT_FILE).write_text(kit_toml(con, name))
    (kit / "START.txt").write_text(start_text(con, name))
    con.data["sites"].append({"name": name, "status": "invited", "added": _now().replace(microsecond=0).isoformat()})
    con.save()
    return kit


def kit_toml(con: Consortium, name: str) -> str:
    return f"""# Startup kit of site "{name}" in consortium "{con.data['name']}" (mmn-fed {con.data['mmn-fed-version']}).
# Fill in [node-config] data-path (or pass --data to `mmn-fed site start`). The private key is generated at
# the site (keys/site.key); only keys/site.key.pub goes back to the coordinator.
consortium = {json.dumps(con.data['name'])}
site = {json.dumps(name)}
superlink = {json.dumps(con.address)}
ca-fingerprint = {json.dumps(con.data['ca-fingerprint'])}
mmn-fed-version = {json.dumps(con.data['mmn-fed-version'])}
# the SuperNode's local Runtime API port (only this machine uses it; change it if it is taken)
supernode-port = {con.data['ports'].get('supernode', SUPERNODE_PORT)}

[node-config]
# read by the ClientApp (clients/site.py): a CSV in the training format, and the site's name in the federation
site-name = {json.dumps(name)}
data-path = ""
# optional: the consortium's schema (TOML); `mmn-fed site start` checks the data file against it first
schema = ""
# optional: this hospital's own policy file (docs/federation.md, "Site policy"); no run config overrides it
policy = ""
"""


def start_text(con: Consortium, name: str) -> str:
    return f"""Site "{name}" in consortium "{con.data['name']}" (SuperLink {con.address})

1. Install mmn-fed {con.data['mmn-fed-version']} with the federation extra (pip install "mmn-fed[federation]").
2. Generate this site's key pair (the private key never leaves this machine):
       mmn-fed site keygen KIT
   and send KIT/keys/site.key.pub to the coordinator, who runs:
       mmn-fed consortium enrol CONSORTIUM_DIR {name} site.key.pub
3. Check that ca.pem is the consortium's CA: its fingerprint is {con.data['ca-fingerprint']}
   (`mmn-fed site start` checks it against site.toml).
4. Start the site (foreground; Ctrl-C stops it):
       mmn-fed site start KIT --data /path/to/cohort.csv
   (KIT is this directory.) The CSV stays here; only summaries, module weights, counts and metrics leave.
"""


def read_public_key(path: Path | str) -> str:
    """The one-line OpenSSH public key in file ``path``, checked to be an EC key on a NIST curve (PEM public
    keys are converted). A ``ConsortiumError`` saying why otherwise."""
    p = Path(str(path))
    if not p.is_file():
        raise ConsortiumError(f"public key file {p} not found")
    if p.stat().st_size > 16384:
        raise ConsortiumError(f"{p} is not a public key (larger than 16 KiB)")
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        raise ConsortiumError(f"{p} is a PRIVATE key: never send it; send the .pub file (keys/site.key.pub)")
    try:
        key = (serialization.load_pem_public_key(data) if data.startswith(b"-----")
               else serialization.load_ssh_public_key(data.strip()))
    except Exception as e:  # ValueError, UnsupportedAlgorithm, ...: anything but a public key
        raise ConsortiumError(f"refused public key {p}: not an OpenSSH or PEM public key ({e}); send the "
                              "site's keys/site.key.pub") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        what = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise ConsortiumError(f"refused public key {p}: a {what} key; SuperNode authentication needs an EC key on "
                              "a NIST curve (P-256/P-384/P-521; `mmn-fed site keygen` makes P-384)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def enrol_site(directory: Path | str, name: str, public_key: Path | str, *, timeout: float = 60) -> dict:
    """Record site ``name``'s public key (``DIR/sites/NAME.pub``, status ``enrolled``); if the coordinator is
    running, register it with the SuperLink right away. Refuses an unknown site, a malformed or non-EC key,
    and a key already enrolled for another site."""
    con = Consortium.open(directory)
    site = con.site(name)
    text = read_public_key(public_key)
    fp = key_fingerprint(text)
    for other in con.data["sites"]:
        if other["name"] != name and other.get("key-fingerprint") == fp and other.get("status") == "enrolled":
            raise ConsortiumError(f"this key ({fp}) is already enrolled for site '{other['name']}'")
    if site.get("status") == "enrolled" and site.get("key-fingerprint") != fp:
        raise ConsortiumError(f"site '{name}' is enrolled with another key ({site['key-fingerprint']}); revoke it "
                              f"first (`mmn-fed consortium revoke {con.directory} {name}`)")
    (con.directory / "sites" / f"{name}.pub").write_text(text + "\n")
    site.update({"status": "enrolled", "public-key": text, "key-fingerprint": fp,
                 "enrolled": _now().replace(microsecond=0).isoformat()})
    site.pop("revoked", None)
    con.save()
    if superlink_listening(con):
        sync(con, timeout=timeout)
    return Consortium.open(con.directory).site(name)


def revoke_site(directory: Path | str, name: str, *, timeout: float = 60) -> dict:
    """Mark site ``name`` revoked; if the coordinator is running, unregister its key now (else at its next start)."""
    con = Consortium.open(directory)
    site = con.site(name)
    if site.get("status") != "enrolled":
        raise ConsortiumError(f"site '{name}' is not enrolled (status: {site.get('status')})")
    site.update({"status": "revoked", "revoked": _now().replace(microsecond=0).isoformat()})
    (con.directory / "sites" / f"{name}.pub").unlink(missing_ok=True)
    con.save()
    if superlink_listening(con):
        sync(con, timeout=timeout)
    return Consortium.open(con.directory).site(name)


# ---- the SuperLink's registered keys follow the consortium file ------------------------------

def superlink_listening(con: Consortium) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", con.port)) == 0


def _flwr(con: Consortium, args: list[str], timeout: float) -> dict:
    res = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], env=flower_env(con.home),
                         capture_output=True, text=True, timeout=timeout, cwd=con.directory)
    try:
        out = json.loads(res.stdout)
    except json.JSONDecodeError:
        out = {"success": False, "error-message": (res.stdout + res.stderr)[-2000:]}
    if res.returncode != 0 or not out.get("success", False):
        raise ConsortiumError(f"flwr {' '.join(args)} failed: {out.get('error-message', out)}")
    return out


def sync(con: Consortium, timeout: float = 60) -> list[str]:
    """Make the running SuperLink's registered keys match the consortium file: register every enrolled site
    not registered yet (recording its node id), unregister every revoked site still registered. Returns what
    it did, one line each."""
    con = Consortium.open(con.directory)  # the newest file (enrol/revoke may have written it)
    listed = _flwr(con, ["supernode", "list", CONNECTION], timeout).get("nodes", [])
    active = {int(n["node-id"]) for n in listed if n.get("status") not in ("unregistered",)}
    done = []
    for s in con.data["sites"]:
        nid = s.get("node-id")
        if s.get("status") == "enrolled" and (nid is None or int(nid) not in active):
            pub = con.directory / "sites" / f"{s['name']}.pub"
            out = _flwr(con, ["supernode", "register", str(pub), CONNECTION, "--name", s["name"]], timeout)
            s["node-id"] = int(out["node-id"])
            done.append(f"registered {s['name']} (node {s['node-id']})")
        elif s.get("status") == "revoked" and nid is not None and int(nid) in active:
            _flwr(con, ["supernode", "unregister", str(int(nid)), CONNECTION], timeout)
            done.append(f"unregistered {s['name']} (node {nid})")
    if done:
        con.save()
    return done


def coordinator_start(directory: Path | str, wait: float = 60) -> int:
    """Run the consortium's SuperLink in the foreground (TLS and SuperNode authentication always on); once it
    listens, register the enrolled sites' keys and unregister revoked ones. SIGINT/SIGTERM stop it."""
    con = Consortium.open(directory)
    if superlink_listening(con):
        raise ConsortiumError(f"port {con.port} is already in use on this machine (another coordinator?)")
    (con.directory / "logs").mkdir(exist_ok=True)
    write_connection(con)

    def after(proc):
        end = time.monotonic() + wait
        while not superlink_listening(con):
            if proc.poll() is not None:
                raise ConsortiumError(f"flower-superlink exited with code {proc.returncode}")
            if time.monotonic() > end:
                raise ConsortiumError(f"flower-superlink did not listen on port {con.port} within {wait:.0f} s")
            time.sleep(0.2)
        for line in sync(con):
            print(f"coordinator: {line}", flush=True)
        n = len(Consortium.open(con.directory).enrolled())
        print(f"coordinator: SuperLink of '{con.data['name']}' on {con.address} (TLS, SuperNode authentication; "
              f"{n} enrolled site(s)); Ctrl-C stops it", flush=True)

    print(f"coordinator: starting {' '.join(con.superlink_command())}", flush=True)
    return foreground(con.superlink_command(), flower_env(con.home), con.directory, after_start=after)


# ---- a federation on the consortium ---------------------------------------------------------

def run(directory: Path | str, run_config: Mapping[str, object], timeout: float = 24 * 3600,
        echo: bool = True) -> dict:
    """``flwr run`` of the mmn-fed Flower App on the consortium's SuperLink (the coordinator must be running),
    streaming its log; returns {run_id, run_dir, model, log}. ``min-nodes`` defaults to the enrolled sites,
    ``run-dir`` to DIR/runs/<UTC time>."""
    con = Consortium.open(directory)
    if not superlink_listening(con):
        raise ConsortiumError(f"no SuperLink on port {con.port}: start it with `mmn-fed coordinator start "
                              f"{con.directory}`")
    rc = dict(run_config)
    rc.setdefault("min-nodes", max(1, len(con.enrolled())))
    if not rc.get("run-dir"):
        rc["run-dir"] = str(con.directory / "runs" / _now().strftime("%Y%m%dT%H%M%SZ"))
    rc["run-dir"] = str(Path(str(rc["run-dir"])).resolve())  # the ServerApp resolves against the SuperLink's cwd
    if rc.get("schema"):
        rc["schema"] = str(Path(str(rc["schema"])).resolve())
    log_path = con.directory / "logs" / f"run-{Path(rc['run-dir']).name}.log"
    cmd = [flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", toml_config(rc)]
    run_id = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=flower_env(con.home), cwd=con.directory, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        end = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo:
                print(line, end="", flush=True)
            m = re.search(r"[Ss]uccessfully started run (\d+)", line)
            if m and run_id is None:
                run_id = int(m.group(1))
                print(f"run: run id {run_id}; the model lands in {rc['run-dir']}/model.pt", flush=True)
            if time.monotonic() > end:
                proc.kill()
                raise ConsortiumError(f"the run took longer than {timeout:.0f} s; see {log_path}")
        proc.wait()
    text = log_path.read_text()
    if proc.returncode != 0 or "raised an exception" in text or "Exit Code:" in text:  # `flwr run` exits 0 regardless
        raise ConsortiumError(f"the run failed; see {log_path}:\n{text[-3000:]}")
    model = Path(rc["run-dir"]) / "model.pt"
    return {"run_id": run_id, "run_dir": rc["run-dir"], "model": str(model) if model.exists() else None,
            "log": str(log_path)}


# ---- CLI: mmn-fed consortium | coordinator | site | run --------------------------------------

def _status(con: Consortium) -> str:
    rows = [f"consortium '{con.data['name']}' at {con.address} (CA {con.data['ca-fingerprint'][:23]}...)"]
    for s in con.data["sites"]:
        rows.append(f"  {s['name']:<20} {s.get('status', '?'):<9} {s.get('key-fingerprint', '')}"
                    f"{'  node ' + str(s['node-id']) if s.get('node-id') is not None else ''}")
    return "\n".join(rows)


def _cmd_init(a) -> int:
    con = init(a.directory, a.address, a.name, listen_host=a.listen_host, ca_years=a.ca_years)
    print(f"consortium '{con.data['name']}' in {con.directory}: CA {con.data['ca-fingerprint']} (valid "
          f"{a.ca_years} years; ca/ca.key stays here), SuperLink certificate for {con.address}\n"
          f"next: mmn-fed consortium add-site {con.directory} NAME   (one per site)")
    return 0


def _cmd_add_site(a) -> int:
    kit = add_site(a.directory, a.name)
    print(f"startup kit for '{a.name}': {kit} (send the whole directory; it holds no private key)")
    return 0


def _cmd_enrol(a) -> int:
    s = enrol_site(a.directory, a.name, a.public_key)
    print(f"enrolled '{a.name}' ({s['key-fingerprint']})" + (f", node {s['node-id']}" if s.get("node-id") else
                                                           " (registered with the SuperLink when it starts)"))
    return 0


def _cmd_revoke(a) -> int:
    revoke_site(a.directory, a.name)
    print(f"revoked '{a.name}'")
    return 0


def _cmd_run(a) -> int:
    from mmn_fed.settings import RunSettings

    settings = RunSettings.from_args(a, _run_flags(), run_dir=a.out or "")
    settings.check()
    rc = {k: v for k, v in settings.to_run_config().items() if k in _run_flags() or k == "run-dir"}
    if a.min_nodes:
        rc["min-nodes"] = a.min_nodes
    res = run(a.directory, rc, timeout=a.run_timeout)
    print(json.dumps(res, indent=1))
    return 0


def register(subparsers) -> None:
    """``mmn-fed consortium {init,add-site,enrol,revoke,status}``, ``mmn-fed coordinator start``, ``mmn-fed run``
    (the site's ``mmn-fed site keygen | start`` are in clients/kit.py)."""
    from mmn_fed.settings import add_flags

    p = subparsers.add_parser("consortium", help="provision a consortium: CA, SuperLink certificate, site kits, "
                                                 "enrolment (docs/federation.md)")
    sub = p.add_subparsers(dest="action", required=True)
    q = sub.add_parser("init", help="create a consortium directory (CA, SuperLink certificate, consortium.toml)")
    q.add_argument("directory")
    q.add_argument("--address", default=f"127.0.0.1:{DEFAULT_PORT}",
                   help="HOST:PORT the sites reach the SuperLink at (the certificate is for HOST)")
    q.add_argument("--name", help="consortium name (default: the directory's name)")
    q.add_argument("--listen-host", default="0.0.0.0", help="interface the SuperLink listens on")
    q.add_argument("--ca-years", type=int, default=10, help="validity of the CA certificate")
    q.set_defaults(func=_cmd_init)
    q = sub.add_parser("add-site", help="write a startup kit for a site (no private key in it)")
    q.add_argument("directory")
    q.add_argument("name")
    q.set_defaults(func=_cmd_add_site)
    q = sub.add_parser("enrol", help="record a site's public key (and register it if the coordinator runs)")
    q.add_argument("directory")
    q.add_argument("name")
    q.add_argument("public_key", help="the site's keys/site.key.pub")
    q.set_defaults(func=_cmd_enrol)
    q = sub.add_parser("revoke", help="revoke a site (unregistered now if the coordinator runs, else at its start)")
    q.add_argument("directory")
    q.add_argument("name")
    q.set_defaults(func=_cmd_revoke)
    q = sub.add_parser("status", help="the consortium's sites and their status")
    q.add_argument("directory")
    q.set_defaults(func=lambda a: print(_status(Consortium.open(a.directory))) or 0)

    p = subparsers.add_parser("coordinator", help="run the consortium's SuperLink (TLS + SuperNode auth), foreground")
    sub = p.add_subparsers(dest="action", required=True)
    q = sub.add_parser("start", help="start the SuperLink; Ctrl-C / SIGTERM stop it and its children")
    q.add_argument("directory")
    q.set_defaults(func=lambda a: coordinator_start(a.directory))

    p = subparsers.add_parser("run", help="start a federation on a consortium (flwr run); prints the run id and "
                                          "where the model lands", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("directory", help="the consortium directory (its coordinator must be running)")
    p.add_argument("--out", help="run directory (default: DIR/runs/<UTC time>)")
    p.add_argument("--min-nodes", type=int, default=0, help="sites to wait for (0: every enrolled site)")
    p.add_argument("--run-timeout", type=float, default=24 * 3600, help="seconds before `flwr run` is given up")
    add_flags(p, _run_flags(), aliases={"num-server-rounds": "--rounds"})
    p.set_defaults(func=_cmd_run)


def main(argv: list[str] | None = None) -> int:
    """``python -m server.consortium {consortium,coordinator,run} ...`` (the same commands as ``mmn-fed``)."""
    parser = argparse.ArgumentParser(prog="python -m server.consortium", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # ConsortiumError is a ValueError (mmn_fed.cli reports those too)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
