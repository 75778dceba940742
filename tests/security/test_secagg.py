"""Secure aggregation: exactness against plaintext per-module averaging, dropouts, what the server sees."""
import numpy as np
import pytest

from mmn_fed.modules import module_of
from mmn_fed.secagg import (FRAC_BITS, SecAggClient, SecAggError, default_threshold, dequantize, quantize, shamir_combine,
                            shamir_split)
from server.aggregation import SiteUpdate, aggregate_modules
from server.secagg import SecAggServer, excluded_modules, plan_round, run_round

G = {
    "init_state": np.zeros(4, np.float32),
    "encoders.a.net.0.weight": np.zeros((3, 5), np.float32),
    "encoders.a.net.0.bias": np.zeros(3, np.float32),
    "encoders.b.net.0.weight": np.zeros((2, 2), np.float32),
    "encoders.c.net.0.weight": np.zeros(6, np.float32),
    "decoders.y.0.weight": np.zeros((1, 4), np.float32),
}


def make_sites(n: int, seed: int = 0, holdings=None):
    """n sites with random updates; site i lacks encoder b if i is odd; only s0 holds encoder c."""
    rng = np.random.default_rng(seed)
    params, counts = {}, {}
    for i in range(n):
        s = f"s{i}"
        mods = holdings[s] if holdings else (
            ["init_state", "encoders.a", "decoders.y"] + (["encoders.b"] if i % 2 == 0 else [])
            + (["encoders.c"] if i == 0 else []))
        params[s] = {k: rng.normal(0, 2, v.shape).astype(np.float32) for k, v in G.items() if module_of(k) in mods}
        counts[s] = {m: float(rng.integers(5, 400)) for m in mods}
    return params, counts


def plaintext(params, counts, sites):
    return aggregate_modules(G, [SiteUpdate(s, params[s], counts[s]) for s in sites])


def error_bound(n_sites: int, total: float) -> float:
    return n_sites * 2.0 ** -(FRAC_BITS + 1) / total + 1e-6  # + float32 rounding of the result


def test_shamir_any_t_shares_recover_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir_split(secret, 7, 4)
    for pick in ([0, 1, 2, 3], [6, 4, 2, 0], [1, 3, 5, 6, 0]):
        assert shamir_combine({i + 1: shares[i] for i in pick}) == secret
    # three shares interpolate to an unrelated field element
    assert shamir_combine({i + 1: shares[i] for i in [0, 1, 2]}, length=66)[-32:] != secret


def test_fixed_point_round_trip_error_and_range():
    x = np.random.default_rng(1).normal(0, 100, 1000)
    assert np.max(np.abs(dequantize(quantize(x, FRAC_BITS, 4), FRAC_BITS) - x)) <= 2.0 ** -(FRAC_BITS + 1)
    with pytest.raises(SecAggError, match="fixed-point range"):
        quantize(np.array([2.0**40]), FRAC_BITS, 4)
    with pytest.raises(SecAggError, match="non-finite"):
        quantize(np.array([np.nan]), FRAC_BITS, 4)


def test_threshold_tolerates_a_third_of_sites_dropping():
    for n in range(3, 30):
        t = default_threshold(n)
        assert 2 <= t <= n and n - t >= n / 3
    assert default_threshold(2) == 2


@pytest.mark.parametrize("n", [3, 4, 7])
def test_secure_sum_equals_plaintext_weighted_average_per_module(n):
    params, counts = make_sites(n, seed=n)
    res, _ = run_round(G, params, counts, min_holders=1)
    expected, totals = plaintext(params, counts, sorted(params))
    got = res.averaged(G)
    assert res.counts == pytest.approx(totals)
    for k in G:
        np.testing.assert_allclose(got[k], expected[k], rtol=0,
                                   atol=error_bound(n, totals[module_of(k)]) + 1e-6 * np.abs(expected[k]).max())
    assert got["init_state"].dtype == np.float32


