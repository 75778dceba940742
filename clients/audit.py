"""Site audit log: an append-only, hash-chained JSON-lines record of every message in and out of a site's
ClientApp, for the hospital's privacy officer (docs/federation.md, "Site audit log").

Files in a site's audit directory::

    audit.jsonl       one JSON object per line, one line per message in or out
    audit.head.json   the chain head: entry count, last hash, site, time, Ed25519 signature, public key
    audit.key         the site's audit signing key (Ed25519, PKCS#8 PEM, owner-only; made at first use)
    audit.pub         its public half (PEM): give it (or its key id) to whoever verifies

A line is the canonical JSON of an entry (sorted keys, no spaces, UTF-8, no NaN) and holds ``prev``, the hash
of the line before (64 zeros for the first), and ``hash``, the SHA-256 of the canonical JSON of the entry
without ``hash``. ``seq`` numbers the entries from 1. An entry names the message (time, run, node, round,
direction, message type, message ids), each record's kind and its keys: tensor names with dtype and shape for
arrays, metric names for metrics, config keys for configs — never a value — the modules the arrays belong to,
and the payload bytes. The head is signed after every append, so cutting the file's last lines (truncation),
which leaves a valid chain, is caught too.

Flower 1.42 runs one ClientApp process per message: ``append`` holds ``fcntl.flock`` on the log while it
reads the last line and appends, and replaces the head atomically (write + rename) inside the lock.

No torch, pandas or flwr here: ``mmn-fed site audit verify`` runs wherever Python and ``cryptography`` do;
``audit_mod`` (the ClientApp hook) reads Flower records by duck typing.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .manifest import read_manifest

FORMAT = "mmn-fed-site-audit"
VERSION = 1
LOG = "audit.jsonl"
HEAD = "audit.head.json"
KEY = "audit.key"
PUB = "audit.pub"
GENESIS = "0" * 64
OFF = ("off", "none", "false", "no", "0", "")
DEPLOYMENT_SUBDIR = "mmn-fed-audit"  # beside a deployed site's data file: <data dir>/mmn-fed-audit/<site>/
SIMULATION_SUBDIR = "audit"  # inside a simulation's data-dir: <data-dir>/audit/<site>/


class AuditError(RuntimeError):
    """The audit log cannot be written (the message is then not processed: the site fails closed)."""


# ---- canonical encoding and hashes ------------------------------------------------------------------------

def canonical(obj: Mapping[str, Any]) -> bytes:
    """The byte form of an entry or a head (what is hashed and signed): compact, sorted, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- keys ---------------------------------------------------------------------------------------------------

def key_id(public_key) -> str:
    """First 16 hex digits of sha256(raw Ed25519 public key): the same id bundles use (edge_runtime.trust)."""
    from edge_runtime.trust import key_id as _key_id

    return _key_id(public_key)


