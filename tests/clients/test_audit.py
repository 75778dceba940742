"""The site audit log (clients/audit.py): every edit, insertion, removal, reordering, truncation and forged head
is caught and named by line; appends from many processes keep one valid chain; a real federation leaves a
log at each site with every round's messages in and out, and no values."""
import argparse
import json
import multiprocessing as mp
from importlib.metadata import EntryPoint

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, RecordDict

from clients import audit as A
from mmn_fed.cli import COMMANDS, add_commands


def entry(i: int) -> dict:
    return {"dir": "in" if i % 2 else "out", "run": 7, "node": 1000, "round": i // 4, "type": "train",
            "message_id": f"m{i}", "reply_to": "", "bytes": 100 + i, "modules": ["encoders.labs"],
            "records": {"arrays": {"kind": "arrays", "tensors": {"encoders.labs.net.0.weight": "float32[8,3]"},
                                   "bytes": 96}}}


@pytest.fixture
def log(tmp_path):
    """A site directory with a 10-entry log and its signed head."""
    lg = A.AuditLog(tmp_path / "site", "site-a")
    for i in range(10):
        lg.append(entry(i))
    return lg


def lines(lg) -> list[bytes]:
    return lg.path.read_bytes().splitlines(keepends=True)


def write(lg, ls) -> None:
    lg.path.write_bytes(b"".join(ls))


def rehash(raw: bytes, **changes) -> bytes:
    """A line edited by someone who also recomputes its own hash (but cannot fix what follows)."""
    e = {**json.loads(raw), **changes}
    e["hash"] = A.entry_hash(e)
    return A.canonical(e) + b"\n"


def test_an_intact_log_verifies_and_the_head_names_the_key(log):
    v = A.verify(log.path)
    assert v.ok, v.message()
    kid = A.key_id(A.load_public_key(log.dir / A.PUB))
    assert v.message() == f"10 entries, chain intact, head signed by {kid}"
    assert A.verify(log.dir, key=log.dir / A.PUB).ok  # the directory works too, and the trusted key matches
    head = json.loads(log.head_path.read_text())
    assert head["count"] == 10 and head["last_hash"] == json.loads(lines(log)[-1])["hash"]
    assert (log.dir / A.KEY).stat().st_mode & 0o077 == 0  # the signing key is owner-only
    first = json.loads(lines(log)[0])
    assert first["prev"] == A.GENESIS and first["seq"] == 1 and first["site"] == "site-a"


def test_an_edited_line_is_named(log):
    ls = lines(log)
    ls[2] = ls[2].replace(b'"bytes":102', b'"bytes":1')
    write(log, ls)
    v = A.verify(log.path)
    assert not v.ok and v.line == 3 and "edited" in v.problem


def test_an_edited_line_with_its_own_hash_recomputed_breaks_the_next_link(log):
    ls = lines(log)
    ls[2] = rehash(ls[2], type="evaluate")
    write(log, ls)
    v = A.verify(log.path)
    assert not v.ok and v.line == 4 and "chain broken" in v.problem


def test_whitespace_is_an_edit_too(log):
    ls = lines(log)
    ls[5] = ls[5].replace(b'"dir":', b'"dir": ')
    write(log, ls)
    v = A.verify(log.path)
    assert not v.ok and v.line == 6 and "edited" in v.problem


def test_an_inserted_line_is_named(log):
    ls = lines(log)
    write(log, ls[:4] + [ls[1]] + ls[4:])  # a copy of entry 2 after entry 4
    v = A.verify(log.path)
    assert not v.ok and v.line == 5 and "entry 2 again or out of place" in v.problem
    # a forged entry numbered and chained correctly is caught at the line after it
    forged = rehash(ls[3], seq=5, prev=json.loads(ls[3])["hash"], type="query.summary")
    write(log, ls[:4] + [forged] + ls[4:])
    v = A.verify(log.path)
    assert not v.ok and v.line == 6


def test_a_removed_line_is_named(log):
    ls = lines(log)
    write(log, ls[:3] + ls[4:])
    v = A.verify(log.path)
    assert not v.ok and v.line == 4 and "removed" in v.problem and "4..4" in v.problem


