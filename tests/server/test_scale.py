"""Scale (docs/federation.md, "Scale"): with the site cache (clients/cache.py) a federation trains exactly as
without it, and what the cache holds does not grow with rounds."""
import pytest
import torch

import server.app as server_app
from clients import cache
from server.engines import run_federation

FAST = {"local_epochs": 1, "state_size": 8, "hidden": 8, "val_fraction": 0.2, "keep_best": False,
        "patience_rounds": 0}


@pytest.fixture(autouse=True)
def empty_cache():
    cache.clear()
    yield
    cache.clear()


def test_a_final_model_with_the_cache_is_bit_identical_to_one_without(two_sites, tmp_path, monkeypatch):
    sites, schema = two_sites  # the second site holds no imaging: its imaging encoder is never sent nor used
    a = run_federation(sites, schema, rounds=3, seed=3, run_dir=tmp_path / "cached", **FAST)
    site = cache.site
    monkeypatch.setattr(cache, "site", lambda ctx: (cache.clear(), site(ctx))[1])  # every message: a fresh site
    b = run_federation(sites, schema, rounds=3, seed=3, run_dir=tmp_path / "fresh", **FAST)
    wa, wb = a.trained.model.state_dict(), b.trained.model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["train"]["train_loss"] for h in a.history] == [h["train"]["train_loss"] for h in b.history]
    monkeypatch.undo()
    c = run_federation(sites, schema, rounds=3, seed=3, run_dir=tmp_path / "again", **FAST)  # a seed reproduces a run
    assert all(torch.equal(wa[k], c.trained.model.state_dict()[k]) for k in wa)


def test_what_the_cache_holds_does_not_grow_across_rounds(two_sites, tmp_path, monkeypatch):
    sites, schema = two_sites
    seen = []
    save = server_app.save_checkpoint
    monkeypatch.setattr(server_app, "save_checkpoint", lambda *a, **k: (save(*a, **k), seen.append(cache.stats())))
    run_federation(sites, schema, rounds=4, seed=0, run_dir=tmp_path / "run", **FAST)
    assert len(seen) == 4
    assert all(s == seen[0] for s in seen)  # sites, models and bytes after every round
    assert seen[0]["sites"] == 2 and seen[0]["models"] == 2
