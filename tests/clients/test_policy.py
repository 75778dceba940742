"""Site policy (clients/policy.py): each rule on its own, then through the ClientApp, then in a federation."""
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from clients.app import app as client_app
from clients.privacy import GaussianAccountant
from clients.policy import (Ledger, Policy, PolicyError, check_budget, load_policy, parse_policy, refusals,
                            suppress_summary)
from mmn_fed import __version__
from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.data import fit_preprocessor, site_summary
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.modules import module_of
from mmn_fed.secagg import SECAGG
from mmn_fed.settings import RunSettings, SiteSettings

MC = ModelConfig(state_size=8, hidden=8)


def settings_record(**kw) -> str:
    return RunSettings.from_kwargs(**kw).site_record()


def train_content(modules=("init_state", "encoders.demographics", "decoders.disease"), server_round=1, secagg=False,
                  **settings) -> RecordDict:
    arrays = {f"{m}.w": np.zeros(2, np.float32) for m in modules}
    content = RecordDict({P.ARRAYS: R.to_arrayrecord(arrays),
                          P.CONFIG: ConfigRecord({"server-round": server_round, P.SETTINGS: settings_record(**settings)})})
    if secagg:
        content[SECAGG] = ConfigRecord({"inbox": "{}"})
    return content


def reasons(policy, message_type=P.TRAIN, content=None, run="r1", ledger=None):
    return refusals(policy, message_type, content if content is not None else train_content(), run, ledger)[0]


# ---- the file -----------------------------------------------------------------------------------------

