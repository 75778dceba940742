"""The real ServerApp and ClientApp (in-process engine) with the security switches of the run config:
``secure-aggregation`` (the final model equals the plaintext run's within the quantization error, no site's
parameters reach the server, a site dropping mid-round is survived), always-on update validation (a malformed
update is rejected and logged while the round goes on), ``aggregation`` (robust rules selectable) and the DP
keys reaching the sites."""

import json
import logging

import numpy as np
import pytest

import clients.app as A
from mmn_fed import load_builtin, load_model
from mmn_fed import records as R
from mmn_fed.secagg import MASKED, SECAGG
from mmn_fed.settings import SettingsError
from server import app as server_app_module
from server.app import FederationConfig
from server.engines import run_federation, write_site_data
from server.engines.inprocess import InProcessGrid, server_context
from server.strategy import ModularFedAvg, SecureModularFedAvg

N_SITES = 4


@pytest.fixture(scope="module")
def heart(tmp_path_factory):
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    sites = {str(n): g.iloc[:80].reset_index(drop=True) for n, g in df.groupby("dataset")}
    return sites, schema, write_site_data(tmp_path_factory.mktemp("data"), sites, schema)


def run(tmp_path, data_dir, name, client=None, spy=None, rounds=2, **extra):
    """The default ServerApp over ``client`` (default: the real ClientApp) with run config ``extra``."""
    rc = {"num-server-rounds": rounds, "seed": 0, "val-fraction": 0.0, "keep-best": False, "patience-rounds": 0, "data-dir": str(data_dir),
          "run-dir": str(tmp_path / name), "local-epochs": 1, "state-size": 8, "hidden": 8, **extra}
    app = client or A.app

    def spying(msg, ctx):
        reply = app(msg, ctx)
        if spy is not None:
            spy.append((msg, reply))
        return reply

    grid = InProcessGrid(spying, [{"partition-id": i, "num-partitions": N_SITES} for i in range(N_SITES)], rc)
    server_app_module.app(grid, server_context(rc))
    out = tmp_path / name
    params = {k: v.numpy() for k, v in load_model(out / "model.pt").model.state_dict().items()}
    return params, json.loads((out / "history.json").read_text())


def max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# ---- secure aggregation ------------------------------------------------------------------------

def test_the_switch_picks_the_strategy():
    assert type(FederationConfig.from_run_config({}).strategy()) is ModularFedAvg
    cfg = FederationConfig.from_run_config({"secure-aggregation": True, "timeout": 60.0})
    strategy = cfg.strategy()
    assert isinstance(strategy, SecureModularFedAvg) and strategy.secagg_timeout == 60.0
    with pytest.raises(SettingsError, match="secure aggregation"):
        FederationConfig.from_run_config({"secure-aggregation": "true", "aggregation": "median"}).strategy()
    with pytest.raises(SettingsError, match="unknown"):
        FederationConfig.from_run_config({"aggregation": "mode"}).strategy()


def test_secure_federation_ends_at_the_plaintext_model(tmp_path, heart):
    """Same sites, seed and settings: the secure run's outputs (final model, per-round training loss and
    federated evaluation, evaluation.json) are the plaintext run's, within the fixed-point error."""
    plain, plain_history = run(tmp_path, heart[2], "plain")
    seen = []
    secure, history = run(tmp_path, heart[2], "secure", spy=seen, **{"secure-aggregation": True})
    assert plain.keys() == secure.keys()
    for k in plain:  # fixed point with 24 fractional bits
        np.testing.assert_allclose(secure[k], plain[k], rtol=0, atol=1e-5, err_msg=k)
    assert [h["round"] for h in history] == [h["round"] for h in plain_history] == [1, 2]
    for h, p in zip(history, plain_history):
        assert h["train"]["sites"] == p["train"]["sites"] == N_SITES
        assert h["train"]["train_loss"] == pytest.approx(p["train"]["train_loss"], abs=1e-6)
        assert h["federated_eval"] == pytest.approx(p["federated_eval"], abs=1e-4)
    assert plain_history[0]["federated_eval"] != plain_history[1]["federated_eval"]  # round 2 moved the model
    evaluations = {name: {(r["site"], r["round"], r["metric"]): r["value"]
                          for r in json.loads((tmp_path / name / "evaluation.json").read_text())}
                   for name in ("plain", "secure")}
    assert evaluations["secure"].keys() == evaluations["plain"].keys()
    assert evaluations["secure"] == pytest.approx(evaluations["plain"], abs=1e-4, nan_ok=True)  # NaN: one class only
    train = [(m, r) for m, r in seen if m.metadata.message_type == "train"]
    assert len(train) == 2 * N_SITES
    for m, r in train:  # the server sends plaintext global modules, gets back only masked vectors
        assert "arrays" in m.content and SECAGG in m.content
        assert "arrays" not in r.content and "counts" not in r.content and MASKED in r.content
    types = [m.metadata.message_type for m, _ in seen]
    assert types.count("query.secagg_keys") == types.count("query.secagg_unmask") == 2 * N_SITES
    assert [len(h["secagg"]["survivors"]) for h in history] == [N_SITES, N_SITES]
    assert all(h["secagg"]["bytes_up"] > 0 for h in history)
    assert json.loads((tmp_path / "secure" / "secagg.json").read_text())[0]["round"] == 1