def _raw(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def site_key(directory: Path):
    """The site's audit signing key in ``directory`` (made at first use; call under the log's lock)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = directory / KEY
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"{path} holds a {type(key).__name__}, expected an Ed25519 key")
        if not (directory / PUB).exists():
            _atomic_write(directory / PUB, key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _atomic_write(directory / PUB, pub)
    return key


def load_public_key(path: str | Path):
    from edge_runtime.trust import load_public_key as _load

    return _load(path)


# ---- appending ----------------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _last_line(fd: int) -> bytes:
    """The last complete line of the open file ``fd`` (b"" if empty); reads backwards from the end."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0:
        return b""
    buf, pos = b"", end
    while pos > 0:
        step = min(8192, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        start = buf.rfind(b"\n", 0, len(buf) - 1)
        if start >= 0:
            return buf[start + 1:]
    return buf


class AuditLog:
    """One site's audit directory. ``append(entry)`` chains, writes and signs one entry."""

    def __init__(self, directory: str | Path, site: str = ""):
        self.dir = Path(directory)
        self.site = site
        self.path = self.dir / LOG
        self.head_path = self.dir / HEAD

    def append(self, fields: Mapping[str, Any]) -> dict:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as e:
            raise AuditError(f"cannot open the site audit log {self.path}: {e} (node config audit-dir=PATH "
                             "chooses another directory)") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            if last and not last.endswith(b"\n"):
                raise AuditError(f"{self.path} ends in a partial line (a crash mid-write?): run "
                                 "`mmn-fed site audit verify` and keep the file; new entries are refused")
            if last:
                try:
                    prev_entry = json.loads(last)
                    seq, prev = int(prev_entry["seq"]) + 1, str(prev_entry["hash"])
                except (ValueError, KeyError, TypeError) as e:
                    raise AuditError(f"the last line of {self.path} is unreadable ({e}): run `mmn-fed site audit "
                                     "verify` and keep the file; new entries are refused") from None
            else:
                seq, prev = 1, GENESIS
            entry = {**fields, "v": VERSION, "seq": seq, "time": _now(), "site": self.site, "prev": prev}
            entry["hash"] = entry_hash(entry)
            os.write(fd, canonical(entry) + b"\n")
            os.fsync(fd)
            self._sign_head(seq, entry["hash"])
            return entry
        finally:
            os.close(fd)  # releases the lock

    def _sign_head(self, count: int, last_hash: str) -> None:
        key = site_key(self.dir)
        body = {"format": FORMAT, "v": VERSION, "site": self.site, "count": count, "last_hash": last_hash,
                "time": _now(), "key_id": key_id(key.public_key()),
                "public_key": base64.b64encode(_raw(key.public_key())).decode()}
        head = {**body, "signature": base64.b64encode(key.sign(canonical(body))).decode()}
        _atomic_write(self.head_path, json.dumps(head, indent=1, sort_keys=True).encode() + b"\n")


# ---- what a message is, without its values ------------------------------------------------------------------

def module_name(param: str) -> str:
    """'encoders.labs.net.0.weight' -> 'encoders.labs'; 'init_state' -> 'init_state' (as mmn_fed.modules)."""
    parts = param.split(".")
    if parts[0] == "init_state" or len(parts) < 3 or parts[0] not in ("encoders", "decoders"):
        return parts[0]
    return ".".join(parts[:2])


def _value_bytes(v: Any) -> int:
    if isinstance(v, (bytes, bytearray)):
        return len(v)
    if isinstance(v, str):
        return len(v.encode("utf-8"))
    if isinstance(v, (list, tuple)):
        return sum(_value_bytes(x) for x in v)
    return 8  # int, float, bool: 8 bytes on the wire at most


def _dtype_name(dtype: str) -> str:
    import numpy as np

    return str(np.dtype(dtype))  # '<f4' -> 'float32', as Flower's Array.dtype says it


def describe_content(content: Any) -> dict:
    """Records of a message (a Flower RecordDict): per record its kind and keys, tensor dtypes and shapes,
    the modules of the tensors and the payload bytes. No value is read into the result."""
    records, modules, total = {}, set(), 0
    for name, rec in content.items():
        kind = type(rec).__name__
        if kind == "ArrayRecord":
            from mmn_fed.records import layout  # packed (one Array for every tensor) or one Array per tensor

            tensors, nbytes = {}, sum(len(arr.data) for arr in rec.values())
            for key, dtype, shape in layout(rec):
                tensors[key] = f"{_dtype_name(dtype)}[{','.join(str(d) for d in shape)}]"
                modules.add(module_name(key))
            records[name] = {"kind": "arrays", "tensors": tensors, "bytes": nbytes}
        elif kind == "MetricRecord":
            nbytes = sum(_value_bytes(v) for v in rec.values())
            records[name] = {"kind": "metrics", "names": sorted(rec.keys()), "bytes": nbytes}
        else:  # ConfigRecord (and anything newer): keys only
            nbytes = sum(_value_bytes(v) for v in rec.values())
            records[name] = {"kind": "config" if kind == "ConfigRecord" else kind, "keys": sorted(rec.keys()),
                             "bytes": nbytes}
        total += nbytes
    return {"records": records, "modules": sorted(modules), "bytes": total}


def _round(msg: Any) -> int | None:
    try:
        config = msg.content["config"] if "config" in msg.content else None
        if config is not None and "server-round" in config:
            return int(config["server-round"])
    except Exception:  # an error message has no content
        pass
    group = str(getattr(msg.metadata, "group_id", "") or "")
    return int(group) if group.isdigit() else None


def message_fields(msg: Any, direction: str, round_: int | None = None) -> dict:
    md = msg.metadata
    fields = {"dir": direction, "run": int(md.run_id), "node": int(md.dst_node_id if direction == "in" else md.src_node_id),
              "round": _round(msg) if round_ is None else round_, "type": str(md.message_type),
              "message_id": str(md.message_id or ""), "reply_to": str(md.reply_to_message_id or "")}
    if msg.has_error():
        fields.update({"records": {}, "modules": [], "bytes": 0, "error": f"code {msg.error.code}"})
    else:
        fields.update(describe_content(msg.content))
    return fields


# ---- where a site's log lives ------------------------------------------------------------------------------

def locate(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[Path | None, str]:
    """(audit directory or None when off, site name). Node config ``audit-dir`` wins (``off`` turns the log
    off); a deployed site (``data-path``) logs in ``<data dir>/mmn-fed-audit/<site>/``; a simulated site of a
    ``data-dir`` logs in ``<data-dir>/audit/<site>/`` when the run config says ``site-audit = true`` (simulations
    are not hospitals: off by default); a simulated site of a built-in dataset keeps no log."""
    name = str(node_config.get("site-name") or "")
    if node_config.get("data-path"):
        name = name or Path(str(node_config["data-path"])).stem
    elif "partition-id" in node_config and run_config.get("data-dir"):
        try:
            manifest = read_manifest(str(run_config["data-dir"]))  # parsed once per version of the file
            name = name or str(manifest["sites"][int(node_config["partition-id"])]["name"])
        except (OSError, ValueError, KeyError, IndexError):
            name = name or f"partition-{node_config['partition-id']}"
    if "audit-dir" in node_config:
        value = str(node_config["audit-dir"])
        return (None if value.strip().lower() in OFF else Path(value)), name or "site"
    if node_config.get("data-path"):
        return Path(str(node_config["data-path"])).resolve().parent / DEPLOYMENT_SUBDIR / safe_name(name), name
    if "partition-id" in node_config and run_config.get("data-dir") and _on(run_config.get("site-audit", False)):
        return Path(str(run_config["data-dir"])) / SIMULATION_SUBDIR / safe_name(name), name
    return None, name


def _on(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "on")


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".") or "site"


def audit_mod(msg: Any, context: Any, call_next: Callable) -> Any:
    """Flower mod (outermost on every handler): log the message in, run the handler, log the reply out. The
    'in' entry is written before the handler runs: a site whose log cannot be written processes nothing. A
    handler's exception is logged by its type only (its text may quote a data value) and raised again."""
    directory, site = locate(context.node_config, context.run_config)
    if directory is None:
        return call_next(msg, context)
    log = AuditLog(directory, site)
    fields = message_fields(msg, "in")
    log.append(fields)
    try:
        reply = call_next(msg, context)
    except BaseException as e:
        log.append({**{k: fields[k] for k in ("run", "node", "round", "type")}, "dir": "out",
                    "message_id": "", "reply_to": fields["message_id"], "records": {}, "modules": [], "bytes": 0,
                    "error": type(e).__name__})
        raise
    log.append(message_fields(reply, "out", fields["round"]))
    return reply


# ---- verification -------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    ok: bool
    count: int
    key_id: str = ""
    problem: str = ""
    line: int | None = None  # the first bad line (1-based), when a line is to blame
    entries: list = field(default_factory=list)

    def message(self) -> str:
        if self.ok:
            return f"{self.count} entries, chain intact, head signed by {self.key_id}"
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.problem}"


def _read_head(path: Path) -> dict:
    return json.loads(path.read_text())


def _find_seq(lines: list[bytes], seq: int) -> int | None:
    """1-based index in ``lines`` of the first line whose entry is number ``seq`` (None if none)."""
    for j, raw in enumerate(lines, start=1):
        try:
            if json.loads(raw).get("seq") == seq:
                return j
        except (ValueError, AttributeError):
            continue
    return None


def verify(log: str | Path, head: str | Path | None = None, key: Any = None, require_head: bool = True) -> Verdict:
    """Check every line's hash, number and link to the line before, then the signed head (count and last
    hash, so cut lines show), its signature, and with ``key`` (a trusted public key: path, PEM or key object)
    that the head was signed by it. Returns the first problem found."""
    log = Path(log)
    if log.is_dir():
        log = log / LOG
    head_path = Path(head) if head is not None else log.with_name(HEAD)
    try:
        data = log.read_bytes()
    except OSError as e:
        return Verdict(False, 0, problem=f"cannot read {log}: {e}")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        return Verdict(False, len(lines), problem="partial last line (no newline: a crash mid-write or a cut)",
                       line=len(lines))
    entries, prev = [], GENESIS
    for i, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
            ok = isinstance(entry, dict) and canonical(entry) == raw and entry.get("hash") == entry_hash(entry)
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            return Verdict(False, i - 1, problem="edited: the line does not match its hash (or is not canonical JSON)",
                           line=i)
        seq = entry.get("seq")
        if seq != i:
            later = _find_seq(lines[i:], i)
            if not isinstance(seq, int) or seq < i:
                what = f"entry {seq} again or out of place (a line inserted, duplicated or moved)"
            elif later is not None:
                what = f"out of order: entry {i} is at line {i + later} (lines reordered)"
            else:
                what = f"entries {i}..{seq - 1} removed before it"
            return Verdict(False, i - 1, problem=f"sequence number {seq}, expected {i}: {what}", line=i)
        if entry.get("prev") != prev:
            return Verdict(False, i - 1, problem=f"chain broken: does not follow line {i - 1} (a line inserted, removed "
                                                 "or reordered)", line=i)
        prev = entry["hash"]
        entries.append(entry)
    n = len(entries)
    if not head_path.exists():
        if require_head:
            return Verdict(False, n, problem=f"no head file {head_path}: the chain is not anchored (truncation cannot "
                                             "be ruled out)", entries=entries)
        return Verdict(True, n, key_id="(no head)", entries=entries)
    try:
        h = _read_head(head_path)
        body = {k: v for k, v in h.items() if k != "signature"}
        pub_raw = base64.b64decode(h["public_key"])
        sig = base64.b64decode(h["signature"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Verdict(False, n, problem=f"unreadable head {head_path}: {e}", entries=entries)
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        pub = Ed25519PublicKey.from_public_bytes(pub_raw)
        pub.verify(sig, canonical(body))
    except (InvalidSignature, ValueError):
        return Verdict(False, n, problem=f"head signature invalid: {head_path} was edited or forged", entries=entries)
    kid = key_id(pub)
    if key is not None:
        trusted = load_public_key(key) if not hasattr(key, "verify") else key
        if _raw(trusted) != pub_raw:
            return Verdict(False, n, problem=f"head signed by key {kid}, not by the trusted key {key_id(trusted)}",
                           entries=entries)
    if h.get("key_id") != kid:
        return Verdict(False, n, problem="head names another key id than its public key", entries=entries)
    count, last = h.get("count"), h.get("last_hash")
    if not isinstance(count, int) or count < n:
        return Verdict(False, n, problem=f"the head covers {count} entries but the file has {n}: lines "
                                         f"{(count or 0) + 1}..{n} were added after the last signed head",
                       line=(count or 0) + 1, entries=entries)
    if count > n:
        return Verdict(False, n, problem=f"truncated: the head says {count} entries, the file has {n} "
                                         f"(entries {n + 1}..{count} cut)", line=n + 1, entries=entries)
    if last != (entries[-1]["hash"] if entries else GENESIS):
        return Verdict(False, n, problem=f"the head's last hash {str(last)[:16]}... is not line {n}'s: the file was "
                                         "replaced or rewritten", line=n, entries=entries)
    return Verdict(True, n, key_id=kid, entries=entries)


# ---- reading ------------------------------------------------------------------------------------------------

def summarize(entry: Mapping[str, Any]) -> str:
    parts = []
    for name, rec in entry.get("records", {}).items():
        if rec.get("kind") == "arrays":
            parts.append(f"{name}: {len(rec.get('tensors', {}))} tensors")
        elif rec.get("kind") == "metrics":
            parts.append(f"{name}: " + ",".join(rec.get("names", [])))
        else:
            parts.append(f"{name}: " + ",".join(rec.get("keys", [])))
    return "; ".join(parts)


def table(entries: Iterable[Mapping[str, Any]]) -> str:
    rows = [("seq", "time", "run", "round", "dir", "type", "modules", "bytes", "records")]
    for e in entries:
        mods = e.get("modules", [])
        rows.append((str(e.get("seq")), str(e.get("time")), str(e.get("run")), str(e.get("round", "")), str(e.get("dir")),
                     str(e.get("type")) + (f" ERROR {e['error']}" if e.get("error") else ""),
                     ",".join(m.replace("encoders.", "enc:").replace("decoders.", "dec:") for m in mods) or "-",
                     str(e.get("bytes")), summarize(e)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


# ---- CLI: mmn-fed site audit {verify,show} -----------------------------------------------------------------

def register(subparsers) -> None:
    site = subparsers.add_parser("site", help="site-side tools: the audit log of every message in and out")
    sub = site.add_subparsers(dest="site_command", required=True)
    from .kit import register_kit  # mmn-fed site keygen | start: a consortium's site (clients/kit.py)

    register_kit(sub)
    from .site_check import register_check  # mmn-fed site check: pre-flight of the site's data (clients/site_check.py)

    register_check(sub)
    audit = sub.add_parser("audit", help="the site's hash-chained audit log (docs/federation.md)")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="check the chain and the signed head; exit 1 naming the first bad line")
    v.add_argument("log", help=f"{LOG} or the directory holding it")
    v.add_argument("--key", help=f"the site's trusted audit public key ({PUB}, PEM); without it the head's own key "
                                 "is used and its id printed (compare it with the one you recorded)")
    v.add_argument("--head", help=f"the head file (default: {HEAD} beside the log)")
    v.set_defaults(func=_verify_command)
    s = asub.add_parser("show", help="print the log as a table (and verify it)")
    s.add_argument("log")
    s.add_argument("--head")
    s.add_argument("--last", type=int, default=0, help="only the last N entries")
    s.set_defaults(func=_show_command)


def _verify_command(args) -> int:
    verdict = verify(args.log, args.head, args.key)
    if verdict.ok:
        print(verdict.message())
        return 0
    print(f"audit log NOT intact: {verdict.message()}", file=sys.stderr)
    return 1


def _show_command(args) -> int:
    verdict = verify(args.log, args.head, require_head=False)
    entries = verdict.entries
    if not verdict.ok and not entries:  # show what can be read even when the chain is broken
        path = Path(args.log) / LOG if Path(args.log).is_dir() else Path(args.log)
        entries = []
        for x in path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(x))
            except ValueError:
                entries.append({"seq": "?", "type": "(unreadable line)"})
    print(table(entries[-args.last:] if args.last else entries))
    print(verdict.message() if verdict.ok else f"audit log NOT intact: {verdict.message()}")
    return 0 if verdict.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m clients.audit site audit verify LOG`` (the same command as ``mmn-fed site audit verify``)."""
    parser = argparse.ArgumentParser(prog="python -m clients.audit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
