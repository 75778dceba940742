"""Per-module aggregation, by hand-computed values."""
import numpy as np
import pytest

from server.aggregation import RejectedUpdate, ServerOptimizer, SiteUpdate, aggregate_modules, params_nbytes

G = {
    "init_state": np.array([0.0, 0.0], np.float32),
    "encoders.a.net.0.weight": np.array([1.0, 1.0], np.float32),
    "encoders.b.net.0.weight": np.array([2.0, 2.0], np.float32),
    "encoders.c.net.0.weight": np.array([5.0, 5.0], np.float32),
    "decoders.y.0.weight": np.array([0.0], np.float32),
}


def upd(site, counts, **params):
    return SiteUpdate(site, {k.replace("__", "."): np.asarray(v, np.float32) for k, v in params.items()}, counts)


def test_each_module_is_weighted_by_its_own_counts_over_the_sites_holding_it():
    u1 = SiteUpdate("s1", {"init_state": np.array([1.0, 2.0], np.float32),
                           "encoders.a.net.0.weight": np.array([3.0, 3.0], np.float32),
                           "decoders.y.0.weight": np.array([1.0], np.float32)},
                    {"init_state": 30, "encoders.a": 10, "decoders.y": 30})
    u2 = SiteUpdate("s2", {"init_state": np.array([4.0, 8.0], np.float32),
                           "encoders.a.net.0.weight": np.array([6.0, 0.0], np.float32),
                           "encoders.b.net.0.weight": np.array([7.0, 9.0], np.float32),
                           "decoders.y.0.weight": np.array([4.0], np.float32)},
                    {"init_state": 10, "encoders.a": 30, "encoders.b": 10, "decoders.y": 10})
    new, totals = aggregate_modules(G, [u1, u2])
    np.testing.assert_allclose(new["init_state"], [(30 * 1 + 10 * 4) / 40, (30 * 2 + 10 * 8) / 40])  # 1.75, 3.5
    np.testing.assert_allclose(new["encoders.a.net.0.weight"], [(10 * 3 + 30 * 6) / 40, (10 * 3) / 40])  # 5.25, 0.75
    np.testing.assert_allclose(new["decoders.y.0.weight"], [1.75])
    # held by one site only: that site's value exactly, not shrunk by the other sites' weight (FedMoDN's bug)
    np.testing.assert_allclose(new["encoders.b.net.0.weight"], [7.0, 9.0])
    # returned by nobody: carried forward unchanged
    np.testing.assert_array_equal(new["encoders.c.net.0.weight"], G["encoders.c.net.0.weight"])
    assert totals == {"init_state": 40, "encoders.a": 40, "encoders.b": 10, "decoders.y": 40}
    assert new["init_state"].dtype == np.float32


def test_single_holder_module_does_not_shrink_over_rounds():
    g = dict(G)
    for _ in range(10):
        u1 = SiteUpdate("big", {"init_state": np.ones(2, np.float32)}, {"init_state": 1000})
        u2 = SiteUpdate("small", {"encoders.c.net.0.weight": g["encoders.c.net.0.weight"]}, {"encoders.c": 3})
        g, _ = aggregate_modules(g, [u1, u2])
    np.testing.assert_allclose(g["encoders.c.net.0.weight"], [5.0, 5.0])


def test_zero_count_does_not_vote_and_order_of_replies_does_not_matter():
    a = SiteUpdate("a", {"encoders.a.net.0.weight": np.array([9.0, 9.0], np.float32)}, {"encoders.a": 0})
    b = SiteUpdate("b", {"encoders.a.net.0.weight": np.array([3.0, 1.0], np.float32)}, {"encoders.a": 2})
    c = SiteUpdate("c", {"encoders.a.net.0.weight": np.array([1.0, 3.0], np.float32)}, {"encoders.a": 6})
    n1, _ = aggregate_modules(G, [a, b, c])
    n2, _ = aggregate_modules(G, [c, a, b])
    np.testing.assert_allclose(n1["encoders.a.net.0.weight"], [1.5, 2.5])
    np.testing.assert_array_equal(n1["encoders.a.net.0.weight"], n2["encoders.a.net.0.weight"])


@pytest.mark.parametrize("bad, match", [
    (SiteUpdate("x", {"encoders.zzz.w.0": np.zeros(2, np.float32)}, {"encoders.zzz": 1}), "unknown parameter"),
    (SiteUpdate("x", {"init_state": np.zeros(3, np.float32)}, {"init_state": 1}), "shape"),
    (SiteUpdate("x", {"init_state": np.array([np.nan, 0], np.float32)}, {"init_state": 1}), "non-finite"),
    (SiteUpdate("x", {"init_state": np.zeros(2, np.float32)}, {}), "sample count"),
])
def test_rejects_bad_updates_naming_site_and_parameter(bad, match):
    with pytest.raises(RejectedUpdate, match=match):
        aggregate_modules(G, [bad])


def test_fedavgm_per_module_momentum_and_untouched_modules():
    opt = ServerOptimizer(kind="fedavgm", lr=1.0, momentum=0.5)
    g = {"init_state": np.zeros(2, np.float32), "encoders.a.net.0.weight": np.ones(2, np.float32)}
    avg = {"init_state": np.ones(2, np.float32), "encoders.a.net.0.weight": np.full(2, 7.0, np.float32)}
    g1 = opt.step(g, avg, ["init_state"])  # m = 1 -> 1
    np.testing.assert_allclose(g1["init_state"], [1, 1])
    np.testing.assert_allclose(g1["encoders.a.net.0.weight"], [1, 1])  # not updated: carried forward
    g2 = opt.step(g1, {**g1, "init_state": np.full(2, 2.0, np.float32)}, ["init_state"])  # m = 0.5*1 + 1 = 1.5
    np.testing.assert_allclose(g2["init_state"], [2.5, 2.5])
    assert opt.steps == {"init_state": 2}


def test_fedadam_first_step():
    opt = ServerOptimizer(kind="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    g = {"init_state": np.zeros(1, np.float32)}
    out = opt.step(g, {"init_state": np.array([2.0], np.float32)}, ["init_state"])
    m, v = 0.1 * 2.0, 0.01 * 4.0
    np.testing.assert_allclose(out["init_state"], [0.1 * m / (np.sqrt(v) + 1e-3)], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        ServerOptimizer(kind="sgd")


def test_params_nbytes():
    assert params_nbytes(G) == 4 * (2 + 2 + 2 + 2 + 1)