def test_a_reordered_pair_is_named(log):
    ls = lines(log)
    ls[4], ls[5] = ls[5], ls[4]
    write(log, ls)
    v = A.verify(log.path)
    assert not v.ok and v.line == 5 and "out of order: entry 5 is at line 6" in v.problem


def test_a_truncated_file_is_caught_by_the_signed_head(log):
    ls = lines(log)
    write(log, ls[:-2])  # the chain of the 8 left is valid: only the head can tell
    v = A.verify(log.path)
    assert not v.ok and v.line == 9 and "truncated" in v.problem and "10" in v.problem
    write(log, [])
    assert not A.verify(log.path).ok  # emptied
    log.path.unlink()
    assert not A.verify(log.dir).ok  # gone


def test_lines_after_the_signed_head_and_a_partial_line_are_caught(log):
    ls = lines(log)
    extra = rehash(ls[-1], seq=11, prev=json.loads(ls[-1])["hash"])
    write(log, ls + [extra])
    v = A.verify(log.path)
    assert not v.ok and v.line == 11 and "after the last signed head" in v.problem
    write(log, ls + [b'{"seq":11'])
    v = A.verify(log.path)
    assert not v.ok and v.line == 11 and "partial" in v.problem
    with pytest.raises(A.AuditError, match="partial line"):  # and nothing more is appended to it
        log.append(entry(11))
    write(log, ls[:-1] + [b"not json\n"])
    with pytest.raises(A.AuditError, match="unreadable"):  # a site whose log was tampered with stops
        log.append(entry(11))


