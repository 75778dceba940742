"""A site: where its rows come from, what it trains, what it sends back."""
import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.app import app as client_app
from clients.site import Site, SiteDataError, site_seed, site_source
from mmn_fed import ModelConfig, fit_preprocessor, make_synthetic
from mmn_fed import protocol as P
from mmn_fed import records as R
from mmn_fed.data import encode, site_summary
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.modules import module_of
from mmn_fed.settings import SiteSettings
from mmn_fed.correction import keep_probabilities
from mmn_fed.training import TrainConfig, model_loss, train_epochs

MC = ModelConfig(state_size=8, hidden=8)


def test_site_source_for_deployment_and_simulation(tmp_path):
    src = site_source({"data-path": "/data/h.csv", "site-name": "Geneva"}, {})
    assert (src.name, src.path) == ("Geneva", "/data/h.csv")
    assert site_source({"partition-id": 2, "num-partitions": 4}, {"dataset": "heart"}).name == "Switzerland"
    (tmp_path / "sites.json").write_text(json.dumps({"sites": [{"name": "x", "file": "site_0.csv"}]}))
    assert site_source({"partition-id": 0}, {"data-dir": str(tmp_path)}).path == str(tmp_path / "site_0.csv")
    with pytest.raises(SiteDataError, match="partition-id 3"):
        site_source({"partition-id": 3}, {"data-dir": str(tmp_path)})
    with pytest.raises(SiteDataError, match="neither"):
        site_source({}, {})


def site_and_params(heart, drop=()):
    df, schema = heart
    rows = df[df.dataset == "Cleveland"].iloc[:100].reset_index(drop=True).copy()
    for m in drop:
        for c in schema.modalities[m]:
            rows[c] = None
    prep = fit_preprocessor(schema, rows)
    model = build_from_preprocessor(prep, MC)
    params = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return Site("Cleveland", rows), prep, params


def test_trains_only_received_modules_and_counts_samples_per_module(heart):
    site, prep, params = site_and_params(heart, drop=("imaging",))
    mine = {k: v for k, v in params.items() if module_of(k) in ("init_state", "encoders.rest", "decoders.disease")}
    settings = SiteSettings(local_epochs=2, val_fraction=0.0)
    new, counts, metrics = site.train(prep, "k", MC, settings, mine, server_round=1)
    assert set(new) == set(mine)
    rest_present = site.rows[list(prep.schema.modalities["rest"])].notna().any(axis=1).sum()
    assert counts == {"init_state": 100, "encoders.rest": int(rest_present), "decoders.disease": 100}
    assert metrics["n"] == 100 and metrics["steps"] == 2 * 4  # 100 rows in batches of 32, two epochs
    # deterministic per (seed, round, site)
    again, _, _ = site.train(prep, "k", MC, settings, mine, server_round=1)
    assert all(np.array_equal(new[k], again[k]) for k in new)


def synthetic_site():
    """A federation's preprocessing over modalities a, b, c and tasks outcome, score; the site holds a and b
    only and has no score labels."""
    df, schema = make_synthetic(300, {"a": 2, "b": 2, "c": 2}, seed=3)
    prep = fit_preprocessor(schema, df)
    rows = df.iloc[:100].reset_index(drop=True).copy()
    rows[["c_0", "c_1"]] = np.nan
    rows["score"] = np.nan
    return Site("s", rows), prep


def test_a_site_moves_exactly_its_modules_by_one_hand_computed_adam_step():
    """One local step on all 100 rows (one batch): init_state, the encoders of a and b and the outcome decoder
    move by Adam's first step on the clipped, weight-decayed gradient of the site's loss; the encoder of c
    (a modality it lacks) and the score decoder (a task it has no labels for) come back bit-identical."""
    site, prep = synthetic_site()
    config = ModelConfig(state_size=8, hidden=8, dropout=0.0)
    torch.manual_seed(0)
    params = {k: v.numpy().copy() for k, v in build_from_preprocessor(prep, config).state_dict().items()}
    settings = SiteSettings(local_epochs=1, val_fraction=0.0, batch_size=128, lr=0.01, weight_decay=0.01)
    new, counts, metrics = site.train(prep, "k", config, settings, params, server_round=3)
    assert metrics["steps"] == 1
    assert counts == {"init_state": 100, "encoders.a": 100, "encoders.b": 100, "encoders.c": 0,
                      "decoders.outcome": 100, "decoders.score": 0}
    held = {"init_state", "encoders.a", "encoders.b", "decoders.outcome"}
    # by hand: the same rows in the same order (the site's seed for round 3), loss, clip to norm 1, Adam step 1
    model = build_from_preprocessor(prep, config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    seed = site_seed(settings.seed, 3, "s")
    order = torch.randperm(100, generator=torch.Generator().manual_seed(seed))
    loss, _ = model_loss(model, prep.schema, encode(prep, site.rows).subset(order))
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values() if g is not None))
    scale = min(1.0, 1.0 / (float(norm) + 1e-6))  # clip_grad_norm_(1.0); this gradient is smaller
    for name, p in model.named_parameters():
        if module_of(name) in held:
            g = grads[name] * scale + settings.weight_decay * p.detach()
            step = settings.lr * g / (g.abs() + 1e-8)  # Adam's first step: lr * m_hat / (sqrt(v_hat) + eps)
            np.testing.assert_allclose(new[name], (p.detach() - step).numpy(), rtol=0, atol=1e-6, err_msg=name)
            assert not np.array_equal(new[name], params[name]), name
        else:
            assert grads[name] is None, name  # nothing the site holds reaches these modules
            assert np.array_equal(new[name], params[name]), name


