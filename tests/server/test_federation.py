"""The real ServerApp and ClientApp, run through the in-process engine (no Ray, no mocks)."""
import json

import pandas as pd
import pytest
import torch

from clients.app import app as client_app
from mmn_fed import fit_preprocessor, load_model
from mmn_fed import records as R
from mmn_fed.modules import module_of
from server.aggregation import params_nbytes
from server.engines import read_result, run_federation, write_site_data
from server.engines.inprocess import InProcessGrid, run_inprocess, server_context
from server.app import app as server_app

FAST = {"local_epochs": 1, "state_size": 8, "hidden": 8}  # small and fast


def weights(run_dir):
    return load_model(run_dir / "model.pt").model.state_dict()


def test_site_without_a_modality_never_receives_or_sends_its_encoder(two_sites, tmp_path):
    sites, schema = two_sites
    seen = []  # every message as the ClientApp saw it, and its reply

    def spying_client(msg, ctx):
        reply = client_app(msg, ctx)
        seen.append((ctx.node_config["partition-id"], msg, reply))
        return reply

    rc = {"num-server-rounds": 2, "seed": 0, "val-fraction": 0.0, "keep-best": False, "patience-rounds": 0, "data-dir": str(write_site_data(tmp_path / "data", sites, schema)),
          "run-dir": str(tmp_path / "run"), "local-epochs": 1, "state-size": 8, "hidden": 8}
    grid = InProcessGrid(spying_client, [{"partition-id": i, "num-partitions": 2} for i in range(2)], rc)
    server_app(grid, server_context(rc))

    hungary = [(m, r) for pid, m, r in seen if pid == 1 and "arrays" in m.content]
    assert len(hungary) == 3  # 2 rounds x train (round 1 scored inside round 2's) + the last evaluate
    for msg, reply in hungary:
        down = {module_of(k) for k in R.names(msg.content["arrays"])}
        assert "encoders.imaging" not in down and "encoders.rest" in down
        if "arrays" in reply.content:
            up = R.from_arrayrecord(reply.content["arrays"])
            assert "encoders.imaging" not in {module_of(k) for k in up}
            mine = {k: v.numpy() for k, v in weights(tmp_path / "run").items() if module_of(k) in down}
            assert params_nbytes(up) == params_nbytes(mine)  # upload = exactly the modules it holds
    comm = json.loads((tmp_path / "run" / "comm.json").read_text())
    h_up = [c for c in comm if c["site"] == "Hungary" and c["direction"] == "up"]
    assert all("encoders.imaging" not in c["modules"] for c in comm if c["site"] == "Hungary")
    assert all(c["bytes"] < c["fedavg_bytes"] for c in h_up)
    assert any(c["bytes"] == c["fedavg_bytes"] for c in comm if c["site"] == "Cleveland")


def test_federated_preprocessing_equals_pooled_fit_and_ships_in_the_model(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:60] for n, df in sites.items()}
    res = run_federation(small, schema, rounds=1, run_dir=tmp_path / "run", val_fraction=0.0, keep_best=False, patience_rounds=0, **FAST)  # all rows
    pooled = fit_preprocessor(schema, pd.concat(list(small.values()), ignore_index=True))
    assert res.trained.preprocessor.to_dict() == json.loads(json.dumps(pooled.to_dict()))
    assert res.trained.metadata["provenance"]["training"] == "federated"


