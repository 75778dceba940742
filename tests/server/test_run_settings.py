"""The settings model at the server: checked once before any message, run_federation's keyword settings,
deploy-local's flags, and checkpoints written before a setting existed."""
import json

import pytest
import torch

from clients.app import app as client_app
from mmn_fed.settings import DEFAULTS, SettingsError
from server.app import app as server_app
from server.engines import run_federation, write_site_data
from server.engines.inprocess import InProcessGrid, server_context

FAST = {"local_epochs": 1, "state_size": 8, "hidden": 8}


class CountingGrid(InProcessGrid):
    """The in-process grid, recording the type of every message the server sends."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += [m.metadata.message_type for m in messages]
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("bad, names", [
    ({"secure-aggregation": True, "aggregation": "median"}, "secure-aggregation, aggregation"),
    ({"keep-best": True, "val-fraction": 0.0}, "keep-best, val-fraction"),
    ({"dp-delta": 1.5}, "dp-delta"),
    ({"keep-best": "yes"}, "keep-best"),
    ({"local-epoch": 2}, "local-epoch"),
])
def test_an_invalid_run_config_fails_at_the_server_before_any_message(heart_sites, tmp_path, bad, names):
    sites, schema = heart_sites
    small = {n: df.iloc[:40] for n, df in list(sites.items())[:2]}
    rc = {"num-server-rounds": 1, "data-dir": str(write_site_data(tmp_path / "data", small, schema)),
          "run-dir": str(tmp_path / "run"), "state-size": 8, "hidden": 8, **bad}
    grid = CountingGrid(client_app,
                        [{"partition-id": i, "num-partitions": 2} for i in range(2)], rc)
    with pytest.raises(SettingsError) as e:
        server_app(grid, server_context(rc))
    assert e.value.setting == names
    assert grid.sent == []  # no site was asked anything, let alone to train
    assert not (tmp_path / "run").exists()


def test_the_same_run_config_is_accepted_once_fixed(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:40] for n, df in list(sites.items())[:2]}
    rc = {"num-server-rounds": 1, "data-dir": str(write_site_data(tmp_path / "data", small, schema)),
          "run-dir": str(tmp_path / "run"), "state-size": 8, "hidden": 8, "keep-best": True, "val-fraction": 0.25}
    grid = CountingGrid(client_app,
                        [{"partition-id": i, "num-partitions": 2} for i in range(2)], rc)
    server_app(grid, server_context(rc))
    assert grid.sent.count("train") == 2


def test_run_federation_holds_out_the_default_val_fraction(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:50] for n, df in list(sites.items())[:2]}
    res = run_federation(small, schema, rounds=1, run_dir=tmp_path / "run", **FAST)
    assert DEFAULTS.val_fraction == 0.2
    fed = [r for r in res.evaluations if r["metric"] == "auroc"]
    assert {r["split"] for r in fed} == {"validation"}
    assert all(r["n"] == 10 for r in fed)  # 20% of each site's 50 rows
    explicit = run_federation(small, schema, rounds=1, run_dir=tmp_path / "all", val_fraction=0.0, keep_best=False, patience_rounds=0, **FAST)
    assert {(r["split"], r["n"]) for r in explicit.evaluations if r["metric"] == "auroc"} == {("train", 50)}


def test_run_federation_refuses_an_unknown_or_bad_setting_before_writing_anything(heart_sites, tmp_path):
    sites, schema = heart_sites
    with pytest.raises(SettingsError, match="local_epoch: unknown setting; known settings: .*local_epochs"):
        run_federation(sites, schema, run_dir=tmp_path / "run", local_epoch=2)
    with pytest.raises(SettingsError, match="trim: expected a value in"):
        run_federation(sites, schema, run_dir=tmp_path / "run", trim=0.6)
    with pytest.raises(SettingsError, match="num-server-rounds: given twice"):
        run_federation(sites, schema, rounds=2, num_server_rounds=3, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_fingerprint_lacks_newer_settings_still_resumes(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:40] for n, df in list(sites.items())[:2]}
    first = run_federation(small, schema, rounds=1, run_dir=tmp_path / "run", val_fraction=0.0, keep_best=False, patience_rounds=0, **FAST)
    path = tmp_path / "run" / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    # the format written before the security settings existed: those at their default are absent
    old = {k: v for k, v in json.loads(ck["config"]).items()
           if k not in ("aggregation", "trim", "secure_aggregation", "dp_clip", "dp_noise_multiplier", "dp_delta")}
    torch.save({**ck, "config": json.dumps(old, sort_keys=True)}, path)
    resumed = run_federation(small, schema, rounds=2, run_dir=tmp_path / "run", val_fraction=0.0, keep_best=False, patience_rounds=0, **FAST)
    assert [h["round"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # round 1 came from the checkpoint, not from a new run


def test_deploy_local_flags_are_the_settings_and_a_bad_combination_stops_before_any_process(tmp_path):
    from mmn_fed.cli import build_parser

    argv = ["deploy-local", "--out", str(tmp_path / "out"), "--rounds", "3", "--no-keep-best", "--lr", "0.01",
            "--secure-aggregation", "--aggregation", "median"]
    args = build_parser(argv).parse_args(argv)
    assert (args.num_server_rounds, args.keep_best, args.lr, args.val_fraction) == (3, False, 0.01, DEFAULTS.val_fraction)
    with pytest.raises(SettingsError, match="^secure-aggregation, aggregation: "):
        args.func(args)
    assert not (tmp_path / "out").exists()


def test_deploy_local_site_policy_is_checked_first_and_each_site_gets_its_own_copy(tmp_path):
    from clients.policy import PolicyError, load_policy
    from mmn_fed.cli import build_parser
    from server.engines.deployment import site_policies

    bad = tmp_path / "bad.toml"
    bad.write_text("min_cell = 10\nmax_round = 5\n")  # a misspelt key: refused before any process starts
    argv = ["deploy-local", "--out", str(tmp_path / "out"), "--site-policy", str(bad)]
    args = build_parser(argv).parse_args(argv)
    with pytest.raises(PolicyError, match=r"bad\.toml.*max_round"):
        args.func(args)
    assert not (tmp_path / "out").exists()
    good = tmp_path / "policy.toml"
    good.write_text("min_cell = 10\nmax_rounds = 5\n")
    cfg = site_policies(good, ["Cleveland", "VA Long Beach"], tmp_path / "out" / "policies")
    assert cfg == {"Cleveland": {"policy": str(tmp_path / "out" / "policies" / "Cleveland.toml")},
                   "VA Long Beach": {"policy": str(tmp_path / "out" / "policies" / "VA_Long_Beach.toml")}}
    assert {load_policy(c["policy"]).max_rounds for c in cfg.values()} == {5}  # each its own file, own ledger
    assert len({load_policy(c["policy"]).ledger_path for c in cfg.values()}) == 2


def test_a_failed_deployment_run_is_named_by_the_servers_exception():
    from server.engines.deployment import run_failure

    out = ("\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\nTraceback (most recent call last):\n"
           '  File "x.py", line 1, in run\nValueError: an inner cause\n\nDuring handling ...\n'
           "server.app.FederationError: round 2: no site returned an update; failures: [...]\n"
           "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n")
    assert run_failure(out) == "FederationError: round 2: no site returned an update; failures: [...]"
    assert run_failure("INFO: round 1 ok\n") is None