def test_plaintext_messages_carry_no_secagg_records(tmp_path, heart):
    seen = []
    run(tmp_path, heart[2], "plain-only", spy=seen, rounds=1)
    assert not any(m.metadata.message_type.startswith("query.secagg") for m, _ in seen)
    assert all("arrays" in r.content and MASKED not in r.content for m, r in seen if m.metadata.message_type == "train")


def test_a_site_dropping_mid_round_is_survived(tmp_path, heart):
    def flaky(msg, ctx):  # partition 2 goes down after sharing its keys in round 2
        if (msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 2
                and int(msg.content["config"]["server-round"]) == 2):
            raise ConnectionError("site lost its network")
        return A.app(msg, ctx)

    _, history = run(tmp_path, heart[2], "dropout", client=flaky, **{"secure-aggregation": True})
    assert [len(h["secagg"]["survivors"]) for h in history] == [4, 3] and len(history[1]["secagg"]["dropped"]) == 1
    assert history[1]["train"]["sites"] == 3
    assert any("lost its network" in f["reason"] for f in history[1]["failures"])
    assert (tmp_path / "dropout" / "model.pt").exists()


def test_too_few_sites_leave_the_model_unchanged_and_the_run_goes_on(tmp_path, heart):
    def mostly_down(msg, ctx):  # in round 2 only one site trains: below the threshold (3 of 4)
        if (msg.metadata.message_type == "train" and ctx.node_config["partition-id"] != 0
                and int(msg.content["config"]["server-round"]) == 2):
            raise ConnectionError("down")
        return A.app(msg, ctx)

    one, _ = run(tmp_path, heart[2], "one-round", rounds=1, **{"secure-aggregation": True})
    two, history = run(tmp_path, heart[2], "aborted", client=mostly_down, **{"secure-aggregation": True})
    assert max_diff(one, two) == 0.0  # round 2 was aborted: the model after round 1 stands
    assert history[1]["train"]["sites"] == 0
    assert any(f["phase"] == "secagg" for f in history[1]["failures"])


# ---- validation (always on) -------------------------------------------------------------------

def corrupting(partition: int, corrupt):
    """A ClientApp whose site ``partition`` corrupts its train reply's arrays with ``corrupt(arrays)``."""
    from flwr.app import Array, ArrayRecord

    def app(msg, ctx):
        reply = A.app(msg, ctx)
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == partition:
            arrays = R.from_arrayrecord(reply.content["arrays"])
            reply.content["arrays"] = R.to_arrayrecord(corrupt(arrays))
        return reply
    return app


def with_nan(arrays):
    k = sorted(arrays)[0]
    bad = arrays[k].copy()
    bad.flat[0] = np.nan
    return {**arrays, k: bad}


def wrong_shape(arrays):
    k = next(k for k in sorted(arrays) if k.startswith("decoders."))
    return {**arrays, k: np.zeros(arrays[k].size + 1, dtype=arrays[k].dtype)}


def boosted(arrays):  # 1000 x the weights: far outside the round's other update norms
    return {k: (v * 1000).astype(v.dtype) for k, v in arrays.items()}


@pytest.mark.parametrize("corrupt, reason", [(with_nan, "non-finite"), (wrong_shape, "has shape"),
                                             (boosted, "update norm")])