def test_single_holder_modules_are_left_out_by_default():
    params, counts = make_sites(4)
    res, srv = run_round(G, params, counts)  # min_holders = 2: encoders.c is held by s0 alone
    assert excluded_modules(G, srv.plan) == ["encoders.c"]
    np.testing.assert_array_equal(res.averaged(G)["encoders.c.net.0.weight"], G["encoders.c.net.0.weight"])


@pytest.mark.parametrize("stage", ["shares", "masked", "unmask"])
def test_a_third_of_sites_dropping_mid_round_is_survived(stage):
    params, counts = make_sites(6, seed=3)
    drop = {"s1": stage, "s4": stage}
    res, srv = run_round(G, params, counts, drop=drop, min_holders=1)
    assert srv.plan.threshold == 4
    # sites that drop before sending their masked update are not in the sum; later drops are
    contributing = [s for s in sorted(params) if s not in drop or stage == "unmask"]
    expected, totals = plaintext(params, counts, contributing)
    got = res.averaged(G)
    for k in G:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-5)
    assert res.counts == pytest.approx(totals)
    if stage == "masked":
        assert res.dropped == ["s1", "s4"]


def test_more_dropouts_than_tolerated_abort_the_round():
    params, counts = make_sites(6, seed=4)
    with pytest.raises(SecAggError, match="threshold"):
        run_round(G, params, counts, drop={"s1": "masked", "s2": "masked", "s3": "masked"})


def test_a_module_left_with_one_surviving_holder_stays_hidden():
    holdings = {"s0": ["init_state", "encoders.b"], "s1": ["init_state", "encoders.b"], "s2": ["init_state"],
                "s3": ["init_state"]}
    params, counts = make_sites(4, seed=5, holdings=holdings)
    res, _ = run_round(G, params, counts, drop={"s1": "masked"})
    assert res.hidden == ["encoders.b"] and "encoders.b.net.0.weight" not in res.sums
    expected, _ = plaintext(params, counts, ["s0", "s2", "s3"])
    np.testing.assert_allclose(res.averaged(G)["init_state"], expected["init_state"], atol=1e-5)


def test_what_the_server_receives_from_a_site_is_independent_of_its_update():
    """Over many rounds (fresh keys each), correlate a site's update with the masked vector it sends."""
    g = {"init_state": np.zeros(8, np.float32)}
    rng = np.random.default_rng(7)
    seen, truth = [], []

    def observe(stage, site, payload):
        if stage == "masked" and site == "s0":
            seen.append(payload["init_state"][:-1].astype(np.float64) / 2.0**64)  # uniform in [0, 1) if hidden

    for r in range(300):
        params = {f"s{i}": {"init_state": rng.normal(0, 1, 8).astype(np.float32)} for i in range(3)}
        counts = {s: {"init_state": 10.0} for s in params}
        truth.append(params["s0"]["init_state"].astype(np.float64))
        run_round(g, params, counts, server_round=r, observe=observe)
    x, y = np.concatenate(truth), np.concatenate(seen)
    r = np.corrcoef(x, y)[0, 1]
    assert abs(r) < 4 / np.sqrt(x.size)  # ~0.07 for 2400 pairs: indistinguishable from zero
    assert abs(y.mean() - 0.5) < 0.03 and abs(y.var() - 1 / 12) < 0.01  # uniform, whatever the update
    # the same statistic on the unmasked encoding is a perfect correlation: the test can see a leak
    plain = np.array([dequantize(quantize(v * 10, FRAC_BITS, 3), FRAC_BITS) for v in truth]).ravel()
    assert np.corrcoef(x, plain)[0, 1] > 0.99