def test_records_history_and_model_change(heart_sites, tmp_path):
    sites, schema = heart_sites
    train = {n: df.iloc[: int(len(df) * 0.7)] for n, df in sites.items()}
    test = {n: df.iloc[int(len(df) * 0.7):] for n, df in sites.items()}
    # batch 16, 5 rounds: the tiny FAST model learns reliably (held-out AUROC 0.71-0.80 over seeds 0-3; with 3
    # rounds 0.57-0.80)
    res = run_federation(train, schema, rounds=5, run_dir=tmp_path / "run", test_sites=test, val_fraction=0.2,
                         batch_size=16, **FAST)
    assert [h["round"] for h in res.history] == [1, 2, 3, 4, 5]
    assert all(h["bytes_up"] > 0 and "disease/auroc" in h["test"] for h in res.history)
    recs = pd.DataFrame(res.records)
    pooled = recs[(recs.site == "all") & (recs.state == "final") & (recs.combination == "all") & (recs.metric == "auroc")]
    assert len(pooled) == 1 and pooled.value.iloc[0] > 0.6
    assert set(recs.site) >= {"all", *sites}  # per site
    assert (recs.combination != "all").any()  # per modality combination
    fed = recs[recs.get("split") == "validation"]
    assert set(fed.site) == set(sites) and set(fed.task) == {"disease"}
    assert {"model", "training", "seed", "condition", "site", "task", "metric", "value", "state", "combination", "n"} <= set(recs.columns)


class DiesInRound(InProcessGrid):
    """Interrupts the run while sending round `die_at`'s training messages (like a killed server)."""

    die_at = 3

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == str(self.die_at) and messages[0].metadata.message_type == "train":
            raise KeyboardInterrupt("killed")
        return super().send_and_receive(messages, timeout=timeout)


def test_interrupted_run_resumes_to_the_same_final_model(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:80] for n, df in sites.items()}
    full = run_federation(small, schema, rounds=4, run_dir=tmp_path / "full", server_optimizer="fedavgm", server_lr=1.0,
                          val_fraction=0.0, keep_best=False, patience_rounds=0, **FAST)
    data = write_site_data(tmp_path / "cut" / "data", small, schema)
    rc = {"num-server-rounds": 4, "data-dir": str(data), "run-dir": str(tmp_path / "cut"), "val-fraction": 0.0, "keep-best": False, "patience-rounds": 0,
          "server-optimizer": "fedavgm", "local-epochs": 1, "state-size": 8, "hidden": 8}
    with pytest.raises(KeyboardInterrupt):
        run_inprocess(rc, len(small), grid_cls=DiesInRound)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    # round 2 was trained but is scored only in round 3's train replies: the checkpoint holds round 1, and the
    # resumed run trains round 2 again (seeded by (seed, round, site): the same update)
    assert ck["round"] == 1 and not (tmp_path / "cut" / "model.pt").exists()
    run_inprocess(rc, len(small))  # same run directory: resumes after round 1
    resumed = read_result(tmp_path / "cut")
    a, b = full.trained.model.state_dict(), resumed.trained.model.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert [h["round"] for h in resumed.history] == [1, 2, 3, 4]


def test_checkpoint_from_other_settings_is_refused(heart_sites, tmp_path):
    from server.app import FederationError

    sites, schema = heart_sites
    small = {n: df.iloc[:40] for n, df in list(sites.items())[:2]}
    run_federation(small, schema, rounds=1, run_dir=tmp_path / "run", **FAST)
    with pytest.raises(FederationError, match="other settings"):
        run_federation(small, schema, rounds=2, run_dir=tmp_path / "run", lr=0.1, **FAST)


def test_resuming_after_a_site_changed_its_rows_is_refused_and_names_the_site(heart_sites, tmp_path):
    from server.app import FederationError

    sites, schema = heart_sites
    small = {n: df.iloc[:40] for n, df in list(sites.items())[:2]}
    run_federation(small, schema, rounds=1, run_dir=tmp_path / "run", **FAST)
    again = run_federation(small, schema, rounds=2, run_dir=tmp_path / "run", **FAST)  # same rows: resumes
    assert [h["round"] for h in again.history] == [1, 2]
    name = list(small)[1]
    changed = {**small, name: small[name].iloc[:30]}
    with pytest.raises(FederationError, match=rf"site\(s\) \['{name}'\] changed"):
        run_federation(changed, schema, rounds=3, run_dir=tmp_path / "run", **FAST)


