"""A bundle is verified before anything of it runs: tampered, truncated, missing, unsigned or
wrongly signed bundles are refused, and no ONNX session is created for them."""
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edge_runtime.bundle as bundle_mod
from edge_runtime import BundleError, UntrustedBundleError, load_bundle
from edge_runtime.trust import MANIFEST, SIGNATURE, canonical_json, verify_bundle
from mmn_fed.export import ExportError, export_bundle, generate_keypair, load_private_key, sign_bundle


@pytest.fixture()
def no_sessions(monkeypatch):
    """Fail the test if an ONNX Runtime session is created."""
    created = []

    def forbidden(*a, **k):
        created.append(a)
        raise AssertionError("an InferenceSession was created for a bundle that should be refused")

    monkeypatch.setattr(bundle_mod.ort, "InferenceSession", forbidden)
    return created


def bundle_files(path):
    return sorted(p.name for p in path.iterdir())


def test_signed_bundle_loads_and_lists_every_file(heart):
    b = load_bundle(heart.bundle, trust_key=heart.public_key)
    names = set(b.manifest["files"])
    assert names == {p for p in bundle_files(heart.bundle) if p.endswith(".onnx")}
    assert names == ({"init_state.onnx", "preprocess.onnx", "portable.onnx"} | {f"encoders.{m}.onnx" for m in b.order}
                     | {f"decoders.{t}.onnx" for t in b.tasks})
    assert b.signed_by and len(b.signed_by) == 16


def test_manifest_describes_modules_and_preprocessing(heart):
    m = json.loads((heart.bundle / MANIFEST).read_text())
    assert m["format_version"] == 1 and m["opset"] == 17 and len(m["model_id"]) == 16
    assert m["preprocessing"] == heart.trained.preprocessor.to_dict()
    assert m["tasks"]["disease"]["kind"] == "binary" and m["tasks"]["severity"]["classes"] == ["0", "1", "2", "3", "4"]
    enc = m["modules"]["encoders.rest"]
    assert enc["inputs"] == ["encoders.rest.state", "encoders.rest.x"] and enc["shapes"]["encoders.rest.x"] == ["batch", 7]
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipping_any_byte_of_any_file_is_refused(heart, tmp_path_factory, data):
    """Hypothesis picks the file, the byte and the new value (every file, including manifest and signature)."""
    path = shutil.copytree(heart.bundle, tmp_path_factory.mktemp("t") / "b")
    name = data.draw(st.sampled_from(bundle_files(path)), label="file")
    raw = bytearray((path / name).read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1), label="byte")
    raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    (path / name).write_bytes(bytes(raw))
    with pytest.raises(UntrustedBundleError):
        load_bundle(path, trust_key=heart.public_key)


def test_first_and_last_byte_of_every_file(heart, bundle_copy, no_sessions):
    for name in bundle_files(bundle_copy):
        original = (bundle_copy / name).read_bytes()
        for pos in (0, len(original) - 1):
            raw = bytearray(original)
            raw[pos] ^= 0x01
            (bundle_copy / name).write_bytes(bytes(raw))
            with pytest.raises(UntrustedBundleError):
                load_bundle(bundle_copy, trust_key=heart.public_key)
        (bundle_copy / name).write_bytes(original)
    verify_bundle(bundle_copy, trust_key=heart.public_key)  # restored: verifies again (loading makes a session)
    assert not no_sessions


def test_every_byte_of_the_signature(heart, bundle_copy):
    sig = (bundle_copy / SIGNATURE).read_bytes()
    assert len(sig) == 64
    for pos in range(64):
        raw = bytearray(sig)
        raw[pos] ^= 0x80
        (bundle_copy / SIGNATURE).write_bytes(bytes(raw))
        with pytest.raises(UntrustedBundleError, match="does not verify"):
            load_bundle(bundle_copy, trust_key=heart.public_key)


@pytest.mark.parametrize("damage", ["truncate", "append", "delete", "empty"])
def test_truncated_extended_missing_or_empty_files_are_refused(heart, bundle_copy, no_sessions, damage):
    for name in bundle_files(bundle_copy):
        original = (bundle_copy / name).read_bytes()
        if damage == "truncate":
            (bundle_copy / name).write_bytes(original[:-1])
        elif damage == "append":
            (bundle_copy / name).write_bytes(original + b"\n")
        elif damage == "delete":
            (bundle_copy / name).unlink()
        else:
            (bundle_copy / name).write_bytes(b"")
        with pytest.raises(UntrustedBundleError):
            load_bundle(bundle_copy, trust_key=heart.public_key)
        (bundle_copy / name).write_bytes(original)


def test_wrong_key_is_refused(heart):
    with pytest.raises(UntrustedBundleError, match="does not verify with trust key"):
        load_bundle(heart.bundle, trust_key=heart.other_public_key)