def test_fedprox_term_keeps_modules_closer_to_the_global_ones(heart):
    site, prep, params = site_and_params(heart)
    dist = {}
    for mu in (0.0, 10.0):
        new, _, _ = site.train(prep, "k", MC, SiteSettings(local_epochs=3, mu=mu, val_fraction=0.0), params, 1)
        dist[mu] = sum(float(((new[k] - params[k]) ** 2).sum()) for k in params)
    assert dist[10.0] < dist[0.0]


def test_clientapp_summary_and_train_messages(heart, make_message, site_context):
    df, schema = heart
    rows = df[df.dataset == "Hungary"].reset_index(drop=True)
    ctx = site_context(rows, "Hungary")
    settings = {P.SETTINGS: SiteSettings(val_fraction=0.0, seed=0, local_epochs=1).to_record()}
    reply = client_app(make_message(P.SUMMARY, RecordDict({"config": ConfigRecord(
        {"schema": json.dumps(schema.to_dict()), **settings})})), ctx)
    assert reply.content["site"]["name"] == "Hungary"
    assert R.from_json_record(reply.content["summary"]) == json.loads(json.dumps(site_summary(schema, rows)))

    prep = fit_preprocessor(schema, rows)
    params = {k: v.numpy() for k, v in build_from_preprocessor(prep, MC).state_dict().items()
              if module_of(k) in ("init_state", "encoders.demographics", "decoders.disease")}
    cfg = ConfigRecord({"prep": json.dumps(prep.to_dict()), "model-config": json.dumps(MC.to_dict()),
                        "server-round": 1, **settings})
    reply = client_app(make_message(P.TRAIN, RecordDict({"arrays": R.to_arrayrecord(params), "config": cfg})), ctx)
    assert set(R.names(reply.content["arrays"])) == set(params)
    assert dict(reply.content["counts"]) == {"init_state": len(rows), "encoders.demographics": len(rows),
                                             "decoders.disease": len(rows)}
    reply = client_app(make_message(P.EVALUATE, RecordDict({"arrays": R.to_arrayrecord(params), "config": cfg})), ctx)
    assert "disease/auroc" in reply.content["metrics"]
    assert {r["site"] for r in R.from_json_record(reply.content["records"])} == {"Hungary"}


def test_missing_data_file_is_named(heart, make_message, tmp_path):
    from flwr.app import Context

    ctx = Context(run_id=1, node_id=1, node_config={"data-path": str(tmp_path / "nope.csv")}, state=RecordDict(), run_config={})
    # the summary query replies with the site's name and the reason (the server excludes the site by name)
    reply = client_app(make_message(P.SUMMARY, RecordDict({"config": ConfigRecord(
        {"schema": "{}", P.SETTINGS: SiteSettings().to_record()})})), ctx)
    assert reply.content[P.SITE]["name"] == "nope"
    assert reply.content[P.SITE]["error"].startswith("SiteDataError: ") and "nope.csv" in reply.content[P.SITE]["error"]
    with pytest.raises(SiteDataError, match="nope.csv"):  # the other handlers raise
        client_app(make_message(P.PROFILE, RecordDict({"config": ConfigRecord(
            {"prep": "{}", "model-config": "{}", P.SETTINGS: SiteSettings().to_record()})})), ctx)


def test_the_correction_reaches_local_training_and_is_computed_once(heart, monkeypatch):
    df, schema = heart
    rows = df[df.dataset.isin(["Switzerland", "VA Long Beach"])].reset_index(drop=True)
    prep = fit_preprocessor(schema, rows)
    params = {k: v.numpy().copy() for k, v in build_from_preprocessor(prep, MC).state_dict().items()}
    site = Site("mixed", rows)
    settings = SiteSettings(local_epochs=2, val_fraction=0.0)
    correct = {"exercise_ecg": "disease"}
    plain, _, _ = site.train(prep, "k", MC, settings, params, 1)
    corrected, _, _ = site.train(prep, "k", MC, settings, params, 1, correct)
    # the site trained with presence-balanced dropout of its own rows: the same run, done by hand
    seed = site_seed(0, 1, "mixed")
    model = build_from_preprocessor(prep, MC)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    torch.manual_seed(seed)  # dropout: seeded once the (kept) model holds the received parameters
    data = encode(prep, rows)
    train_epochs(model, schema, data, TrainConfig(epochs=2, seed=seed), 2, torch.Generator().manual_seed(seed),
                 keep=keep_probabilities(data, correct))
    by_hand = model.state_dict()
    assert all(np.array_equal(corrected[k], by_hand[k].numpy()) for k in corrected)
    assert not all(np.array_equal(plain[k], corrected[k]) for k in plain)
    # keep probabilities come from the site's rows once, not every round
    calls = []
    monkeypatch.setattr("clients.site.keep_probabilities", lambda *a: calls.append(1) or keep_probabilities(*a))
    fresh = Site("mixed", rows)
    for rnd in (1, 2, 3):
        fresh.train(prep, "k", MC, settings, params, rnd, correct)
    assert len(calls) == 1


def test_grad_clip_setting_reaches_local_training(heart):
    site, prep, params = site_and_params(heart)
    moved = {}
    for clip in (0.0, 1e-10):  # off, and so small that Adam's eps dominates: steps ~100x shorter
        s = SiteSettings(local_epochs=1, val_fraction=0.0, weight_decay=0.0, grad_clip=clip)
        new, _, _ = site.train(prep, "k", MC, s, params, 1)
        moved[clip] = sum(float(((new[k] - params[k]) ** 2).sum()) for k in params)
    assert moved[1e-10] < 0.01 * moved[0.0]
