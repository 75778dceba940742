"""Robust per-module aggregation: hand-checked values, and a malicious hospital on heart."""
import sys
from pathlib import Path

import numpy as np
import pytest

from server.aggregation import SiteUpdate, aggregate_modules
from server.robust import median_modules, trimmed_mean, trimmed_mean_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_robustness import HeartFederation, scaled, validated_mean  # noqa: E402

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


def test_a_malicious_hospital_degrades_the_model_far_less_with_robust_rules():
    """heart, 4 hospitals, 5 rounds; Cleveland (the largest) sends global - 10 x its honest step.
    Full figures (3 seeds, 10 rounds, more attacks): ``python benchmarks/bench_robustness.py``."""
    fed = HeartFederation(seed=0, state_size=8, hidden=8)
    rounds, attack = 5, scaled(-10.0)
    clean = fed.auroc(fed.run(rounds, aggregate_modules))
    hit = {name: fed.auroc(fed.run(rounds, rule, attack, "Cleveland")) for name, rule in
           {"mean": aggregate_modules, "validated mean": validated_mean, "trimmed mean": trimmed_mean_modules,
            "median": median_modules}.items()}
    drop = {k: clean - v for k, v in hit.items()}
    print(f"\nclean AUROC {clean:.3f}; under attack: " + ", ".join(f"{k} {v:.3f}" for k, v in hit.items()))
    assert drop["mean"] > 0.2  # plain averaging is wrecked
    # with 4 sites, one of them the attacker, coordinate-wise rules can only limit the damage
    assert drop["trimmed mean"] < 0.75 * drop["mean"] and drop["median"] < 0.75 * drop["mean"]
    assert drop["validated mean"] < 0.06  # the norm check rejects the boosted update: training without it
