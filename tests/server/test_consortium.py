"""A consortium: provisioning, site kits and enrolment (server/consortium.py), the site's side (clients/kit.py),
and (slow) a federation from `init` to a trained model over three SuperNodes on loopback."""
import datetime as dt
import ipaddress
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from clients.kit import KitError, keygen as site_keygen, start as site_start, supernode_command
from server.consortium import Consortium, ConsortiumError, add_site, enrol_site, fingerprint, init, main, revoke_site
from server.processes import descendants, free_port

REPO = Path(__file__).resolve().parents[2]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def con(tmp_path):
    return init(tmp_path / "c", address=f"127.0.0.1:{free_port()}", name="demo")


def test_init_writes_a_long_lived_ca_a_server_certificate_and_the_consortium_file(con):
    d = con.directory
    assert _mode(d / "ca" / "ca.key") == 0o600 and _mode(d / "superlink" / "server.key") == 0o600
    ca = x509.load_pem_x509_certificate((d / "ca" / "ca.pem").read_bytes())
    assert ca.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=365 * 9)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    server = x509.load_pem_x509_certificate((d / "superlink" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    data = tomllib.loads((d / "consortium.toml").read_text())
    host, port = data["address"].split(":")
    assert data["name"] == "demo" and host == "127.0.0.1" and data["ports"]["superlink"] == int(port)
    assert data["ca-fingerprint"] == fingerprint((d / "ca" / "ca.pem").read_bytes())
    assert data["mmn-fed-version"] and data["sites"] == []
    assert data["superlink"]["database"] == "state/superlink.db"
    conn = tomllib.loads((d / "flwr_home" / "config.toml").read_text())["superlink"]["consortium"]
    assert conn["root-certificates"] == str(d / "ca" / "ca.pem") and conn["address"].endswith(port)
    # the SuperLink always runs with TLS and SuperNode authentication
    cmd = con.superlink_command()
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(d / "ca" / "ca.pem")
    assert "--disable-runtime-dependency-installation" in cmd


def test_init_names_a_dns_address_in_the_certificate_and_refuses_bad_input(tmp_path):
    c = init(tmp_path / "dns", address="coordinator.example.org:9091")
    server = x509.load_pem_x509_certificate((c.directory / "superlink" / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in san.get_values_for_type(x509.DNSName)
    assert c.data["name"] == "dns"
    with pytest.raises(ConsortiumError, match="already holds a consortium"):
        init(tmp_path / "dns")
    with pytest.raises(ConsortiumError, match="not HOST:PORT"):
        init(tmp_path / "bad", address="no-port")
    with pytest.raises(ConsortiumError, match="not a consortium directory"):
        Consortium.open(tmp_path / "nothing")


def test_a_startup_kit_holds_the_ca_address_and_template_but_no_private_key(con):
    kit = add_site(con.directory, "Geneva")
    assert sorted(p.name for p in kit.iterdir()) == ["START.txt", "ca.pem", "site.toml"]
    assert (kit / "ca.pem").read_bytes() == (con.directory / "ca" / "ca.pem").read_bytes()
    for p in kit.rglob("*"):
        assert b"PRIVATE KEY" not in p.read_bytes(), p
    cfg = tomllib.loads((kit / "site.toml").read_text())
    assert cfg["site"] == "Geneva" and cfg["superlink"] == con.address
    assert cfg["ca-fingerprint"] == con.data["ca-fingerprint"]
    assert set(cfg["node-config"]) == {"site-name", "data-path", "schema", "policy"}
    assert "mmn-fed site start" in (kit / "START.txt").read_text()
    assert Consortium.open(con.directory).site("Geneva")["status"] == "invited"
    with pytest.raises(ConsortiumError, match="already in consortium"):
        add_site(con.directory, "Geneva")
    with pytest.raises(ConsortiumError, match="not valid"):
        add_site(con.directory, "../escape")


def test_site_keygen_then_enrol_records_only_the_public_key(con):
    kit = add_site(con.directory, "Geneva")
    priv, pub = site_keygen(kit)
    assert _mode(priv) == 0o600 and pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(KitError, match="exists already"):
        site_keygen(kit)
    site = enrol_site(con.directory, "Geneva", pub)
    assert site["status"] == "enrolled" and site["public-key"] == pub.read_text().strip()
    assert site["key-fingerprint"].startswith("SHA256:") and "node-id" not in site  # the SuperLink is not running
    assert (con.directory / "sites" / "Geneva.pub").read_text().strip() == pub.read_text().strip()
    for p in con.directory.rglob("*"):  # the coordinator's directory holds no site private key ...
        if p.is_file() and "kits" not in p.parts and p.name not in ("ca.key", "server.key"):
            assert b"PRIVATE KEY" not in p.read_bytes(), p
    # ... and the consortium file names the site with its key
    data = tomllib.loads((con.directory / "consortium.toml").read_text())
    assert [(s["name"], s["status"]) for s in data["sites"]] == [("Geneva", "enrolled")]


def test_enrol_refuses_unknown_sites_and_anything_but_an_ec_public_key(con, tmp_path):
    kit = add_site(con.directory, "Geneva")
    add_site(con.directory, "Bern")
    priv, pub = site_keygen(kit)
    with pytest.raises(ConsortiumError, match="no site 'Lausanne'.*add-site"):
        enrol_site(con.directory, "Lausanne", pub)
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key at all\n")
    with pytest.raises(ConsortiumError, match="not an OpenSSH or PEM public key"):
        enrol_site(con.directory, "Bern", junk)
    with pytest.raises(ConsortiumError, match="PRIVATE key"):
        enrol_site(con.directory, "Bern", priv)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    ed = tmp_path / "ed.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ConsortiumError, match="EC key on a NIST curve"):
        enrol_site(con.directory, "Bern", ed)
    with pytest.raises(ConsortiumError, match="not found"):
        enrol_site(con.directory, "Bern", tmp_path / "missing.pub")
    enrol_site(con.directory, "Geneva", pub)
    with pytest.raises(ConsortiumError, match="already enrolled for site 'Geneva'"):
        enrol_site(con.directory, "Bern", pub)
    assert Consortium.open(con.directory).site("Bern")["status"] == "invited"
    # the command line says so in one line, exit 2
    assert main(["consortium", "enrol", str(con.directory), "Bern", str(junk)]) == 2


def test_revoke_marks_the_site_and_removes_its_authorized_key(con):
    kit = add_site(con.directory, "Geneva")
    _, pub = site_keygen(kit)
    with pytest.raises(ConsortiumError, match="not enrolled"):
        revoke_site(con.directory, "Geneva")
    enrol_site(con.directory, "Geneva", pub)
    site = revoke_site(con.directory, "Geneva")
    assert site["status"] == "revoked" and not (con.directory / "sites" / "Geneva.pub").exists()
    assert Consortium.open(con.directory).enrolled() == []
    enrol_site(con.directory, "Geneva", pub)  # enrolled again (e.g. after a mistake)
    assert Consortium.open(con.directory).site("Geneva")["status"] == "enrolled"


def test_site_start_uses_the_kit_and_refuses_a_foreign_ca_or_missing_data(con, tmp_path):
    kit = add_site(con.directory, "Geneva")
    data = tmp_path / "cohort.csv"
    data.write_text("age\n1\n")
    cfg = tomllib.loads((kit / "site.toml").read_text())
    cmd = supernode_command(kit, cfg, str(data), 12345)
    assert cmd[cmd.index("--superlink") + 1] == con.address
    assert cmd[cmd.index("--root-certificates") + 1] == str(kit / "ca.pem")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(kit / "keys" / "site.key")
    assert cmd[cmd.index("--node-config") + 1] == f'site-name="Geneva" data-path="{data}"'
    assert "--insecure" not in cmd
    with pytest.raises(KitError, match="no data file"):
        site_start(kit)
    with pytest.raises(KitError, match="not found"):
        site_start(kit, data=str(tmp_path / "missing.csv"))
    other = init(tmp_path / "other", address="127.0.0.1:9")
    (kit / "ca.pem").write_bytes((other.directory / "ca" / "ca.pem").read_bytes())
    with pytest.raises(KitError, match="not the consortium's CA"):
        site_start(kit, data=str(data))
    assert not (kit / "keys").exists()  # nothing was generated or started


def test_run_takes_the_settings_deploy_local_takes():
    from server.consortium import _run_flags
    from server.engines.deployment import DEPLOY_FLAGS

    assert _run_flags() == DEPLOY_FLAGS


# ---- end to end on loopback: init -> kits -> keys -> enrol -> coordinator -> 3 sites -> run -> model ---------

def _cli(*args) -> list[str]:
    """The coordinator's commands (server/consortium.py) or, for `site ...`, the site's (clients/kit.py)."""
    if args[0] == "site":
        return [sys.executable, "-m", "clients.kit", *map(str, args[1:])]
    return [sys.executable, "-m", "server.consortium", *map(str, args)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile
        return b""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
def test_a_consortium_from_init_to_a_trained_model_over_three_sites(heart_sites, tmp_path):
    from server.consortium import _flwr, run

    from mmn_fed.processes import MARK, marked

    mark = uuid.uuid4().hex  # inherited by every process the test's commands start, reparented or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), MARK: mark}
    sites, _ = heart_sites
    names = ["Cleveland", "Hungary", "Switzerland"]
    d = tmp_path / "consortium"
    assert subprocess.run(_cli("consortium", "init", d, "--address", f"127.0.0.1:{free_port()}", "--name", "e2e",
                               "--listen-host", "127.0.0.1"), env=env).returncode == 0
    for n in names:
        subprocess.run(_cli("consortium", "add-site", d, n), env=env, check=True)
        sites[n].iloc[:60].to_csv(tmp_path / f"{n}.csv", index=False)
    # the sites make their keys; only the public halves come back
    for n in names:
        subprocess.run(_cli("site", "keygen", d / "kits" / n), env=env, check=True)
        subprocess.run(_cli("consortium", "enrol", d, n, d / "kits" / n / "keys" / "site.key.pub"), env=env,
                       check=True)
    procs: dict[str, subprocess.Popen] = {}
    tree: set[int] = set()
    try:
        procs["coordinator"] = subprocess.Popen(_cli("coordinator", "start", d), env=env, stdout=open(
            tmp_path / "coordinator.log", "w"), stderr=subprocess.STDOUT)
        con = Consortium.open(d)
        end = time.monotonic() + 120
        while len([s for s in Consortium.open(d).enrolled() if s.get("node-id")]) < 3:
            assert procs["coordinator"].poll() is None, (tmp_path / "coordinator.log").read_text()
            assert time.monotonic() < end, (tmp_path / "coordinator.log").read_text()
            time.sleep(0.5)
        # site policies (the hospitals' own files): Cleveland's lets the run through, Switzerland's refuses this
        # server's version, so Switzerland is excluded by name while the others federate
        policies = {"Cleveland": 'min_cell = 10\nmax_rounds = 5\naccepted_versions = ["*"]\n',
                    "Switzerland": 'accepted_versions = ["9.*"]\n'}
        for n, text in policies.items():
            (tmp_path / f"{n}.policy.toml").write_text(text)
            kit = d / "kits" / n / "site.toml"
            kit.write_text(kit.read_text().replace('policy = ""', f'policy = "{tmp_path / f"{n}.policy.toml"}"'))
        for n in names:
            procs[n] = subprocess.Popen(_cli("site", "start", d / "kits" / n, "--data", tmp_path / f"{n}.csv",
                                             "--port", free_port()), env=env,
                                        stdout=open(tmp_path / f"{n}.log", "w"), stderr=subprocess.STDOUT)
        res = run(d, {"num-server-rounds": 1, "local-epochs": 1, "state-size": 8, "hidden": 8, "tasks": "disease",
                      "dataset": "heart", "val-fraction": 0.0, "keep-best": False, "patience-rounds": 0,
                      "run-dir": str(tmp_path / "run")}, timeout=900, echo=False)
        assert res["run_id"] and res["model"] == str(tmp_path / "run" / "model.pt")
        import json

        history = json.loads((tmp_path / "run" / "history.json").read_text())
        assert [h["round"] for h in history] == [1]
        assert {"train_loss/Cleveland", "train_loss/Hungary"} <= set(history[0]["train"])
        assert "train_loss/Switzerland" not in history[0]["train"]
        excluded = json.loads((tmp_path / "run" / "excluded.json").read_text())
        assert "Switzerland" in json.dumps(excluded) and "site policy" in json.dumps(excluded)
        # every site kept a hash-chained audit log beside its data, which verifies; an edited line does not
        from clients.audit import verify

        for n in names:
            log = tmp_path / "mmn-fed-audit" / n / "audit.jsonl"
            verdict = verify(log)
            assert verdict.ok and verdict.count >= 2, (n, verdict)
        log = tmp_path / "mmn-fed-audit" / "Cleveland" / "audit.jsonl"
        lines = log.read_text().splitlines(keepends=True)
        lines[0] = lines[0].replace('"in"', '"out"', 1)
        log.write_text("".join(lines))
        assert not verify(log).ok
        from mmn_fed import load_model

        assert load_model(tmp_path / "run" / "model.pt") is not None
        # revoking a site while the coordinator runs unregisters it at once
        subprocess.run(_cli("consortium", "revoke", d, "Switzerland"), env=env, check=True)
        nodes = {int(n["node-id"]): n["status"] for n in _flwr(con, ["supernode", "list", "consortium"], 60)["nodes"]}
        assert nodes[Consortium.open(d).site("Switzerland")["node-id"]] == "unregistered"
        assert sum(s != "unregistered" for s in nodes.values()) == 2
        # each site that federated handled its messages in one worker (clients/worker.py); the refused site none
        assert len([p for p in marked(mark) if b"clients.worker" in _cmdline(p)]) == 2
    finally:
        for p in procs.values():
            tree.update(descendants(p.pid))
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    # SIGTERM stopped every process the coordinator and the sites had started
    time.sleep(1)
    assert not [p for p in tree if _running(p)]
    end = time.monotonic() + 10  # the site workers too (not descendants: they exit with their SuperNode's executor)
    while marked(mark) and time.monotonic() < end:
        time.sleep(0.3)
    assert not marked(mark)
    assert procs["coordinator"].returncode == 0