def test_policy_file_parses_and_refuses_unknown_keys_and_bad_values(tmp_path):
    p = tmp_path / "policy.toml"
    p.write_text('require_secure_aggregation = true\nmin_cell = 5\nallowed_tasks = ["disease"]\nmax_rounds = 3\n')
    pol = load_policy(p)
    assert (pol.require_secure_aggregation, pol.min_cell, pol.allowed_tasks, pol.max_rounds) == (True, 5, ("disease",), 3)
    assert pol.ledger_path == tmp_path / "policy.ledger.jsonl"
    with pytest.raises(PolicyError, match=r"x\.toml: unknown key\(s\) \['min_cells'\]"):
        parse_policy({"min_cells": 3}, "x.toml")
    with pytest.raises(PolicyError, match="max_rounds must be an integer >= 1"):
        parse_policy({"max_rounds": 0})
    with pytest.raises(PolicyError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("min_cell = ")
        load_policy(tmp_path / "bad.toml")


def test_no_policy_refuses_nothing():
    assert reasons(Policy()) == []


# ---- each rule --------------------------------------------------------------------------------------

def test_secure_aggregation_required_for_train_only():
    pol = Policy(require_secure_aggregation=True)
    assert "not under secure aggregation" in reasons(pol)[0]
    assert reasons(pol, content=train_content(secagg=True)) == []
    assert reasons(pol, P.EVALUATE) == []  # evaluation releases metrics, not updates


def test_noise_multiplier_at_or_above_the_floor():
    pol = Policy(min_noise_multiplier=1.0)
    assert "noise multiplier >= 1 is required; dp-noise-multiplier = 0.5" in reasons(
        pol, content=train_content(dp_noise_multiplier=0.5))[0]
    assert reasons(pol, content=train_content(dp_noise_multiplier=1.0)) == []


def test_privacy_budget_accumulates_across_runs_and_refuses_above_the_ceiling(tmp_path):
    pol = Policy(path=str(tmp_path / "p.toml"), epsilon_ceiling=3.0)
    ledger = Ledger.read(pol.ledger_path)
    assert "has no differential privacy" in check_budget(pol, ledger, "r1", 1, 0.0, 1e-5, 3)[0]
    spent = []
    for run in ("r1", "r2", "r3"):
        for rnd in (1, 2):
            reason, step = check_budget(pol, ledger, run, rnd, 8.0, 1e-5, 3)
            if reason:
                spent.append((run, rnd, reason))
                break
            ledger.append(run, rnd, 1e-5, step)
    # sigma 8, 3 modules: a 2-round run spends ~1.27, so r1 and r2 fit and r3 passes 3.0 in its first round
    # the ledger is on disk, one line per round, and read back the same
    again = Ledger.read(pol.ledger_path)
    assert again.total() == pytest.approx(ledger.total()) and again.total() <= 3.0
    assert len(pol.ledger_path.read_text().splitlines()) == len(ledger.entries)
    assert spent and "above its epsilon_ceiling = 3" in spent[0][2]
    assert again.runs() == ["r1", "r2"] and spent[0][:2] == ("r3", 1)  # earlier runs count
    assert again.run_epsilon("r1") == pytest.approx(GaussianAccountant(8.0, 3, 2).epsilon(1e-5))
    # a round sent twice is counted once
    r1 = again.run_epsilon("r1")
    again.append("r1", 1, 1e-5, again.entries[0]["rdp"])
    assert again.run_epsilon("r1") == pytest.approx(r1)


def test_budget_refusal_through_refusals_names_the_ledger(tmp_path):
    pol = Policy(path=str(tmp_path / "p.toml"), epsilon_ceiling=0.5)
    out = reasons(pol, content=train_content(dp_noise_multiplier=1.0), ledger=Ledger.read(pol.ledger_path))
    assert "epsilon_ceiling = 0.5" in out[0] and "p.ledger.jsonl" in out[0]


def test_max_rounds_per_run():
    pol = Policy(max_rounds=2)
    assert reasons(pol, content=train_content(server_round=2)) == []
    assert "round 3 is past this site's max_rounds = 2" in reasons(pol, content=train_content(server_round=3))[0]


def test_allowed_tasks_modalities_and_columns(heart):
    _, schema = heart
    pol = Policy(allowed_modalities=("demographics",), allowed_tasks=("disease",))
    assert reasons(pol) == []
    out = reasons(pol, P.EVALUATE, train_content(modules=("init_state", "encoders.imaging", "decoders.disease")))
    assert "['encoders.imaging'] are outside the allowed" in out[0]
    assert pol.suppress_counts({"init_state": 50, "encoders.imaging": 50, "encoders.demographics": 50}) == \
        {"init_state": 50, "encoders.demographics": 50}
    summary = RecordDict({P.CONFIG: ConfigRecord({"schema": json.dumps(schema.to_dict()),
                                                  P.SETTINGS: settings_record()})})
    cols = Policy(allowed_columns=tuple(c for c in schema.input_columns if c != "chol") + ("num",))
    assert "column(s) ['chol'] are not in this site's allowed_columns" in reasons(cols, P.SUMMARY, summary)[0]
    assert reasons(Policy(allowed_columns=(*schema.input_columns, "num")), P.SUMMARY, summary) == []


def test_accepted_versions_name_both_versions():
    pol = Policy(accepted_versions=("9.*",))
    out = reasons(pol)
    assert f"the server runs mmn-fed {__version__}, this site runs mmn-fed {__version__}" in out[0]
    assert "['9.*']" in out[0]
    assert reasons(Policy(accepted_versions=(__version__.rsplit(".", 1)[0] + ".*",))) == []
    assert json.loads(settings_record())["mmn-fed-version"] == __version__  # the server sends it in every message


def test_small_cells_are_suppressed_in_the_summary(heart):
    df, schema = heart
    rows = df[df.dataset == "Switzerland"].reset_index(drop=True)
    full = site_summary(schema, rows)
    out = suppress_summary(full, 10)
    for section in ("columns", "targets"):
        for c, s in out[section].items():
            if s["kind"] == "categorical":
                assert all(v == 0 or v >= 10 for v in s["counts"].values()), c
            if s["kind"] == "numeric":
                assert s["count"] == 0 or s["count"] >= 10, c
    assert out["suppressed"]["cells"] > 0 and out["suppressed"]["min_cell"] == 10
    assert suppress_summary(full, 1) == full
    with pytest.raises(PolicyError, match="below the policy's min_cell = 1000"):
        suppress_summary(full, 1000)
    records = [{"task": "disease", "metric": "auroc", "value": 0.8, "n": 9},
               {"task": "disease", "metric": "auroc", "value": 0.8, "n": 10}]
    assert Policy(min_cell=10).suppress_records(records) == records[1:]
    # a module fewer than min_cell patients pass through is left out of the profile: the server never sends it
    assert Policy(min_cell=10).suppress_counts({"init_state": 50, "encoders.imaging": 9, "decoders.disease": 50}) == \
        {"init_state": 50, "decoders.disease": 50}


# ---- through the ClientApp ------------------------------------------------------------------------

def _ctx_with_policy(site_context, rows, tmp_path, text, name="Hungary"):
    (tmp_path / "policy.toml").write_text(text)
    ctx = site_context(rows, name)
    ctx.node_config["policy"] = str(tmp_path / "policy.toml")
    return ctx


def test_clientapp_refuses_with_the_site_named_and_suppresses_what_leaves(heart, make_message, site_context, tmp_path):
    df, schema = heart
    rows = df[df.dataset == "Switzerland"].reset_index(drop=True)
    ctx = _ctx_with_policy(site_context, rows, tmp_path, "min_cell = 10\nmax_rounds = 1\n", "Switzerland")
    rec = SiteSettings(val_fraction=0.0, seed=0, audit_min_cell=1).to_record()
    reply = client_app(make_message(P.SUMMARY, RecordDict({"config": ConfigRecord(
        {"schema": json.dumps(schema.to_dict()), P.SETTINGS: rec})})), ctx)
    assert not reply.has_error()
    summary = R.from_json_record(reply.content[P.SUMMARY_RECORD])
    assert summary["suppressed"]["cells"] > 0
    audit = R.from_json_record(reply.content[P.AUDIT_RECORD])
    assert audit["min_cell"] == 10  # the audit ran with the policy's minimum, not the run's 1
    prep = fit_preprocessor(schema, rows)
    params = {k: v.numpy() for k, v in build_from_preprocessor(prep, MC).state_dict().items()
              if module_of(k) in ("init_state", "encoders.demographics", "decoders.disease")}
    cfg = ConfigRecord({"prep": json.dumps(prep.to_dict()), "model-config": json.dumps(MC.to_dict()),
                        "server-round": 2, P.SETTINGS: rec})
    reply = client_app(make_message(P.TRAIN, RecordDict({"arrays": R.to_arrayrecord(params), "config": cfg})), ctx)
    assert reply.has_error()
    assert reply.error.reason.startswith("site policy of 'Switzerland' refuses train: round 2 is past")
    # the profile leaves out a modality the policy does not allow: the server will not send its encoder
    (tmp_path / "policy.toml").write_text('min_cell = 10\nallowed_modalities = ["demographics", "symptoms"]\n')
    reply = client_app(make_message(P.PROFILE, RecordDict({"config": cfg})), ctx)
    assert set(reply.content[P.COUNTS].keys()) == {"init_state", "encoders.demographics", "encoders.symptoms",
                                                   "decoders.disease"}
    reply = client_app(make_message(P.EVALUATE, RecordDict({"arrays": R.to_arrayrecord(params), "config": cfg})), ctx)
    assert not reply.has_error() and all(r["n"] >= 10 for r in R.from_json_record(reply.content[P.RECORDS]))
    # a train message that also scores the received model (the previous round's evaluation, folded in): the
    # same suppression applies to its records, and the train metrics stay
    (tmp_path / "policy.toml").write_text("min_cell = 10\n")
    folded = ConfigRecord({**dict(cfg), P.EVALUATE_ROUND: 1})
    reply = client_app(make_message(P.TRAIN, RecordDict({"arrays": R.to_arrayrecord(params), "config": folded})), ctx)
    records = R.from_json_record(reply.content[P.RECORDS])
    assert not reply.has_error() and records and all(r["n"] >= 10 and r["round"] == 1 for r in records)
    assert "train_loss" in reply.content[P.METRICS]
    (tmp_path / "policy.toml").write_text("min_cell = 100000\n")  # every evaluation cell is too small
    reply = client_app(make_message(P.TRAIN, RecordDict({"arrays": R.to_arrayrecord(params), "config": folded})), ctx)
    assert R.from_json_record(reply.content[P.RECORDS]) == [] and "train_loss" in reply.content[P.METRICS]


# ---- in a federation ------------------------------------------------------------------------------

def run_with_policies(tmp_path, sites, schema, policies: dict[str, str], **settings):
    """The real ServerApp and ClientApps in-process, each site with its own node config (+ ``policy``)."""
    from server.app import app as server_app
    from server.engines.inprocess import InProcessGrid, server_context
    from server.engines.results import write_site_data

    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = Path(settings.pop("run_dir", tmp_path / "run"))
    data_dir = write_site_data(run_dir / "data", sites, schema)
    cfg = RunSettings.from_kwargs(**{"num_server_rounds": 2, "local_epochs": 1, "state_size": 8, "hidden": 8,
                                     "patience_rounds": 0, "keep_best": False, "val_fraction": 0.0, **settings})
    rc = {**cfg.to_run_config(), "data-dir": str(data_dir), "run-dir": str(run_dir)}
    node_configs = []
    for i, name in enumerate(sites):
        nc = {"partition-id": i, "num-partitions": len(sites)}
        if name in policies:
            path = tmp_path / f"{name}.policy.toml"
            path.write_text(policies[name])
            nc["policy"] = str(path)
        node_configs.append(nc)
    grid = InProcessGrid(client_app, node_configs, rc)
    server_app(grid, server_context(rc))
    return run_dir


@pytest.fixture(scope="module")
def small_sites():
    from mmn_fed import load_builtin

    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    return {n: g.reset_index(drop=True) for n, g in df.groupby("dataset") if n in ("Cleveland", "Hungary", "VA Long Beach")}, schema


def test_a_refusing_site_is_logged_by_name_while_the_others_federate(tmp_path, small_sites, caplog):
    sites, schema = small_sites
    run_dir = run_with_policies(tmp_path, sites, schema, {"Hungary": "require_secure_aggregation = true\n",
                                                          "VA Long Beach": "max_rounds = 1\n"})
    failures = json.loads((run_dir / "failures.json").read_text())
    hungary = [f for f in failures if f["site"] == "Hungary"]
    assert {f["round"] for f in hungary} == {"1", "2"}
    assert all(f["phase"] == "train" and "site policy of 'Hungary' refuses train: secure aggregation is required"
               in f["reason"] for f in hungary)
    va = [f for f in failures if f["site"] == "VA Long Beach"]
    assert [f["round"] for f in va] == ["2"] and "past this site's max_rounds = 1" in va[0]["reason"]
    assert not [f for f in failures if f["site"] == "Cleveland"]
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 2 and (run_dir / "model.pt").exists()
    assert "site policy of 'Hungary'" in caplog.text


def test_a_server_on_another_version_is_refused_naming_both_versions(tmp_path, small_sites):
    sites, schema = small_sites
    two = {k: sites[k] for k in ("Cleveland", "Hungary")}
    # a refusal before round 1 (query.summary): the server excludes the site by name with the reason, which names
    # both versions; the other site federates
    run_dir = run_with_policies(tmp_path / "v", two, schema, {"Cleveland": 'accepted_versions = ["9.9.*"]\n'})
    excluded = json.loads((run_dir / "excluded.json").read_text())
    assert list(excluded) == ["Cleveland"]
    assert excluded["Cleveland"].startswith(f"site policy of 'Cleveland' refuses query.summary: the server runs "
                                            f"mmn-fed {__version__}, this site runs mmn-fed {__version__}")
    assert list(json.loads((run_dir / "profile.json").read_text())) == ["Hungary"]
    assert len(json.loads((run_dir / "history.json").read_text())) == 2


def test_the_dp_budget_runs_out_across_runs_at_the_site(tmp_path, small_sites):
    sites, schema = small_sites
    two = {k: sites[k] for k in ("Cleveland", "Hungary")}
    # DP: a ceiling that one 2-round run and the first round of a second fit into (epsilon grows ~ sqrt(rounds)): the
    # second run (another run dir) is refused in its round 2, and Cleveland (no policy) goes on
    modules = 2 + len(schema.modalities)  # Hungary's: init_state, every encoder, the disease decoder
    ceiling = 1.9 * GaussianAccountant(8.0, modules, 2).epsilon(1e-5)
    policy = f"min_noise_multiplier = 8.0\nepsilon_ceiling = {ceiling}\n"
    out = []
    for k in range(2):
        run_dir = run_with_policies(tmp_path / "dp", two, schema, {"Hungary": policy}, dp_noise_multiplier=8.0,
                                    run_dir=str(tmp_path / f"dp{k}"))
        out.append(json.loads((run_dir / "failures.json").read_text()))
    ledger = Ledger.read(tmp_path / "dp" / "Hungary.policy.ledger.jsonl")
    assert len(ledger.runs()) == 2 and ledger.total() <= ceiling
    assert out[0] == [] and [(f["site"], f["round"]) for f in out[1]] == [("Hungary", "2")]
    assert f"epsilon_ceiling = {ceiling:g}" in out[1][0]["reason"]


def test_a_policy_requiring_secure_aggregation_and_this_version_joins_a_secure_run(tmp_path, small_sites):
    sites, schema = small_sites
    three = dict(sites)
    policy = f'require_secure_aggregation = true\naccepted_versions = ["{__version__}"]\nmin_cell = 10\nmax_rounds = 2\n'
    run_dir = run_with_policies(tmp_path, three, schema, {"Hungary": policy}, secure_aggregation=True)
    assert json.loads((run_dir / "failures.json").read_text()) == []
    assert "Hungary" in json.loads((run_dir / "profile.json").read_text())
    secagg = json.loads((run_dir / "secagg.json").read_text())
    assert secagg and all(not r.get("dropped") for r in secagg)
