"""`mmn-edge serve`: the JSON API against the Python runtime, its refusals, hot swap, trust and drift.
Every server listens on 127.0.0.1 (one test: ::1), port 0, in a thread, and is shut down by its fixture."""
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest

from edge_runtime import load_bundle
from edge_runtime.serve import ServeConfig, ServeError, Service, make_server
from edge_runtime.trust import UntrustedBundleError, key_id, load_public_key

PATIENTS = [
    {"age": 63, "sex": "Male", "cp": "typical angina", "trestbps": 145, "chol": 233},
    {"age": 41, "thalch": 172, "oldpeak": 1.4},
    {"sex": "Female"},
]


@contextmanager
def running(service, host="127.0.0.1", **cfg):
    server = make_server(service, ServeConfig(host=host, port=0, **cfg))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def call(server, path, body=None, token=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture()
def server(heart):
    with running(Service(heart.bundle, heart.public_key)) as s:
        yield s


def test_predictions_and_explanation_match_the_python_runtime(server, bundle):
    status, res = call(server, "/predict", {"patients": PATIENTS})
    assert status == 200
    assert res["model_id"] == bundle.manifest["model_id"] and res["release"] == 1
    ref = bundle.predict(PATIENTS, explain=True)
    assert [r["ok"] for r in res["results"]] == ref.ok.tolist()
    for i, r in enumerate(res["results"]):
        assert r["modalities"] == ref.used[i].split("+")
        np.testing.assert_allclose(r["predictions"]["disease"], ref.values["disease"][i], atol=1e-6)
        probs = [r["predictions"]["severity"][c] for c in ref.classes("severity")]
        np.testing.assert_allclose(probs, ref.values["severity"][i], atol=1e-6)
        steps = ["prior"] + [f"+{x}" for x in ref.used[i].split("+")]
        assert [s["step"] for s in r["explanation"]] == steps
        for s in r["explanation"]:
            k = [t.name for t in ref.trajectory].index(s["step"])
            np.testing.assert_allclose(s["disease"], ref.trajectory[k].values["disease"][i], atol=1e-6)
        assert r["explanation"][-1]["disease"] == pytest.approx(r["predictions"]["disease"], abs=1e-7)


def test_info_and_health_name_the_model_and_release(server, bundle):
    status, info = call(server, "/info")
    assert status == 200
    assert info["model_id"] == bundle.manifest["model_id"] and info["release"] == 1
    assert info["order"] == bundle.order and set(info["tasks"]) == {"disease", "severity"}
    assert set(info["columns"]) == set(bundle.schema.input_columns)
    assert call(server, "/health") == (200, {"status": "ok", "model_id": bundle.manifest["model_id"], "release": 1})


@pytest.mark.parametrize("body, status, field", [
    ({"patients": [{"age": 50, "colour": "red"}]}, 400, "patients[0].colour"),
    ({"patients": [{"age": 50}, {"age": "old"}]}, 400, "patients[1].age"),
    ({"patients": [{"age": [50]}]}, 400, "patients[0].age"),
    ({"patient": {"age": 50}, "explain": "yes"}, 400, "explain"),
    ({"rows": []}, 400, "rows"),
    ([1, 2], 400, None),
])
def test_bad_requests_get_4xx_naming_the_field(server, body, status, field):
    code, res = call(server, "/predict", body)
    assert code == status and res["field"] == field, res
    assert res["model_id"] and "error" in res


def test_bad_json_and_oversized_bodies_are_refused(heart):
    with running(Service(heart.bundle, heart.public_key), max_body=2000) as server:
        code, res = call(server, "/predict", raw=b'{"patients": [')
        assert code == 400 and res["field"] == "body" and "not valid JSON" in res["error"]
        code, res = call(server, "/predict", {"patients": PATIENTS * 40})
        assert code == 413 and res["field"] == "Content-Length"
        assert call(server, "/predict", {"patients": PATIENTS})[0] == 200


def test_saturated_service_answers_503(heart):
    with running(Service(heart.bundle, heart.public_key), max_concurrent=1) as server:
        server.slots.acquire()  # one request in flight
        try:
            assert call(server, "/predict", {"patient": PATIENTS[0]})[0] == 503
        finally:
            server.slots.release()
        assert call(server, "/predict", {"patient": PATIENTS[0]})[0] == 200


@pytest.mark.parametrize("cfg, missing", [
    ({}, "TLS (--tls-cert and --tls-key) and an access token"),
    ({"token": "x" * 32}, "without TLS"),
    ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "without an access token"),
])
def test_non_loopback_needs_tls_and_token(heart, cfg, missing):
    with pytest.raises(ServeError, match="not a loopback address") as e:
        make_server(Service(heart.bundle, heart.public_key), ServeConfig(host="0.0.0.0", port=0, **cfg))
    assert missing in str(e.value)