def test_client_never_reveals_both_secrets_of_a_site_and_state_survives_serialization():
    params, counts = make_sites(4, seed=8)
    plan = plan_round(G, {s: sorted({module_of(k) for k in p}) for s, p in params.items()}, 3, min_holders=1)
    clients = {s: SecAggClient(s, plan) for s in plan.sites}
    srv = SecAggServer(plan)
    # every step goes through bytes, as between ClientApp invocations (Flower's context.state)
    roundtrip = lambda c: SecAggClient.from_state(c.export_state())  # noqa: E731
    adverts = srv.collect_adverts({s: roundtrip(c).advertise_keys() for s, c in clients.items()})
    outboxes = {}
    for s in plan.sites:
        c = roundtrip(clients[s])
        outboxes[s] = c.share_keys(adverts)
        clients[s] = c
    inboxes = srv.route_shares(outboxes)
    masked = {}
    for s in ["s0", "s1", "s2"]:  # s3 drops
        c = roundtrip(clients[s])
        masked[s] = c.mask_update(params[s], counts[s], inboxes[s])
        clients[s] = c
    survivors = srv.collect_masked(masked)
    replies = {s: roundtrip(clients[s]).unmask_shares(survivors) for s in survivors}
    for rep in replies.values():
        assert set(rep["b"]) == {"s0", "s1", "s2"} and set(rep["s"]) == {"s3"}
    res = srv.unmask(replies)
    expected, _ = plaintext(params, counts, ["s0", "s1", "s2"])
    np.testing.assert_allclose(res.averaged(G)["encoders.a.net.0.weight"], expected["encoders.a.net.0.weight"],
                               atol=1e-5)
    with pytest.raises(SecAggError, match="survivor list"):
        clients["s0"].unmask_shares(["s1", "s2"])  # a list that omits the asking site is refused


def test_tampered_share_or_foreign_modules_are_refused():
    params, counts = make_sites(3, seed=9)
    plan = plan_round(G, {s: sorted({module_of(k) for k in p}) for s, p in params.items()}, 1, min_holders=1)
    clients = {s: SecAggClient(s, plan) for s in plan.sites}
    adverts = {s: c.advertise_keys() for s, c in clients.items()}
    out = {s: c.share_keys(adverts) for s, c in clients.items()}
    bad = bytearray(out["s1"]["s0"])
    bad[-1] ^= 1
    from cryptography.exceptions import InvalidTag
    with pytest.raises(InvalidTag):
        clients["s0"].mask_update(params["s0"], counts["s0"], {"s1": bytes(bad), "s2": out["s2"]["s0"]})
    with pytest.raises(SecAggError, match="not in this site's plan"):
        clients["s1"].mask_update({**params["s1"], "encoders.c.net.0.weight": np.zeros(6, np.float32)},
                                  counts["s1"], {"s0": out["s0"]["s1"], "s2": out["s2"]["s1"]})


def test_secure_federation_on_heart_ends_at_the_plaintext_model(tmp_path):
    """Three rounds of real local training on heart's 4 hospitals through the real ServerApp and ClientApps:
    secure vs plaintext aggregation, Switzerland failing at the unmask step of round 2 (its masked update
    arrived, so it still counts; the others' shares recover its self-mask)."""
    import clients.app as A
    from mmn_fed import load_builtin
    from server.engines import run_federation
    from simulations.attacks import holdout_split

    df, schema = load_builtin("heart")
    schema = schema.subset(tasks=["disease"])
    train, test = holdout_split(df, schema.site_column, 0.3, seed=1)

    failed = []

    def unmask_fails(msg, ctx):
        if (msg.metadata.message_type == "query.secagg_unmask" and ctx.node_config["partition-id"] == 2
                and msg.metadata.group_id == "2"):
            failed.append(msg.metadata.group_id)
            raise ConnectionError("Switzerland lost its network")
        return A.app(msg, ctx)

    fast = dict(rounds=3, seed=1, test_sites=test, val_fraction=0.2, state_size=8, hidden=8)
    a = run_federation(train, schema, run_dir=tmp_path / "plain", **fast)
    b = run_federation(train, schema, run_dir=tmp_path / "secure", secure_aggregation=True, client_app=unmask_fails,
                       **fast)
    assert sorted(train)[2] == "Switzerland" and failed == ["2"]
    assert b.history[1]["secagg"]["survivors"] == sorted(train)
    pa, pb = a.trained.model.state_dict(), b.trained.model.state_dict()
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < 1e-5
    assert abs(a.history[-1]["test"]["disease/auroc"] - b.history[-1]["test"]["disease/auroc"]) < 1e-4