def test_a_malformed_update_is_rejected_and_logged_while_the_round_completes(tmp_path, heart, caplog, corrupt, reason):
    names = sorted(heart[0])
    bad_site = names[1]  # partition 1 (sites are written in the groupby order, which is sorted)
    with caplog.at_level(logging.WARNING):
        params, history = run(tmp_path, heart[2], corrupt.__name__, client=corrupting(1, corrupt))
    assert all(np.all(np.isfinite(v)) for v in params.values())
    for h in history:
        assert list(h["rejected"]) == [bad_site] and reason in h["rejected"][bad_site]
        assert h["train"]["sites"] == N_SITES - 1 and h["train"]["rejected"] == 1
    assert any(bad_site in r.message and reason in r.message for r in caplog.records if r.levelno >= logging.WARNING)
    failures = json.loads((tmp_path / corrupt.__name__ / "failures.json").read_text())
    assert {(f["round"], f["phase"], f["site"]) for f in failures} == {(1, "validation", bad_site),
                                                                       (2, "validation", bad_site)}


def test_the_rejected_site_does_not_touch_the_model(tmp_path, heart):
    """A NaN-sending site is excluded: the result is the federation of the other three sites' updates
    (its own update would have moved the model)."""
    def down(msg, ctx):  # site 1 sends nothing at all in training
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 1:
            raise ConnectionError("down")
        return A.app(msg, ctx)

    rejected, _ = run(tmp_path, heart[2], "nan", client=corrupting(1, with_nan), rounds=1)
    without, _ = run(tmp_path, heart[2], "without", client=down, rounds=1)
    honest, _ = run(tmp_path, heart[2], "honest", rounds=1)
    assert all(np.array_equal(rejected[k], without[k]) for k in rejected)
    assert max_diff(rejected, honest) > 1e-6


def test_a_masked_update_of_the_wrong_shape_is_rejected_under_secure_aggregation(tmp_path, heart):
    from flwr.app import Array, ArrayRecord

    def bad_masked(msg, ctx):
        reply = A.app(msg, ctx)
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 3:
            rec = reply.content[MASKED]
            reply.content[MASKED] = ArrayRecord({m: Array(rec[m].numpy()[:-1].copy()) for m in rec.keys()})
        return reply

    _, history = run(tmp_path, heart[2], "bad-masked", client=bad_masked, rounds=1, **{"secure-aggregation": True})
    bad_site = sorted(heart[0])[3]
    assert history[0]["secagg"]["survivors"] == sorted(heart[0])[:3]
    assert bad_site in history[0]["rejected"] and "masked vector" in history[0]["rejected"][bad_site]


# ---- robust aggregation and DP through run_federation -----------------------------------------

@pytest.mark.parametrize("aggregation", ["trimmed-mean", "median"])
def test_robust_aggregation_is_selectable(tmp_path, heart, aggregation):
    sites, schema, _ = heart
    fast = dict(rounds=1, local_epochs=1, state_size=8, hidden=8, val_fraction=0.0, keep_best=False, patience_rounds=0)
    mean = run_federation(sites, schema, run_dir=tmp_path / "mean", **fast)
    robust = run_federation(sites, schema, run_dir=tmp_path / aggregation, aggregation=aggregation, trim=0.25, **fast)
    a = mean.trained.model.state_dict()
    b = robust.trained.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-7  # another rule, another model
    assert robust.history[0]["train"]["sites"] == 4


def test_dp_settings_reach_the_sites_and_the_budget_is_reported(tmp_path, heart):
    sites, schema, _ = heart
    res = run_federation(sites, schema, run_dir=tmp_path / "dp", rounds=2, local_epochs=1, state_size=8, hidden=8,
                         val_fraction=0.0, keep_best=False, patience_rounds=0, dp_noise_multiplier=1.0, dp_clip=0.5, dp_delta=1e-5)
    eps = [h["train"]["dp_epsilon"] for h in res.history]
    assert 0 < eps[0] < eps[1]  # the budget grows with the rounds
    off = run_federation(sites, schema, run_dir=tmp_path / "no-dp", rounds=1, local_epochs=1, state_size=8, hidden=8,
                         val_fraction=0.0, keep_best=False, patience_rounds=0)
    assert "dp_epsilon" not in off.history[0]["train"]