def test_keep_best_returns_the_round_with_the_best_federated_validation(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:80] for n, df in sites.items()}
    res = run_federation(small, schema, rounds=3, run_dir=tmp_path / "run", val_fraction=0.25, keep_best=True, **FAST)
    best = res.history[-1]["best_round"]
    scores = [-h["federated_eval"]["disease/brier"] for h in res.history]  # the validation score: minus the Brier
    assert best == 1 + scores.index(max(scores))
    assert [h["validation_score"] for h in res.history] == scores
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    state = res.trained.model.state_dict()
    assert all(torch.equal(state[k], ck["best"]["params"][k]) for k in state)


def test_pfusion_federates_per_module_too(heart_sites, tmp_path):
    sites, schema = heart_sites
    small = {n: df.iloc[:60] for n, df in list(sites.items())[:2]}
    res = run_federation(small, schema, model_kind="pfusion", rounds=1, run_dir=tmp_path / "run", **FAST)
    assert res.trained.config.kind == "pfusion"
    assert "init_state" not in {m for c in res.comm for m in c["modules"]}
    assert any(r["metric"] == "auroc" for r in res.records)


def test_a_round_where_every_site_fails_stops_the_run_with_the_reasons(heart_sites, tmp_path):
    from server.app import FederationError

    sites, schema = heart_sites
    small = {n: df.iloc[:40] for n, df in list(sites.items())[:2]}
    rc = {"num-server-rounds": 1, "data-dir": str(write_site_data(tmp_path / "data", small, schema)),
          "run-dir": str(tmp_path / "run"), "val-fraction": 0.0, "keep-best": False, "patience-rounds": 0, "state-size": 8, "hidden": 8}

    def broken_training(msg, ctx):
        if msg.metadata.message_type == "train":
            raise RuntimeError("disk full")
        return client_app(msg, ctx)

    grid = InProcessGrid(broken_training, [{"partition-id": i, "num-partitions": 2} for i in range(2)], rc)
    with pytest.raises(FederationError, match="disk full"):
        server_app(grid, server_context(rc))


class ScriptedValidation:
    """The real ClientApp, whose evaluation records report a scripted disease Brier score per round (1 - the
    scripted score: the one quantity the server's model selection reads, as minus the Brier), so that the best
    round and the stop are known; it keeps the global parameters each scored model had, per round. Round k is
    scored inside round k+1's train message (``evaluate-round``), the last round in an evaluate message."""

    def __init__(self, scores):
        self.scores = scores
        self.sent: dict[int, dict] = {}

    def __call__(self, msg, ctx):
        from mmn_fed import protocol as P
        from mmn_fed import records as R

        reply = client_app(msg, ctx)
        cfg = msg.content[P.CONFIG]
        if msg.metadata.message_type == "evaluate" or P.EVALUATE_ROUND in cfg:
            rnd = int(cfg["server-round"] if msg.metadata.message_type == "evaluate" else cfg[P.EVALUATE_ROUND])
            self.sent[rnd] = {k: v.copy() for k, v in R.from_arrayrecord(msg.content[P.ARRAYS]).items()}
            recs = R.from_json_record(reply.content[P.RECORDS])
            for rec in recs:
                if rec["task"] == "disease" and rec["metric"] == "brier":
                    rec["value"] = 1.0 - self.scores[rnd - 1]
            reply.content[P.RECORDS] = R.json_record(recs)
        return reply


def scripted_run(sites, schema, run_dir, scores, **settings):
    rc = {"num-server-rounds": len(scores), "seed": 0, "val-fraction": 0.25, "data-dir": str(write_site_data(
          run_dir / "data", sites, schema)), "run-dir": str(run_dir), "local-epochs": 1, "state-size": 8, "hidden": 8,
          **settings}
    client = ScriptedValidation(scores)
    grid = InProcessGrid(client, [{"partition-id": i, "num-partitions": len(sites)} for i in range(len(sites))], rc)
    server_app(grid, server_context(rc))
    return read_result(run_dir), client


