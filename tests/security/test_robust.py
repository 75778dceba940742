"""Robust per-module aggregation: hand-checked values of the pure rules, and a malicious hospital on heart
through the real ServerApp and ClientApps (``simulations.attacks``; full figures: benchmarks/bench_robustness.py)."""
import numpy as np
import pytest

import clients.app as A
from mmn_fed import load_builtin
from mmn_fed.records import from_arrayrecord
from server.aggregation import SiteUpdate, aggregate_modules
from server.engines import run_federation
from server.robust import median_modules, trimmed_mean, trimmed_mean_modules
from simulations.attacks import attacked_update, attacking_client_app, holdout_split

G = {"init_state": np.zeros(2, np.float32), "encoders.a.net.0.weight": np.zeros(1, np.float32),
     "encoders.b.net.0.weight": np.full(1, 7.0, np.float32)}


def u(site, init, a=None, n=10):
    p = {"init_state": np.array(init, np.float32)}
    c = {"init_state": n}
    if a is not None:
        p["encoders.a.net.0.weight"] = np.array([a], np.float32)
        c["encoders.a"] = n
    return SiteUpdate(site, p, c)


def test_trimmed_mean_drops_extremes_per_coordinate_and_weights_the_rest():
    ups = [u("s1", [1, 100], 1.0, n=10), u("s2", [2, 2], 2.0, n=30), u("s3", [3, 3], None), u("s4", [-50, 4], None)]
    new, totals = trimmed_mean_modules(G, ups, trim=0.25)
    # init_state: 4 holders, k=1: coordinate 0 keeps (1, 2) weighted 10:30; coordinate 1 keeps (3, 4) 10:10
    np.testing.assert_allclose(new["init_state"], [(10 * 1 + 30 * 2) / 40, 3.5])
    # encoders.a: 2 holders, nothing can be trimmed: the weighted mean
    np.testing.assert_allclose(new["encoders.a.net.0.weight"], [(10 * 1 + 30 * 2) / 40])
    np.testing.assert_array_equal(new["encoders.b.net.0.weight"], [7.0])  # nobody returned it: carried forward
    assert totals["init_state"] == 60 and new["init_state"].dtype == np.float32


def test_median_is_coordinatewise_and_ignores_one_huge_value():
    ups = [u("s1", [1, 1e6]), u("s2", [2, 2]), u("s3", [3, 3])]
    new, _ = median_modules(G, ups)
    np.testing.assert_allclose(new["init_state"], [2, 3])


def test_trim_zero_is_the_plain_weighted_average():
    rng = np.random.default_rng(0)
    ups = [u(f"s{i}", rng.normal(size=2), float(rng.normal()), n=int(rng.integers(1, 50))) for i in range(5)]
    a, _ = trimmed_mean_modules(G, ups, trim=0.0)
    b, _ = aggregate_modules(G, ups)
    for k in G:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
    assert trimmed_mean(np.array([[1.0], [5.0], [9.0]]), np.ones(3), 0.4).item() == 5.0
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean_modules(G, ups, trim=0.5)


# ---- a malicious hospital on heart, through the real ServerApp and ClientApps -------------------------------

ATTACKER = "Cleveland"  # the largest hospital
ROUNDS = 3
SMALL = {"state_size": 16, "hidden": 16}  # a sign flip's damage, and what median / trimmed mean save, show by round 3


@pytest.fixture(scope="module")
def federate(tmp_path_factory):
    """run(rule, kind, k, **extra) -> FederationResult: heart's 4 hospitals, 30% of each held out, 3 rounds on the
    in-process engine with the default settings but ``val_fraction=0.2``, ``keep_best=False`` (the final model is
    the last round's, whose test AUROC ``held_out_auroc`` reads) and ``extra``, ``ATTACKER`` running
    ``attacking_client_app(ATTACKER, kind, k)`` (kind "none": honest). Runs are cached: tests share the clean ones."""
    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    train, test = holdout_split(df, schema.site_column, 0.3, seed=0)
    root, cache = tmp_path_factory.mktemp("attacks"), {}

    def run(rule="mean", kind="none", k=0.0, client_app=None, rounds=ROUNDS, **extra):
        key = (rule, kind, k, rounds, tuple(sorted(extra.items())))
        if client_app is None and key in cache:
            return cache[key]
        app = client_app or (None if kind == "none" else attacking_client_app(ATTACKER, kind, k))
        res = run_federation(train, schema, rounds=rounds, seed=0, run_dir=root / f"{len(cache)}-{rule}-{kind}{k}",
                             test_sites=test, val_fraction=0.2, aggregation=rule, client_app=app,
                             **{"keep_best": False, **extra})  # the model after the last round: what aggregation made
        cache[key if client_app is None else (*key, len(cache))] = res
        return res
    return run


def params(res):
    return {k: v.numpy().astype(np.float64) for k, v in res.trained.model.state_dict().items()}


def distance(a, b):
    """L2 distance between two models' parameter vectors."""
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def held_out_auroc(res):
    return res.history[-1]["test"]["disease/auroc"]