def test_swapped_module_with_resigned_manifest_by_another_key_is_refused(heart, bundle_copy, tmp_path):
    priv, _ = generate_keypair(tmp_path / "mallory")
    sign_bundle(bundle_copy, load_private_key(priv))
    with pytest.raises(UntrustedBundleError):
        load_bundle(bundle_copy, trust_key=heart.public_key)


def test_unsigned_bundle_needs_explicit_opt_in(heart, no_sessions):
    assert not (heart.unsigned / SIGNATURE).exists()
    with pytest.raises(UntrustedBundleError, match="unsigned"):
        load_bundle(heart.unsigned, trust_key=heart.public_key)
    with pytest.raises(UntrustedBundleError, match="no trust key"):
        load_bundle(heart.unsigned)
    with pytest.raises(UntrustedBundleError, match="no trust key"):
        load_bundle(heart.bundle)  # a signed bundle still needs a key, or the opt-in
    assert not no_sessions  # nothing was run from the refused bundles
    no_sessions.clear()


def test_unsigned_bundle_loads_with_the_opt_in(heart):
    b = load_bundle(heart.unsigned, allow_unsigned=True)
    assert b.signed_by is None


def test_unsigned_opt_in_still_checks_file_hashes(heart, tmp_path):
    path = shutil.copytree(heart.unsigned, tmp_path / "u")
    f = path / "encoders.rest.onnx"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(UntrustedBundleError, match="sha256"):
        load_bundle(path, allow_unsigned=True)


def test_signed_manifest_naming_a_path_outside_the_bundle_is_refused(heart, bundle_copy):
    m = json.loads((bundle_copy / MANIFEST).read_text())
    m["files"]["../evil.onnx"] = m["files"].pop("encoders.rest.onnx")
    (bundle_copy / MANIFEST).write_bytes(canonical_json(m))
    sign_bundle(bundle_copy, load_private_key(heart.private_key))
    with pytest.raises(UntrustedBundleError, match="unsafe file"):
        load_bundle(bundle_copy, trust_key=heart.public_key)


def test_unsupported_format_version_is_refused(heart, bundle_copy):
    m = json.loads((bundle_copy / MANIFEST).read_text())
    m["format_version"] = 99
    (bundle_copy / MANIFEST).write_bytes(canonical_json(m))
    sign_bundle(bundle_copy, load_private_key(heart.private_key))
    with pytest.raises(BundleError, match="version 99"):
        load_bundle(bundle_copy, trust_key=heart.public_key)


def test_a_module_can_be_replaced_alone_and_resigned(heart, bundle_copy, tmp_path):
    """Replace one encoder's file by the same module from another export: only that file and the manifest change."""
    other = export_bundle(heart.model_path, tmp_path / "other")
    (bundle_copy / "encoders.rest.onnx").write_bytes((other / "encoders.rest.onnx").read_bytes())
    m = json.loads((bundle_copy / MANIFEST).read_text())
    m["files"]["encoders.rest.onnx"] = json.loads((other / MANIFEST).read_text())["files"]["encoders.rest.onnx"]
    (bundle_copy / MANIFEST).write_bytes(canonical_json(m))
    sign_bundle(bundle_copy, load_private_key(heart.private_key))
    b = load_bundle(bundle_copy, trust_key=heart.public_key)
    assert b.predict(heart.df.head(3).to_dict("records")).ok.all()


def test_export_refuses_pfusion_and_existing_output(heart, tmp_path):
    from mmn_fed import ModelConfig
    from mmn_fed.model_io import TrainedModel, build_from_preprocessor

    prep = heart.trained.preprocessor
    cfg = ModelConfig(kind="pfusion")
    pf = TrainedModel(build_from_preprocessor(prep, cfg), prep, cfg, {})
    with pytest.raises(ExportError, match="only MultiModN"):
        export_bundle(pf, tmp_path / "pf")
    with pytest.raises(ExportError, match="not empty"):
        export_bundle(heart.model_path, heart.bundle)
    with pytest.raises(ExportError, match="--force"):
        generate_keypair(heart.private_key.parent)


def test_every_byte_of_the_manifest(heart, bundle_copy):
    """Exhaustive over manifest.json (it carries every file's hash; the files' own bytes are covered by sha256)."""
    from edge_runtime.trust import load_public_key

    key = load_public_key(heart.public_key)
    original = (bundle_copy / MANIFEST).read_bytes()
    refused = 0
    with open(bundle_copy / MANIFEST, "r+b", buffering=0) as f:
        for pos in range(len(original)):
            f.seek(pos)
            f.write(bytes([original[pos] ^ 0x20]))
            try:
                load_bundle(bundle_copy, trust_key=key)
            except UntrustedBundleError:
                refused += 1
            f.seek(pos)
            f.write(original[pos:pos + 1])
    assert refused == len(original)
    load_bundle(bundle_copy, trust_key=key)
