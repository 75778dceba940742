"""Bundle format and trust: the manifest, its Ed25519 signature, and every file's SHA-256.

A bundle is a directory::

    manifest.json   format version, schema + preprocessing statistics, tasks, modules (file, inputs,
                    outputs, opset), sha256 and size of every module file, model id, provenance
    manifest.sig    64 raw bytes: Ed25519 signature of manifest.json's exact bytes (absent if unsigned)
    <module>.onnx   one file per module: init_state, encoders.<modality>, decoders.<task>

Loading reads every file into memory once, checks the signature against the caller's trusted public key
and every file against its hash, and only then hands the bytes on: nothing unverified reaches
ONNX Runtime, and the verified bytes are the bytes that run (no re-read after the check).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FORMAT = "mmn-fed-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*\.onnx$")
MAX_FILE_BYTES = 256 * 1024 * 1024  # refuse absurd files before reading them


class BundleError(ValueError):
    """The bundle is missing, malformed, or of an unsupported format version."""


class UntrustedBundleError(BundleError):
    """The bundle failed verification: bad or missing signature, wrong key, or a file that does not
    match its hash (tampered, truncated, missing). Nothing from it was run."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_public_key(key: Any):
    """An Ed25519 public key from a PEM/OpenSSH file path, PEM bytes, 32 raw bytes, or a key object."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    data = key
    if isinstance(key, (str, Path)):
        path = Path(key)
        if not path.is_file():
            raise UntrustedBundleError(f"trust key file not found: {path}")
        data = path.read_bytes()
    if not isinstance(data, (bytes, bytearray)):
        raise UntrustedBundleError(f"trust key must be a path, PEM bytes or an Ed25519 public key, got {type(key).__name__}")
    data = bytes(data)
    try:
        if len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
        if data.startswith(b"ssh-ed25519"):
            pub = serialization.load_ssh_public_key(data)
        else:
            pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise UntrustedBundleError(f"trust key is not a readable public key: {e}") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise UntrustedBundleError(f"trust key is a {type(pub).__name__}, expected an Ed25519 public key")
    return pub


def key_id(public_key) -> str:
    """Short fingerprint of an Ed25519 public key: the first 16 hex digits of sha256(raw key)."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256(raw)[:16]


def load_trusted_keys(keys: Any) -> list:
    """Every trusted Ed25519 public key: ``keys`` is one key (as ``load_public_key`` takes), a directory (its
    ``*.pub`` and ``*.pem`` files) or a list of either. Several keys let a signer rotate without re-flashing."""
    items = list(keys) if isinstance(keys, (list, tuple)) else [keys]
    out = []
    for k in items:
        if isinstance(k, (str, Path)) and Path(k).is_dir():
            found = sorted(p for p in Path(k).iterdir() if p.suffix in (".pub", ".pem") and p.is_file())
            if not found:
                raise UntrustedBundleError(f"trust key directory {k} holds no *.pub or *.pem file")
            out.extend(load_public_key(p) for p in found)
        else:
            out.append(load_public_key(k))
    if not out:
        raise UntrustedBundleError("no trust key given")
    return out


def read_revocations(path: str | Path) -> frozenset[str]:
    """A revocation list: one key id (``key_id``, 16 hex digits, as `mmn-fed keygen` prints) per line; blank
    lines and ``#`` comments are ignored. A bundle signed by a listed key is refused even if the key is trusted."""
    path = Path(path)
    if not path.is_file():
        raise UntrustedBundleError(f"revocation list not found: {path}")
    ids = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
            continue
        if not re.fullmatch(r"[0-9a-f]{16}", text):
            raise UntrustedBundleError(f"{path} line {n}: {text!r} is not a key id (16 hex digits)")
        ids.add(text)
    return frozenset(ids)


@dataclass(frozen=True)
class VerifiedBundle:
    """Bytes of a bundle that passed verification (``signed_by`` is None when loaded unsigned)."""

    path: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]
    signed_by: str | None
    manifest_sha256: str


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():  # stat only: a FIFO or device is never opened (opening a FIFO would block)
        if path.exists() or path.is_symlink():
            raise UntrustedBundleError(f"{what} {path} is not a regular file; refusing to read it")
        raise UntrustedBundleError(f"{what} missing: {path}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UntrustedBundleError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes; refusing to read it")
    return path.read_bytes()