def test_the_attacking_site_sends_global_plus_k_times_its_honest_step(federate):
    """Spy on the attacking ClientApp: for every train message, the honest ClientApp's reply to the same message
    next to the attacker's. Only Cleveland's differs, and by exactly global + k (honest - global)."""
    attacking, seen = attacking_client_app(ATTACKER, "scale", -10.0), []

    def spy(msg, ctx):
        honest = A.app(msg, ctx) if msg.metadata.message_type == "train" else None
        reply = attacking(msg, ctx)
        if honest is not None:
            seen.append((msg, honest, reply))
        return reply

    federate(kind="spy", client_app=spy, rounds=2)
    assert len(seen) == 4 * 2 and sum(str(r.content["site"]["name"]) == ATTACKER for _, _, r in seen) == 2
    for msg, honest, reply in seen:
        site = str(reply.content["site"]["name"])
        g, h, sent = (from_arrayrecord(r["arrays"]) for r in (msg.content, honest.content, reply.content))
        assert sorted(sent) == sorted(h)
        if site == ATTACKER:
            for name in h:
                np.testing.assert_allclose(sent[name], g[name] - 10 * (h[name] - g[name]), rtol=1e-5, atol=1e-6)
            assert distance(sent, h) > 1.0
        else:
            assert all(np.array_equal(sent[name], h[name]) for name in h)
    with pytest.raises(ValueError, match="attack kind 'flip' unknown"):
        attacked_update(g, h, kind="flip")


@pytest.mark.parametrize("kind, k, reason", [("scale", 10.0, "update norm"), ("nan", 0.0, "non-finite")])
def test_a_boosted_or_nan_attacker_is_rejected_every_round_and_the_others_are_aggregated(federate, kind, k, reason):
    res = federate(kind=kind, k=k)
    for h in res.history:
        assert list(h["rejected"]) == [ATTACKER] and reason in h["rejected"][ATTACKER]
        assert h["train"]["sites"] == 3 and h["train"]["rejected"] == 1
    failures = res.extra["failures"]
    validation = {(f["round"], f["site"]) for f in failures if f["phase"] == "validation"}
    assert validation == {(r, ATTACKER) for r in range(1, ROUNDS + 1)}
    clean = federate()
    # without Cleveland's updates (the largest hospital) the model still works: measured 0.825 vs 0.858, and
    # 0.068 apart once training's dropout streams changed (issue 14's fast path): the same method, other draws
    assert abs(held_out_auroc(res) - held_out_auroc(clean)) < 0.09
    assert distance(params(res), params(clean)) > 0.1  # (Cleveland's honest update is missing: not the clean model)


def test_a_rejected_attacker_leaves_exactly_the_federation_of_the_other_three(federate):
    """Rejecting a x10 and a NaN attacker ends at the same model: what the three honest sites trained."""
    assert distance(params(federate(kind="scale", k=10.0)), params(federate(kind="nan"))) == 0.0
    assert all(not h["rejected"] for h in federate().history)  # honest updates all pass


def test_median_and_trimmed_mean_resist_a_sign_flip_that_validation_lets_through(federate):
    flipped = {rule: federate(rule, "scale", -1.0, **SMALL) for rule in ("mean", "median", "trimmed-mean")}
    assert all(not h["rejected"] for r in flipped.values() for h in r.history)  # same norm as honest: accepted
    drift = {rule: distance(params(r), params(federate(rule, **SMALL))) for rule, r in flipped.items()}
    assert drift["median"] < 0.75 * drift["mean"] and drift["trimmed-mean"] < 0.85 * drift["mean"], drift
    auroc = {rule: held_out_auroc(r) for rule, r in flipped.items()}
    assert auroc["median"] > auroc["mean"] + 0.1 and auroc["trimmed-mean"] > auroc["mean"] + 0.1, auroc
    assert held_out_auroc(federate(**SMALL)) - auroc["mean"] > 0.3  # the flip wrecks the mean


def test_under_secure_aggregation_the_attack_acts_before_masking(federate):
    """The server gets only masked vectors, yet the sign flip lands in the sum: same model as in plaintext."""
    secure = federate("mean", "scale", -1.0, secure_aggregation=True, **SMALL)
    plain = federate("mean", "scale", -1.0, **SMALL)
    assert all(len(h["secagg"]["survivors"]) == 4 for h in secure.history)
    assert distance(params(secure), params(plain)) < 1e-4
    assert distance(params(secure), params(federate(**SMALL))) > 0.5


def test_another_client_app_runs_on_the_in_process_engine_only():
    df, schema = load_builtin("heart")
    with pytest.raises(ValueError, match="in-process engine only"):  # Ray loads the ClientApp pyproject.toml names
        run_federation({}, schema, engine="ray", client_app=attacking_client_app(ATTACKER))
    with pytest.raises(ValueError, match="attack kind 'flip' unknown"):
        attacking_client_app(ATTACKER, kind="flip")
