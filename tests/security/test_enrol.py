"""Enrolment on a real SuperLink (TLS, --enable-supernode-auth, 127.0.0.1): an enrolled SuperNode comes
online, an unenrolled one is refused, a revoked one is refused from then on. Every process is stopped."""
import os
import subprocess
import time

import pytest

from server.enrol import EnrolmentError, check_public_key, enrol, list_sites, new_site_key, revoke


def test_only_ec_public_keys_are_accepted(tmp_path):
    priv, pub = new_site_key(tmp_path, "site")
    check_public_key(pub)
    assert oct(os.stat(priv).st_mode & 0o777) == "0o600"
    with pytest.raises(EnrolmentError, match="public key"):
        check_public_key(priv)  # the private half is not what an operator should be sent
    bad = tmp_path / "rsa.pub"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    bad.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(EnrolmentError, match="EC"):
        check_public_key(bad)


def _supernode(dep, priv, name):
    from server.processes import flower_bin, free_port

    log = open(dep.logs / f"{name}.log", "wb")
    p = subprocess.Popen([flower_bin("flower-supernode"), "--superlink", f"127.0.0.1:{dep.port}", "--port", str(free_port()),
                          "--root-certificates", str(dep.workdir / "credentials" / "tls" / "ca.pem"),
                          "--auth-supernode-private-key", str(priv), "--max-retries", "2"],
                         stdout=log, stderr=subprocess.STDOUT, env=dep.env, cwd=dep.workdir, start_new_session=True)
    dep.procs.append(p)  # LocalDeployment.stop() stops it and its descendants
    return p


def _status(dep, conn, node_id):
    return {int(n["node-id"]): n["status"] for n in list_sites(conn, dep.home)}.get(node_id)


@pytest.mark.slow
def test_enrolled_node_connects_unenrolled_and_revoked_nodes_are_refused(tmp_path):
    from server.engines.deployment import CONNECTION, LocalDeployment

    dep = LocalDeployment(tmp_path / "link", [], tls=True, auth=True)
    try:
        dep.start()
        keys = tmp_path / "keys"
        a_priv, a_pub = new_site_key(keys, "hospital-a")
        b_priv, _ = new_site_key(keys, "intruder")
        node_a = enrol(a_pub, CONNECTION, dep.home)
        assert _status(dep, CONNECTION, node_a) == "registered"
        a = _supernode(dep, a_priv, "a")
        intruder = _supernode(dep, b_priv, "intruder")
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (dep.logs / "intruder.log").read_text()
        end = time.monotonic() + 60
        while _status(dep, CONNECTION, node_a) != "online" and time.monotonic() < end:
            time.sleep(1)
        assert _status(dep, CONNECTION, node_a) == "online" and a.poll() is None

        revoke(node_a, CONNECTION, dep.home)
        assert _status(dep, CONNECTION, node_a) in (None, "unregistered")
        again = _supernode(dep, a_priv, "a-after-revoke")
        assert again.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in (dep.logs / "a-after-revoke.log").read_text()
    finally:
        dep.stop()
    assert dep.procs and not [p for p in dep.procs if _alive(p.pid)]
    assert not [pid for pid in getattr(dep, "stopped_pids", []) if _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
