"""Scale (docs/federation.md, "Scale"): the site cache kept for a run and the batch-size rule (packing:
tests/mmn_fed/test_records.py)."""
import numpy as np
import pytest
from flwr.app import Context, RecordDict

from clients import cache
from mmn_fed.training import resolve_batch_size


@pytest.fixture(autouse=True)
def empty_cache():
    cache.clear()
    yield
    cache.clear()


def contexts(heart, tmp_path, n, run_dir):
    df, _ = heart
    out = []
    for i in range(n):
        path = tmp_path / f"site{i}.csv"
        if not path.exists():
            df.iloc[i * 5:(i + 1) * 5 + 20].to_csv(path, index=False)
        out.append(Context(run_id=1, node_id=1000 + i, node_config={"data-path": str(path), "site-name": f"s{i}"},
                           state=RecordDict(), run_config={"run-dir": run_dir}))
    return out


def test_the_cache_keeps_every_site_for_the_run_and_a_new_run_frees_them(heart, tmp_path):
    run_a = contexts(heart, tmp_path, 40, "runs/a")  # more sites than the old 32-site cache held
    first = [cache.site(c) for c in run_a]
    for _ in range(2):  # later messages of the same run: the very same objects, none rebuilt or evicted
        assert all(cache.site(c) is s for c, s in zip(run_a, first))
    assert cache.stats()["sites"] == 40 and cache.stats()["mib"] > 0
    run_b = contexts(heart, tmp_path, 2, "runs/b")  # another run (same run id, as in-process runs have)
    b0 = cache.site(run_b[0])
    assert cache.stats()["sites"] == 1  # the first message of run b freed run a's sites
    assert b0 is not first[0] and cache.site(run_b[0]) is b0
    assert cache.site(run_a[0]) is not first[0]  # run a again: rebuilt (its sites were freed)


def test_the_auto_batch_size_rule():
    assert resolve_batch_size(48, 10) == 48 and resolve_batch_size(48, 10**6) == 48  # an explicit size wins
    sizes = [resolve_batch_size(0, n) for n in range(1, 40_000, 97)]
    assert all(b in (32, 64, 128, 256) for b in sizes)  # a power of two between 32 and 256
    assert sizes == sorted(sizes)  # never smaller for more rows
    for n in range(1600, 12_800, 37):  # in the range the rule adapts: ~50 steps per epoch, never more
        assert 25 <= -(-n // resolve_batch_size(0, n)) <= 50
    # the trade docs/federation.md ("Scale") explains: the batch follows each site's rows, so splitting a cohort
    # into k sites multiplies the optimizer steps per round by at most 256 / 32 = 8 (plus one partial batch a site);
    # one batch size for every site (e.g. the pooled cohort's, --batch-rule pooled in benchmarks/bench_scale.py)
    # keeps the steps per round of any split within one per site of the pooled count
    n = 20_000
    whole = -(-n // resolve_batch_size(0, n))
    pooled_b = resolve_batch_size(0, n)
    for k in (4, 16, 64, 256):
        rows = [len(p) for p in np.array_split(np.arange(n), k)]
        split = sum(-(-r // resolve_batch_size(0, r)) for r in rows)
        assert whole <= split <= 8 * whole + k
        assert n // pooled_b <= sum(-(-r // pooled_b) for r in rows) <= n // pooled_b + k