SCORES = [0.60, 0.80, 0.70, 0.75, 0.79, 0.95, 0.96, 0.97]  # best 0.80 at round 2 until round 6


def test_early_stopping_stops_when_validation_stops_improving_and_keeps_the_best_round(two_sites, tmp_path):
    sites, schema = two_sites
    res, client = scripted_run(sites, schema, tmp_path / "run", SCORES, **{"patience-rounds": 3, "keep-best": True})
    assert [h["round"] for h in res.history] == [1, 2, 3, 4, 5]  # rounds 3, 4, 5 did not beat round 2
    assert res.history[-1]["stopped"] == {"after_round": 5, "patience_rounds": 3, "best_round": 2}
    assert res.extra["selection"]["rounds_run"] == 5 and res.extra["selection"]["final_round"] == 2
    assert res.extra["selection"]["stopped_early"] and res.extra["selection"]["best_validation_score"] == pytest.approx(-0.20)
    assert res.trained.metadata["provenance"]["final_round"] == 2
    state = res.trained.model.state_dict()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["best"]["round"] == 2
    for k, v in client.sent[2].items():  # the final model = the global model after round 2, exactly
        assert torch.equal(state[k], torch.from_numpy(v)) and torch.equal(ck["best"]["params"][k], state[k])
    assert any(not torch.equal(state[k], torch.from_numpy(v)) for k, v in client.sent[5].items())


def test_without_patience_every_round_runs_and_keep_best_still_picks_the_best(two_sites, tmp_path):
    sites, schema = two_sites
    res, client = scripted_run(sites, schema, tmp_path / "run", SCORES, **{"patience-rounds": 0, "keep-best": True})
    assert len(res.history) == len(SCORES) and "stopped" not in res.history[-1]
    assert res.extra["selection"]["final_round"] == 8 and not res.extra["selection"]["stopped_early"]
    state = res.trained.model.state_dict()
    assert all(torch.equal(state[k], torch.from_numpy(v)) for k, v in client.sent[8].items())
    res, client = scripted_run(sites, schema, tmp_path / "last", [0.9, 0.5, 0.6], **{"patience-rounds": 0,
                                                                                     "keep-best": False})
    state = res.trained.model.state_dict()  # keep-best off: the last round, whatever its score
    assert all(torch.equal(state[k], torch.from_numpy(v)) for k, v in client.sent[3].items())