def read_manifest(path: str | Path) -> tuple[dict[str, Any], bytes, bytes | None]:
    """Parse manifest.json without verifying it (for `info`); also returns its bytes and the signature."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    raw = _read(root / MANIFEST, "manifest")
    sig_path = root / SIGNATURE
    sig = _read(sig_path, "signature") if sig_path.exists() or sig_path.is_symlink() else None
    return _parse_manifest(raw, root), raw, sig


def _parse_manifest(raw: bytes, root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UntrustedBundleError(f"{root / MANIFEST} is not valid JSON ({e}); the bundle is damaged") from None
    except RecursionError:  # e.g. 200,000 nested brackets: no manifest is nested deeply
        raise BundleError(f"{root / MANIFEST} is nested too deeply to be a bundle manifest; refusing it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{root} is not an mmn-fed bundle (manifest format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format version {manifest.get('format_version')!r} is not supported; "
                          f"this runtime reads version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{root / MANIFEST} lists no files")
    for name, entry in files.items():
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            raise UntrustedBundleError(f"manifest names an unsafe file {name!r}; only plain *.onnx names are allowed")
        if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
            raise BundleError(f"manifest entry for {name} has no valid sha256")
    return manifest


def verify_bundle(path: str | Path, trust_key: Any = None, allow_unsigned: bool = False,
                  revoked: frozenset[str] | set[str] = frozenset()) -> VerifiedBundle:
    """Read a bundle and verify it: signature of manifest.json against ``trust_key`` (one key, a directory of
    keys or a list: any of them may have signed), then every listed file's size and SHA-256. A signature by a
    key whose id is in ``revoked`` is refused. Raises UntrustedBundleError naming the first problem.

    Without ``trust_key`` the bundle is refused unless ``allow_unsigned`` is True; then the signature is
    not checked (anyone could have written the manifest) but file hashes still are, catching corruption.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    raw = _read(root / MANIFEST, "manifest")
    sig_path = root / SIGNATURE
    signed_by = None
    if trust_key is not None:
        pubs = load_trusted_keys(trust_key)
        if not sig_path.exists() and not sig_path.is_symlink():
            raise UntrustedBundleError(f"bundle {root} is unsigned ({SIGNATURE} missing) but a trust key was given; "
                                       f"refusing it")
        sig = _read(sig_path, "signature")
        if len(sig) != 64:
            raise UntrustedBundleError(f"{sig_path} is {len(sig)} bytes; an Ed25519 signature is 64 bytes")
        from cryptography.exceptions import InvalidSignature

        for pub in pubs:
            try:
                pub.verify(sig, raw)
            except InvalidSignature:
                continue
            signed_by = key_id(pub)
            break
        if signed_by is None:
            ids = ", ".join(key_id(p) for p in pubs)
            raise UntrustedBundleError(
                f"signature of {root / MANIFEST} does not verify with trust key {ids}: the manifest was "
                f"modified or signed by another key; refusing the bundle")
        if signed_by in revoked:
            raise UntrustedBundleError(f"{root} is signed by key {signed_by}, which is revoked (in the revocation "
                                       f"list); refusing the bundle")
    elif not allow_unsigned:
        raise UntrustedBundleError(
            f"no trust key given for {root}: pass the signer's public key (--trust-key PUB / trust_key=...) "
            f"or explicitly allow unverified bundles (--allow-unsigned / allow_unsigned=True)")
    manifest = _parse_manifest(raw, root)
    files: dict[str, bytes] = {}
    for name, entry in manifest["files"].items():
        data = _read(root / name, f"bundle file {name}")
        if "bytes" in entry and len(data) != entry["bytes"]:
            raise UntrustedBundleError(f"{root / name} is {len(data)} bytes, the manifest says {entry['bytes']}: "
                                       f"truncated or modified; refusing the bundle")
        if sha256(data) != entry["sha256"]:
            raise UntrustedBundleError(f"{root / name} does not match its sha256 in the manifest: modified; "
                                       f"refusing the bundle")
        files[name] = data
    return VerifiedBundle(root, manifest, files, signed_by, sha256(raw))


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The manifest's byte form (what is signed): UTF-8 JSON, stable key order, trailing newline."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