def test_cli_refuses_non_loopback_without_tls(heart, capsys):
    from edge_runtime.cli import main

    assert main(["serve", str(heart.bundle), "--trust-key", str(heart.public_key), "--host", "192.0.2.1"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_cli_request_timeout_must_be_positive(heart, capsys):
    from edge_runtime.cli import main

    assert main(["serve", str(heart.bundle), "--trust-key", str(heart.public_key), "--request-timeout", "0"]) == 2
    assert "--request-timeout must be" in capsys.readouterr().err


def test_token_guards_the_api(heart):
    token = "t" * 32
    with running(Service(heart.bundle, heart.public_key), token=token) as server:
        assert call(server, "/predict", {"patient": PATIENTS[0]})[0] == 401
        assert call(server, "/predict", {"patient": PATIENTS[0]}, token="wrong" * 8)[0] == 401
        assert call(server, "/info")[0] == 401
        assert call(server, "/predict", {"patient": PATIENTS[0]}, token=token)[0] == 200
        assert call(server, "/health")[0] == 200


def _export(heart, out, release, key=None):
    from mmn_fed.export import export_bundle

    return export_bundle(heart.model_path, out, sign_key=key or heart.private_key, force=True, release=release)


def test_hot_swap_and_release_refusal(heart, tmp_path):
    live = _export(heart, tmp_path / "live", release=2)
    token = "t" * 32
    with running(Service(live, heart.public_key), token=token) as server:
        assert call(server, "/health")[1]["release"] == 2
        _export(heart, live, release=3)
        code, res = call(server, "/admin/reload", {}, token=token)
        assert code == 200 and res["release"] == 3 and res["previous"]["release"] == 2
        assert call(server, "/predict", {"patient": PATIENTS[0]}, token=token)[1]["release"] == 3
        _export(heart, live, release=1)
        code, res = call(server, "/admin/reload", {}, token=token)
        assert code == 409 and "lower than the running release 3" in res["error"]
        assert call(server, "/health")[1]["release"] == 3  # the running model stays
        code, res = call(server, "/admin/reload", {"force": True}, token=token)
        assert code == 200 and res["release"] == 1
        assert call(server, "/admin/reload", {}, token=None)[0] == 401


def test_tampered_bundle_is_not_swapped_in(heart, tmp_path):
    live = _export(heart, tmp_path / "live", release=1)
    service = Service(live, heart.public_key)
    _export(heart, live, release=2)
    onnx = next(live.glob("encoders.*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(UntrustedBundleError, match="sha256|bytes"):
        service.reload()
    assert service.current.release == 1


def test_old_bundle_without_release_loads_as_release_0(heart, tmp_path):
    import json as _json

    from edge_runtime.trust import MANIFEST, canonical_json
    from mmn_fed.export import load_private_key, sign_bundle

    old = _export(heart, tmp_path / "old", release=1)
    m = _json.loads((old / MANIFEST).read_text())
    del m["release"]
    (old / MANIFEST).write_bytes(canonical_json(m))
    sign_bundle(old, load_private_key(heart.private_key))
    service = Service(old, heart.public_key)
    assert service.current.release == 0 and "treated as release 0" in service.current.notices[0]
    assert service.info()["notices"] == service.current.notices


def test_several_trusted_keys_and_revocation(heart, tmp_path):
    from mmn_fed.export import generate_keypair

    new_priv, new_pub = generate_keypair(tmp_path / "new-keys")
    keys = tmp_path / "trusted"
    keys.mkdir()
    shutil.copy(heart.public_key, keys / "old.pub")
    shutil.copy(new_pub, keys / "new.pub")
    rotated = _export(heart, tmp_path / "rotated", release=2, key=new_priv)
    assert Service(rotated, keys).current.bundle.signed_by == key_id(load_public_key(new_pub))
    assert Service(rotated, [heart.public_key, new_pub]).current.release == 2
    with pytest.raises(UntrustedBundleError, match="does not verify"):
        Service(rotated, heart.public_key)
    revoked = tmp_path / "revoked.txt"
    revoked.write_text(f"# compromised\n{key_id(load_public_key(heart.public_key))}\n")
    with pytest.raises(UntrustedBundleError, match="revoked"):
        Service(heart.bundle, keys, revocations=revoked)
    assert Service(rotated, keys, revocations=revoked).current.release == 2


def test_an_absurd_value_leaves_the_drift_statistics_and_info_working(server, bundle):
    """1e308 is a finite number, so it is predicted; it must not overflow the running sums into inf, which JSON
    cannot carry (/info answered nothing after it, until a reload)."""
    assert call(server, "/predict", {"patients": [{"age": 1e308}, {"age": 1e308}, {"age": 40}]})[0] == 200
    code, info = call(server, "/info")
    assert code == 200
    age = info["drift"]["numeric"]["age"]
    assert age["seen"] == 1 and age["mean"] == pytest.approx(40.0)  # the absurd values are left out
    # the statistics themselves, fed rows as if they had been predicted: the sum never overflows
    from edge_runtime.serve import InputStats

    stats = InputStats(bundle)
    stats.add(bundle, {"age": [1e308, 1e308, 40.0]}, np.ones(3, dtype=bool), ["demographics"] * 3)
    report = stats.report()
    json.dumps(report, allow_nan=False)  # JSON can carry it
    assert report["numeric"]["age"]["seen"] == 1 and report["numeric"]["age"]["mean"] == pytest.approx(40.0)


def test_drift_statistics_against_a_hand_computation(server, bundle):
    sent = [{"age": 70, "chol": 300}, {"age": 50, "sex": "Male"}, {"sex": "Female"}, {"age": "?"}]
    assert call(server, "/predict", {"patients": sent})[0] == 200
    drift = call(server, "/info")[1]["drift"]
    # rows predicted: the first three (the fourth has no value at all)
    assert drift["rows"] == 3
    mod = {x: bundle.schema.modality_of(c) for x, c in (("age", "age"), ("sex", "sex"), ("chol", "chol"))}
    for x in bundle.order:
        present = sum(any(bundle.schema.modality_of(c) == x for c in r if c in mod) for r in sent[:3])
        assert drift["missing"][x] == pytest.approx(1 - present / 3)
    st = bundle.preprocessor.columns["age"]
    age = drift["numeric"]["age"]
    assert age["seen"] == 2 and age["mean"] == pytest.approx(60.0)
    assert age["shift_sd"] == pytest.approx((60.0 - st["mean"]) / st["std"])
    assert age["z"] == pytest.approx((60.0 - st["mean"]) / st["std"] * np.sqrt(2))
    assert drift["numeric"]["chol"]["seen"] == 1 and drift["numeric"]["trestbps"]["seen"] == 0


def test_the_page_predicts_in_a_headless_browser(server, bundle, browser_page):
    """The form at / in a real Chromium (tablet viewport): fill two modalities, submit, read the probability
    and the explanation chart; both equal the Python runtime's for the same inputs."""
    page, errors = browser_page
    patient = {"age": 58, "sex": "Female", "chol": 250.5, "trestbps": 130}
    page.set_viewport_size({"width": 768, "height": 1024})
    page.goto(server.url + "/")
    sections = page.eval_on_selector_all("fieldset[data-modality]", "fs => fs.map(f => f.dataset.modality)")
    page.fill("input[data-column=age]", "58")
    page.select_option("select[data-column=sex]", "Female")
    page.fill("input[data-column=chol]", "250.5")
    page.fill("input[data-column=trestbps]", "130")
    page.click("#submit")
    page.wait_for_selector("#results [data-task=disease][data-value]")
    shown = float(page.get_attribute("#results div[data-task=disease]", "data-value"))
    steps = page.eval_on_selector_all("svg[data-task=disease] g.step",
                                      "gs => gs.map(g => [g.dataset.step, Number(g.dataset.value)])")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert not errors, errors
    assert sections == bundle.order
    assert width <= 768  # no horizontal scrolling on a tablet
    ref = bundle.predict([patient], explain=True)
    assert shown == pytest.approx(float(ref.values["disease"][0]), abs=1e-6)
    assert [s for s, _ in steps] == ["prior", "+demographics", "+rest"]  # the prior, then one step per modality
    for (name, v), step in zip(steps, [s for s in ref.trajectory if s.name in ("prior", "+demographics", "+rest")]):
        assert v == pytest.approx(float(step.values["disease"][0]), abs=1e-6)


def test_reload_needs_a_configured_token(server):
    code, res = call(server, "/admin/reload", {})
    assert code == 403 and "--token-file" in res["error"]


def test_tls_on_loopback(heart, tmp_path):
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    with running(Service(heart.bundle, heart.public_key), tls_cert=str(tmp_path / "cert.pem"),
                 tls_key=str(tmp_path / "key.pem")) as server:
        assert server.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        with urllib.request.urlopen(server.url + "/health", context=ctx, timeout=20) as r:
            assert json.loads(r.read())["status"] == "ok"


def test_logs_hold_no_patient_values(server, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="mmn-edge.serve"):
        assert call(server, "/predict", {"patient": {"age": 61.2345, "sex": "Female"}})[0] == 200
        code, res = call(server, "/predict", {"patient": {"age": "seventy-ish"}})
        assert code == 400 and "seventy-ish" in res["error"]  # told to the caller only
    assert "/predict" in caplog.text and "200" in caplog.text
    assert "61.2345" not in caplog.text and "seventy" not in caplog.text and "Female" not in caplog.text


CARD = '''intended_use = "Adults referred for chest pain; decision support only"
limits = ["not validated under 30 years", "thal and ca often missing outside Cleveland"]
training_sites = [{site = "Cleveland", n = 303}, {site = "Hungary", n = 294}]
[metrics.disease_auroc]
value = 0.88
ci95 = [0.84, 0.91]
'''


def test_model_card_is_signed_and_shown(heart, tmp_path, capsys):
    from edge_runtime.cli import main
    from mmn_fed.export import ExportError

    (tmp_path / "card.toml").write_text(CARD)
    from mmn_fed.export import export_bundle

    out = export_bundle(heart.model_path, tmp_path / "carded", sign_key=heart.private_key,
                        model_card=tmp_path / "card.toml")
    assert main(["info", str(out), "--trust-key", str(heart.public_key)]) == 0
    text = capsys.readouterr().out
    assert "intended_use: Adults referred for chest pain" in text and '"ci95": [0.84, 0.91]' in text
    service = Service(out, heart.public_key)
    assert service.info()["model_card"]["training_sites"][1] == {"site": "Hungary", "n": 294}
    with running(service) as server:
        with urllib.request.urlopen(server.url + "/", timeout=20) as r:
            page = r.read().decode()
    shown = json.loads(re.search(r'<script type="application/json" id="info">(.*?)</script>', page).group(1))
    assert shown["model_card"]["limits"][0] == "not validated under 30 years"  # the script shows it (#model-card)
    (tmp_path / "bad.toml").write_text('intendeduse = "typo"\n' + CARD)
    with pytest.raises(ExportError, match=r"\['intendeduse'\] are not known"):
        export_bundle(heart.model_path, tmp_path / "bad", model_card=tmp_path / "bad.toml")


def test_mmn_edge_serve_command_serves_and_stops(heart):
    """The command line end to end: `mmn-edge serve` in a subprocess on 127.0.0.1, port 0; terminated by the test."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", str(heart.bundle), "--trust-key",
                             str(heart.public_key), "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:  # the start-up lines, until the address
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "no address printed"
        with urllib.request.urlopen(url + "/health", timeout=20) as r:
            assert json.loads(r.read())["release"] == 1
    finally:
        proc.terminate()
        proc.wait(20)


def test_an_internal_error_is_a_500_without_details_in_the_log(server, monkeypatch, caplog):
    import logging

    def boom(*a, **k):
        raise RuntimeError("age=77.777")

    monkeypatch.setattr(server.service.current.bundle, "predict", boom)
    with caplog.at_level(logging.INFO, logger="mmn-edge.serve"):
        code, res = call(server, "/predict", {"patient": {"age": 77.777}})
    assert code == 500 and "RuntimeError" in res["error"] and "77.777" not in res["error"]
    assert "RuntimeError" in caplog.text and "77.777" not in caplog.text
    assert call(server, "/health")[0] == 200


def test_trust_store_refuses_what_it_cannot_read(heart, tmp_path):
    from edge_runtime.trust import load_trusted_keys, read_revocations

    (tmp_path / "empty").mkdir()
    with pytest.raises(UntrustedBundleError, match="holds no"):
        load_trusted_keys(tmp_path / "empty")
    (tmp_path / "revoked.txt").write_text("0123456789abcdef\nnot-a-key-id\n")
    with pytest.raises(UntrustedBundleError, match="line 2: 'not-a-key-id' is not a key id"):
        read_revocations(tmp_path / "revoked.txt")
    (tmp_path / "revoked.txt").write_text("# none yet\n\n0123456789ABCDEF  # old laptop\n")
    assert read_revocations(tmp_path / "revoked.txt") == {"0123456789abcdef"}
    assert len(load_trusted_keys([heart.public_key, heart.other_public_key])) == 2


# ---- the page and the token ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def carded(heart, tmp_path_factory):
    """The heart model exported with a model card."""
    from mmn_fed.export import export_bundle

    d = tmp_path_factory.mktemp("carded")
    (d / "card.toml").write_text(CARD)
    return export_bundle(heart.model_path, d / "bundle", sign_key=heart.private_key, model_card=d / "card.toml")


def get_text(server, path):
    with urllib.request.urlopen(server.url + path, timeout=20) as r:
        return r.status, r.read().decode()


def test_with_a_token_the_page_holds_nothing_about_the_model_and_every_endpoint_but_health_needs_it(heart, carded):
    token = "t" * 32
    model_id = load_bundle(carded, trust_key=heart.public_key).manifest["model_id"]
    with running(Service(carded, heart.public_key), token=token) as server:
        status, page = get_text(server, "/")
        assert status == 200 and 'id="token"' in page
        for secret in (model_id, "not validated under 30 years", "Cleveland", "trestbps", "chol", "demographics",
                       "disease", "severity", "release 1"):
            assert secret not in page, secret
        assert call(server, "/info")[0] == 401
        assert call(server, "/no-such-thing")[0] == 401  # not even which endpoints exist
        assert call(server, "/predict", {"patient": PATIENTS[0]})[0] == 401
        assert call(server, "/health")[0] == 200
        assert call(server, "/no-such-thing", token=token)[0] == 404
    with running(Service(carded, heart.public_key)) as server:  # no token (loopback): the page embeds the model
        assert model_id in get_text(server, "/")[1]


def test_the_page_with_a_token_in_a_headless_browser(heart, carded, browser_page):
    """The page asks for the token, fetches /info with it (a wrong one is told), then builds the form and the model
    card and predicts with the token."""
    page, errors = browser_page
    token = "t" * 32
    bundle = load_bundle(carded, trust_key=heart.public_key)
    with running(Service(carded, heart.public_key), token=token) as server:
        page.goto(server.url + "/")
        assert page.eval_on_selector_all("fieldset[data-modality]", "fs => fs.length") == 0
        page.fill("#token", "wrong" * 8)
        page.click("#unlock")
        page.wait_for_selector("#error:has-text('access token')")  # the 401's message
        page.fill("#token", token)
        page.click("#unlock")
        page.wait_for_selector("fieldset[data-modality]")
        sections = page.eval_on_selector_all("fieldset[data-modality]", "fs => fs.map(f => f.dataset.modality)")
        assert sections == bundle.order
        assert "not validated under 30 years" in page.text_content("#model-card")
        page.fill("input[data-column=age]", "58")
        page.click("#submit")
        page.wait_for_selector("#results [data-task=disease][data-value]")
        shown = float(page.get_attribute("#results div[data-task=disease]", "data-value"))
    assert [e for e in errors if "/info" not in e] == []  # the refused /info (401) is the only failed request
    assert shown == pytest.approx(float(bundle.predict([{"age": 58}]).values["disease"][0]), abs=1e-6)


# ---- slow clients ----------------------------------------------------------------------------------------

def _raw(server, data: bytes) -> socket.socket:
    s = socket.create_connection(server.server_address[:2], timeout=20)
    s.sendall(data)
    return s


def _answer(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _head(n: int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n"
            .encode())


def test_slow_clients_hold_no_slot_and_are_cut_off(heart):
    """Clients that send the headers and then nothing (or a part of the body, or a part of the headers) hold no
    concurrency slot: a normal /predict still succeeds. The socket timeout then closes their connections."""
    with running(Service(heart.bundle, heart.public_key), max_concurrent=2, request_timeout=60) as server:
        stalled = [_raw(server, _head(1000) + b'{"pat'), _raw(server, _head(1000)), _raw(server, _head(50)),
                   _raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le")]
        try:
            assert call(server, "/health")[0] == 200  # their headers have been read by now (in practice)
            threading.Event().wait(0.2)
            for _ in range(3):
                code, res = call(server, "/predict", {"patient": PATIENTS[0]})
                assert code == 200, res
        finally:
            for s in stalled:
                s.close()
    with running(Service(heart.bundle, heart.public_key), request_timeout=0.5) as server:
        body_stalled = _raw(server, _head(1000) + b'{"pat')
        head_stalled = _raw(server, b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        trickle = _raw(server, _head(1000))
        try:
            answer = _answer(body_stalled).decode()  # within the socket's 20 s, not the server's 30 of before
            assert answer.startswith("HTTP/1.1 408") and '"field": "body"' in answer
            assert head_stalled.recv(4096) == b""  # closed
            trickle.settimeout(0.1)
            answer = b""
            for _ in range(200):  # a byte every 0.1 s: each read is in time, the whole body is not
                try:
                    trickle.send(b" ")
                    answer = trickle.recv(4096)
                    break
                except socket.timeout:
                    continue
                except OSError:  # the server closed it
                    break
            assert answer.startswith(b"HTTP/1.1 408"), answer
        finally:
            for s in (body_stalled, head_stalled, trickle):
                s.close()
        assert call(server, "/predict", {"patient": PATIENTS[0]})[0] == 200


# ---- malformed bodies and internal errors ----------------------------------------------------------------

@pytest.mark.parametrize("raw, field", [
    (b'{"patients": [{"age": 50}, {"age": 1' + b"0" * 5000 + b'}]}', "patients[1].age"),
    (b'{"patient": {"sex": -' + b"9" * 4301 + b'}}', "patient.sex"),
    (b'{"patient": {"age": 50}, "explain": ' + b"1" * 5000 + b"}", "explain"),
    (b"1" * 5000, None),
    (b'{"patient": {"age": 1' + b"0" * 300 + b"}}", "patient.age"),  # 301 digits: no float
    (b"[" * 100_000 + b"]" * 100_000, "body"),
], ids=["5000 digits", "4301 digits, categorical", "explain", "a bare integer", "301 digits", "deep nesting"])
def test_huge_integers_and_deep_nesting_are_a_400(server, raw, field):
    code, res = call(server, "/predict", raw=raw)
    assert code == 400 and res["field"] == field, res
    if field and field != "body":
        assert "digits" in res["error"]
    assert call(server, "/predict", raw=b'{"patient": {"age": 1' + b"0" * 299 + b"}}")[0] == 200  # 300 digits


def test_internal_errors_on_get_and_outside_the_handlers_leak_no_value(server, monkeypatch, caplog, capsys):
    import logging

    def boom(*a, **k):
        raise RuntimeError("age=77.777")

    with caplog.at_level(logging.INFO, logger="mmn-edge.serve"):
        monkeypatch.setattr(server.service, "info", boom)
        code, res = call(server, "/info")
        assert code == 500 and "RuntimeError" in res["error"] and "77.777" not in json.dumps(res)
        try:
            raise RuntimeError("age=77.777")
        except RuntimeError:
            server.handle_error(None, ("127.0.0.1", 1))  # what socketserver calls for an escaped exception
    err = capsys.readouterr().err
    assert "RuntimeError" in caplog.text and "77.777" not in caplog.text and "77.777" not in err


# ---- addresses -------------------------------------------------------------------------------------------

def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_loopback_names():
    from edge_runtime.serve import check_config, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "LOCALHOST", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.0.2.1", "example.org", "localhost.example"))
    check_config(ServeConfig(host="::1"))  # no TLS, no token needed
    with pytest.raises(ServeError, match="request-timeout"):
        check_config(ServeConfig(request_timeout=0))


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine cannot bind the IPv6 loopback ::1")
def test_serves_on_ipv6_loopback(heart):
    with running(Service(heart.bundle, heart.public_key), host="::1") as server:
        assert server.url.startswith("http://[::1]:")
        assert call(server, "/health")[0] == 200
        assert call(server, "/predict", {"patient": PATIENTS[0]})[0] == 200


def test_serves_on_localhost(heart):
    with running(Service(heart.bundle, heart.public_key), host="localhost") as server:
        assert call(server, "/health")[0] == 200


# ---- SIGHUP ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_reloads_the_bundle_like_admin_reload(heart, tmp_path):
    """`mmn-edge serve` in a subprocess: SIGHUP after a higher release swaps it in; after a lower one the running
    model stays and the refusal is logged. No token is needed (the signal comes from the machine's owner)."""
    import queue
    import signal
    import time

    live = _export(heart, tmp_path / "live", release=1)
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", str(live), "--trust-key",
                             str(heart.public_key), "--port", "0"], stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()

    def wait_for(pattern):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "the service stopped"
                continue
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no log line matching {pattern!r}")

    try:
        url = wait_for(r"at (http://127\.0\.0\.1:\d+) \(SIGHUP reloads").group(1)

        def info():
            with urllib.request.urlopen(url + "/info", timeout=20) as r:
                return json.loads(r.read())

        assert info()["release"] == 1
        _export(heart, live, release=2)
        proc.send_signal(signal.SIGHUP)
        wait_for(r"SIGHUP: reloaded, serving model \S+ release 2")
        assert info()["release"] == 2
        _export(heart, live, release=1)
        proc.send_signal(signal.SIGHUP)
        wait_for(r"SIGHUP: bundle refused, the running model stays \(release 2\).*lower than the running release")
        assert info()["release"] == 2
        onnx = next(live.glob("encoders.*.onnx"))  # tampered: refused, the model stays
        _export(heart, live, release=3)
        onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
        proc.send_signal(signal.SIGHUP)
        wait_for(r"SIGHUP: bundle refused, the running model stays \(release 2\)")
        assert info()["release"] == 2
    finally:
        proc.terminate()
        proc.wait(20)


# ---- time-series bundles ---------------------------------------------------------------------------------

def _as_timeseries(heart, out):
    """The heart bundle with a `timeseries` section in its signed manifest: what the exporter writes for a
    time-series model (`mmn-edge predict` then scores visits with a state per patient)."""
    from edge_runtime.trust import MANIFEST, canonical_json
    from mmn_fed.export import load_private_key, sign_bundle

    b = _export(heart, out, release=5)
    m = json.loads((b / MANIFEST).read_text())
    m["timeseries"] = {"id": "id", "time": "day", "modalities": ["rest"]}
    (b / MANIFEST).write_bytes(canonical_json(m))
    sign_bundle(b, load_private_key(heart.private_key))
    return b


def test_time_series_bundles_are_refused_at_start_and_on_reload(heart, tmp_path, capsys):
    from edge_runtime.cli import main
    from edge_runtime.trust import BundleError

    ts = _as_timeseries(heart, tmp_path / "ts")
    with pytest.raises(BundleError, match="time-series bundles are not served.*one row per patient.*mmn-edge predict"):
        Service(ts, heart.public_key)
    assert main(["serve", str(ts), "--trust-key", str(heart.public_key), "--port", "0"]) == 3
    assert "time-series bundles are not served" in capsys.readouterr().err
    live = _export(heart, tmp_path / "live", release=1)
    token = "t" * 32
    with running(Service(live, heart.public_key), token=token) as server:
        shutil.rmtree(live)
        shutil.copytree(ts, live)
        code, res = call(server, "/admin/reload", {}, token=token)
        assert code == 409 and "time-series" in res["error"]
        assert call(server, "/predict", {"patient": PATIENTS[0]}, token=token)[1]["release"] == 1