def test_a_forged_head_is_caught(log, tmp_path):
    good = log.head_path.read_text()
    head = json.loads(good)
    ls = lines(log)
    write(log, ls[:-2])
    # 1. the head edited to match the cut file, without the key: the signature fails
    head.update(count=8, last_hash=json.loads(ls[7])["hash"])
    log.head_path.write_text(json.dumps(head))
    v = A.verify(log.path)
    assert not v.ok and "signature invalid" in v.problem
    # 2. re-signed with another key: consistent on its own, refused against the site's trusted key
    other = Ed25519PrivateKey.generate()
    body = {k: v for k, v in head.items() if k != "signature"}
    body.update(key_id=A.key_id(other.public_key()), public_key=__import__("base64").b64encode(
        other.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode())
    body["signature"] = __import__("base64").b64encode(other.sign(A.canonical(body))).decode()
    log.head_path.write_text(json.dumps(body))
    assert A.verify(log.path).ok  # self-consistent: hence the printed key id, and --key
    v = A.verify(log.path, key=log.dir / A.PUB)
    assert not v.ok and "not by the trusted key" in v.problem
    # 3. no head at all
    log.head_path.unlink()
    v = A.verify(log.path)
    assert not v.ok and "no head" in v.problem


def _append_many(directory: str, worker: int, n: int) -> None:
    lg = A.AuditLog(directory, "site-a")
    for i in range(n):
        lg.append({**entry(i), "message_id": f"w{worker}-{i}"})


def test_appends_from_many_processes_keep_one_valid_chain(tmp_path):
    """Flower starts a ClientApp process per message: appends (and the first-use key) race."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path / "site"), w, 60)) for w in range(5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    v = A.verify(tmp_path / "site")
    assert v.ok, v.message()
    assert v.count == 300 and len({e["message_id"] for e in v.entries}) == 300


def test_where_the_log_lives(tmp_path):
    loc = A.locate
    assert loc({"data-path": "/data/h/site_a.csv", "site-name": "A"}, {}) == (A.Path("/data/h/mmn-fed-audit/A"), "A")
    assert loc({"data-path": "/data/h/site_a.csv", "audit-dir": "/var/audit"}, {}) == (A.Path("/var/audit"), "site_a")
    assert loc({"data-path": "/data/h/site_a.csv", "audit-dir": "off"}, {})[0] is None
    assert loc({"partition-id": 0, "num-partitions": 2}, {"dataset": "heart"})[0] is None  # built-in: no log
    (tmp_path / "sites.json").write_text(json.dumps({"sites": [{"name": "Basel", "file": "site_0.csv"}]}))
    sim = {"partition-id": 0, "num-partitions": 1}
    assert loc(sim, {"data-dir": str(tmp_path)})[0] is None  # simulations: off unless asked for
    assert loc(sim, {"data-dir": str(tmp_path), "site-audit": True}) == (tmp_path / "audit" / "Basel", "Basel")


def test_the_cli_verifies_and_shows(log, capsys):
    parser = argparse.ArgumentParser(prog="mmn-fed")
    add_commands(parser.add_subparsers(dest="command"), [EntryPoint("site", "clients.audit:register", COMMANDS)], "site")

    def run(*argv):
        args = parser.parse_args(list(argv))
        return args.func(args)

    assert run("site", "audit", "verify", str(log.path), "--key", str(log.dir / A.PUB)) == 0
    assert "10 entries, chain intact, head signed by" in capsys.readouterr().out
    assert run("site", "audit", "show", str(log.dir), "--last", "3") == 0
    out = capsys.readouterr().out
    assert "float32" not in out and "arrays: 1 tensors" in out and out.count("\n") == 5  # header + 3 + verdict
    ls = lines(log)
    write(log, ls[:6] + ls[7:])
    assert run("site", "audit", "verify", str(log.path)) == 1
    assert "line 7: sequence number 8, expected 7: entries 7..7 removed" in capsys.readouterr().err


# ---- through the real ClientApp -------------------------------------------------------------------------

def test_a_failing_handler_is_logged_by_exception_type_only(heart, make_message, site_context):
    from clients.app import app as client_app

    df, _ = heart
    ctx = site_context(df.iloc[:40], run_config={})
    with pytest.raises(Exception) as raised:
        client_app(make_message("query.summary", RecordDict({"config": ConfigRecord({"schema": "{not json"})})), ctx)
    v = A.verify(A.locate(ctx.node_config, ctx.run_config)[0])
    assert v.ok and [e["dir"] for e in v.entries] == ["in", "out"]
    assert v.entries[1]["error"] == type(raised.value).__name__ and "not json" not in json.dumps(v.entries)
    assert v.entries[0]["records"]["config"] == {"kind": "config", "keys": ["schema"], "bytes": 9}


ALLOWED = {"v", "seq", "time", "site", "dir", "run", "node", "round", "type", "message_id", "reply_to", "records",
           "modules", "bytes", "error", "prev", "hash"}


@pytest.mark.parametrize("engine", ["inprocess", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_federation_leaves_a_verified_log_at_each_site(tmp_path, engine):
    """In-process and on Flower's simulation engine (Ray: the ClientApp runs in worker processes)."""
    from mmn_fed import load_builtin
    from server.engines import run_federation

    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    sites = {n: g.reset_index(drop=True).iloc[:60] for n, g in df.groupby("dataset") if n in ("Cleveland", "Hungary")}
    res = run_federation(sites, schema, rounds=2, run_dir=tmp_path / "run", local_epochs=1, state_size=8, hidden=8,
                         site_audit=True, engine=engine)
    sent = {m: p.shape for m, p in res.trained.model.state_dict().items()}
    for name in sites:
        directory = tmp_path / "run" / "data" / "audit" / name
        v = A.verify(directory, key=directory / A.PUB)
        assert v.ok, v.message()
        es = v.entries
        assert all(set(e) <= ALLOWED and e["site"] == name and not e.get("error") for e in es)
        kinds = [(e["round"], e["type"], e["dir"]) for e in es]
        for t in ("query.summary", "query.profile"):
            assert (0, t, "in") in kinds and (0, t, "out") in kinds
        # one train message per round (round 1 is scored inside round 2's) and the last round's evaluate
        for r, t in ((1, "train"), (2, "train"), (2, "evaluate")):
            assert kinds.count((r, t, "in")) == 1 and kinds.count((r, t, "out")) == 1, (name, r, t)
        assert kinds.count((1, "evaluate", "in")) == 0
        train_in = next(e for e in es if e["type"] == "train" and e["dir"] == "in")
        train_out = next(e for e in es if e["type"] == "train" and e["dir"] == "out")
        tensors = train_in["records"]["arrays"]["tensors"]
        assert tensors == {k: f"float32[{','.join(map(str, sent[k]))}]" for k in tensors}  # names and shapes
        assert train_out["records"]["arrays"]["tensors"] == tensors and train_out["modules"] == train_in["modules"]
        assert train_out["reply_to"] == train_in["message_id"]
        assert train_out["records"]["metrics"]["names"] == ["n", "steps", "train_loss"]
        # bytes as serialized (Flower ships each tensor in .npy format: the float32 values plus a short header)
        values = 4 * sum(__import__("math").prod(sent[k]) for k in tensors)
        assert 0 < train_in["records"]["arrays"]["bytes"] - values <= 200 * len(tensors)
        assert train_in["bytes"] > train_in["records"]["arrays"]["bytes"]
        ev = next(e for e in es if e["type"] == "evaluate" and e["dir"] == "out")
        assert {"disease/brier", "disease/n"} <= set(ev["records"]["metrics"]["names"])
        # no value anywhere: a metric's value or a row's value would need a key other than these
        assert all(set(r) <= {"kind", "tensors", "names", "keys", "bytes"} for e in es for r in e["records"].values())
        # tamper with one line: verification names it
        ls = (directory / A.LOG).read_bytes().splitlines(keepends=True)
        ls[5] = ls[5].replace(b'"dir":"out"', b'"dir":"in"') if b'"dir":"out"' in ls[5] else ls[5].replace(
            b'"dir":"in"', b'"dir":"out"')
        (directory / A.LOG).write_bytes(b"".join(ls))
        v = A.verify(directory)
        assert not v.ok and v.line == 6
        assert A.main(["site", "audit", "verify", str(directory)]) == 1


def test_secure_aggregation_rounds_are_logged_with_the_masked_reply(tmp_path):
    """The audit mod is outermost: it logs the secure-aggregation queries and the train reply as it leaves
    (masked), not the plaintext update."""
    from mmn_fed import load_builtin
    from server.engines import run_federation

    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    sites = {n: g.reset_index(drop=True).iloc[:50] for n, g in df.groupby("dataset") if n != "Switzerland"}
    run_federation(sites, schema, rounds=1, run_dir=tmp_path / "run", local_epochs=1, state_size=8, hidden=8,
                   secure_aggregation=True, site_audit=True)
    for name in sites:
        v = A.verify(tmp_path / "run" / "data" / "audit" / A.safe_name(name))  # "VA Long Beach" -> VA_Long_Beach
        assert v.ok, v.message()
        types = {(e["type"], e["dir"]) for e in v.entries}
        assert {("query.secagg_keys", "in"), ("query.secagg_shares", "out"), ("query.secagg_unmask", "out")} <= types
        train_out = next(e for e in v.entries if e["type"] == "train" and e["dir"] == "out")
        assert "arrays" not in train_out["records"] and all(
            t.startswith("uint64") for r in train_out["records"].values() if r["kind"] == "arrays"
            for t in r["tensors"].values()), train_out["records"]


@pytest.mark.slow
def test_deployed_sites_log_by_default_across_flowers_per_message_processes(tmp_path):
    """Flower's deployment engine starts one ClientApp process per message: each site's log beside its data
    (node config data-path, no audit setting) holds one verified chain of every message."""
    from mmn_fed import load_builtin
    from server.engines.deployment import run_deployment

    df, _ = load_builtin("heart")
    two = {n: g.reset_index(drop=True).iloc[:60] for n, g in df.groupby("dataset") if n in ("Cleveland", "Hungary")}
    rc = {"num-server-rounds": 1, "local-epochs": 1, "state-size": 8, "hidden": 8, "tasks": "disease",
          "dataset": "heart", "seed": 0, "run-dir": str(tmp_path / "run")}
    run_deployment(two, rc, tmp_path / "deploy", tls=False, auth=False)
    for name in two:
        directory = tmp_path / "deploy" / "site_data" / A.DEPLOYMENT_SUBDIR / name
        v = A.verify(directory, key=directory / A.PUB)
        assert v.ok, v.message()
        kinds = [(e["type"], e["dir"]) for e in v.entries]
        for t in ("query.summary", "query.profile", "train", "evaluate"):
            assert kinds.count((t, "in")) == 1 and kinds.count((t, "out")) == 1, (name, kinds)
        assert len({e["run"] for e in v.entries}) == 1 and v.entries[0]["run"] != 1  # Flower's own run id