def test_resuming_a_stopped_run_with_more_rounds_does_not_continue_past_the_stop(two_sites, tmp_path):
    sites, schema = two_sites
    first, _ = scripted_run(sites, schema, tmp_path / "run", SCORES[:6], **{"patience-rounds": 3})
    assert len(first.history) == 5
    (tmp_path / "run" / "model.pt").unlink()
    again, client = scripted_run(sites, schema, tmp_path / "run", SCORES, **{"patience-rounds": 3})
    assert [h["round"] for h in again.history] == [1, 2, 3, 4, 5] and client.sent == {}  # no round ran
    assert again.extra["selection"]["final_round"] == 2 and again.extra["selection"]["stopped_early"]
    a, b = first.trained.model.state_dict(), again.trained.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_evaluation_folded_into_a_train_message_equals_an_evaluate_message_of_the_same_model(two_sites, tmp_path):
    """Round k's model is scored inside round k+1's train message: the records equal what an evaluate message
    of that model returns, they are the server's federated evaluation of round k, and one message per site per
    round is sent (plus the last round's evaluate)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from mmn_fed import protocol as P
    from server.engines.inprocess import as_stored

    sites, schema = two_sites
    checked, kinds = [], []

    def client(msg, ctx):
        reply = client_app(msg, ctx)
        kinds.append((msg.metadata.message_type, msg.metadata.group_id))
        cfg = msg.content[P.CONFIG]
        if msg.metadata.message_type == P.TRAIN and P.EVALUATE_ROUND in cfg:
            rnd = int(cfg[P.EVALUATE_ROUND])
            assert rnd == int(cfg["server-round"]) - 1
            same = as_stored(Message(RecordDict({P.ARRAYS: msg.content[P.ARRAYS], P.CONFIG: ConfigRecord(
                {**dict(cfg), "server-round": rnd})}), dst_node_id=msg.metadata.dst_node_id, message_type=P.EVALUATE,
                group_id=str(rnd)))
            alone = client_app(same, ctx)
            assert R.from_json_record(reply.content[P.RECORDS]) == R.from_json_record(alone.content[P.RECORDS])
            checked.append((ctx.node_config["partition-id"], rnd))
        return reply

    rc = {"num-server-rounds": 3, "seed": 0, "val-fraction": 0.25, "patience-rounds": 0,
          "data-dir": str(write_site_data(tmp_path / "data", sites, schema)), "run-dir": str(tmp_path / "run"), **{
              k.replace("_", "-"): v for k, v in FAST.items()}}
    grid = InProcessGrid(client, [{"partition-id": i, "num-partitions": 2} for i in range(2)], rc)
    server_app(grid, server_context(rc))
    assert sorted(checked) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    rounds = [k for k in kinds if k[0] in (P.TRAIN, P.EVALUATE)]
    assert sorted(rounds) == sorted([(P.TRAIN, str(r)) for r in (1, 2, 3) for _ in range(2)] + [(P.EVALUATE, "3")] * 2)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    evaluations = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert [h["round"] for h in history] == [1, 2, 3] and all(h["federated_eval"] for h in history)
    assert {e["round"] for e in evaluations} == {1, 2, 3}
    timing = json.loads((tmp_path / "run" / "timing.json").read_text())
    assert [(t["type"], t["round"]) for t in timing if t["type"] in (P.TRAIN, P.EVALUATE)] == \
        [(P.TRAIN, "1"), (P.TRAIN, "2"), (P.TRAIN, "3"), (P.EVALUATE, "3")]


def test_validation_score_is_minus_the_task_weighted_pooled_brier_of_the_classification_tasks():
    from mmn_fed import load_builtin
    from server.app import validation_score

    schema = load_builtin("support2")[1]  # death_180d (weight 1), death (0.5), sfdm2 (multiclass, 0.5)
    m = {"death_180d/brier": 0.2, "death/brier": 0.1, "sfdm2/brier": 0.3, "death_180d/auroc": 0.99}
    assert validation_score(m, schema) == pytest.approx(-(0.2 + 0.5 * 0.1 + 0.5 * 0.3) / 2.0)
    nan = {**m, "death/brier": float("nan")}  # a task no site could score is left out, not counted as 0
    assert validation_score(nan, schema) == pytest.approx(-(0.2 + 0.5 * 0.3) / 1.5)
    assert validation_score({}, schema) == -float("inf")
    assert validation_score({"disease/brier": 0.1}, schema.subset(tasks=["death"])) == -float("inf")


def test_the_n_weighted_site_brier_is_the_pooled_brier_and_the_multiclass_brier_reduces_to_the_binary():
    import numpy as np

    from mmn_fed.metrics import brier, brier_multiclass

    rng = np.random.default_rng(0)
    sites = [(rng.integers(0, 2, n), rng.random(n)) for n in (7, 30, 120)]
    weighted = sum(brier(y, p) * len(y) for y, p in sites) / sum(len(y) for y, _ in sites)
    pooled = brier(np.concatenate([y for y, _ in sites]), np.concatenate([p for _, p in sites]))
    assert weighted == pytest.approx(pooled)
    y, p = sites[1]
    assert brier_multiclass(y, np.stack([1 - p, p], axis=1)) == pytest.approx(brier(y, p))
    assert brier_multiclass(np.array([0, 2]), np.array([[1.0, 0, 0], [1.0, 0, 0]])) == pytest.approx(0.5)
