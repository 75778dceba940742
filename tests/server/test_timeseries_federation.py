"""Federated time series (docs/timeseries.md): sites train on their subjects' sequences, per module."""
import json

import numpy as np
import pytest

from edge_runtime.schema import Schema
from mmn_fed import load_builtin
from mmn_fed.sequences import row_schema
from server.engines import run_federation


@pytest.fixture(scope="module")
def pbcseq_sites():
    df, schema = load_builtin("pbcseq")
    ids = sorted(df["id"].unique())
    a, b = df[df["id"].isin(ids[:60])].reset_index(drop=True), df[df["id"].isin(ids[60:110])].reset_index(drop=True)
    b = b.copy()
    b["chol"] = np.nan  # site B never measures cholesterol: it must never train the lipids encoder
    test = df[df["id"].isin(ids[110:150])].reset_index(drop=True)
    return {"A": a, "B": b}, {"A": test}, schema


def test_sites_train_their_sequences_per_module_and_counts_are_observed_steps(pbcseq_sites, tmp_path):
    sites, tests, schema = pbcseq_sites
    res = run_federation(sites, schema, rounds=2, run_dir=tmp_path / "run", test_sites=tests, seed=0,
                         keep_best=False, patience_rounds=0)
    comm = json.loads((tmp_path / "run" / "comm.json").read_text())
    up = {(c["site"], c["round"]): set(c["modules"]) for c in comm if c["direction"] == "up"}
    assert "encoders.lipids" in up[("A", 1)] and "encoders.lipids" not in up[("B", 1)]
    assert "encoders.labs" in up[("B", 2)]
    # per-module counts are observed steps: what site A reports for its labs encoder is its training subjects'
    # steps holding a lab, not its subjects
    from clients.site import Site
    from mmn_fed.model import ModelConfig
    from mmn_fed.sequences import build_sequences, row_schema, split_subjects
    from mmn_fed.settings import SiteSettings

    seqs = build_sequences(schema, sites["A"])
    keep, _ = split_subjects(len(seqs.ids), 0.2, 0)
    steps = seqs.subjects(keep).steps
    with_labs = int(steps[list(schema.modalities["labs"])].notna().any(axis=1).sum())
    prep = res.trained.preprocessor
    counts = Site("A", sites["A"]).module_counts(prep, "k", SiteSettings(seed=0),
                                                 ModelConfig(encoder="gru"), ts=schema)
    assert counts["encoders.labs"] == with_labs > len(keep)
    assert counts["init_state"] == counts["encoders.demographics"] == len(keep)
    assert counts["decoders.death_or_transplant_2y"] == int(steps["death_or_transplant_2y__target"].notna().sum())
    # the global model is a time-series model: test metrics over the test subjects' steps, GRU encoders
    assert res.history[-1]["test"]["death_or_transplant_2y/auroc"] > 0.5
    assert res.trained.config.encoder == "gru"
    assert Schema.from_dict(res.trained.metadata["timeseries_schema"]) == schema
    assert row_schema(schema).tasks == res.trained.preprocessor.schema.tasks
    # missingness = auto (the default): the sites balance the visit rate against the outcome
    from mmn_fed.correction import VISITS

    assert json.loads((tmp_path / "run" / "audit.json").read_text())["corrected"] == {VISITS: "death_or_transplant_2y"}
    assert res.trained.metadata["provenance"]["missingness"]["corrected"] == {VISITS: "death_or_transplant_2y"}


def test_a_site_trains_on_its_visits_with_the_visit_rate_balanced_when_told(pbcseq_sites):
    """The correction reaches a site's training where the site's visit rate depends on the outcome; where it
    does not, training is exactly the uncorrected one (no draw is made)."""
    import torch

    from clients.site import Site
    from mmn_fed.correction import VISITS
    from mmn_fed.data import fit_preprocessor
    from mmn_fed.model import ModelConfig
    from mmn_fed.model_io import build_from_preprocessor
    from mmn_fed.sequences import build_sequences
    from mmn_fed.settings import SiteSettings

    sites, _, schema = pbcseq_sites
    natural = sites["A"]
    # patients without the event lose 80% of their later visits: the site's own test finds the dependence
    later = natural.duplicated("id").to_numpy() & (natural["status"] == 0).to_numpy()
    thinned = natural[~(later & (np.random.default_rng(0).random(len(natural)) < 0.8))].reset_index(drop=True)
    prep = fit_preprocessor(row_schema(schema), build_sequences(schema, natural).steps)
    cfg = ModelConfig(encoder="gru", state_size=8, hidden=8)
    torch.manual_seed(0)
    params = {k: v.numpy() for k, v in build_from_preprocessor(prep, cfg, schema).state_dict().items()}

    def run(rows, correct):
        return Site("A", rows).train(prep, "k", cfg, SiteSettings(seed=0), params, 1, correct=correct, ts=schema)[0]

    told = {VISITS: "death_or_transplant_2y"}
    plain, balanced = run(thinned, {}), run(thinned, told)
    assert any(not np.array_equal(plain[k], balanced[k]) for k in plain)
    # at the natural site the visit rate does not depend detectably on the outcome: nothing hidden, nothing drawn
    plain, told_anyway = run(natural, {}), run(natural, told)
    assert all(np.array_equal(plain[k], told_anyway[k]) for k in plain)


def test_pfusion_over_a_window_federates_per_module_and_a_site_without_a_modality_never_uploads_its_encoder(
        pbcseq_sites, tmp_path):
    from clients.site import Site
    from mmn_fed.model import ModelConfig
    from mmn_fed.pfusion_window import WindowPFusion
    from mmn_fed.settings import SiteSettings

    sites, tests, schema = pbcseq_sites
    res = run_federation(sites, schema, model="pfusion", pfusion_window=2, rounds=2, run_dir=tmp_path / "run",
                         test_sites=tests, seed=0, keep_best=False, patience_rounds=0)
    comm = json.loads((tmp_path / "run" / "comm.json").read_text())
    up = {(c["site"], c["round"]): set(c["modules"]) for c in comm if c["direction"] == "up"}
    assert "encoders.lipids" in up[("A", 1)] and "encoders.lipids" not in up[("B", 1)] | up[("B", 2)]
    assert "encoders.labs" in up[("B", 2)] and "init_state" not in up[("A", 1)]  # P-Fusion has no initial state
    model = res.trained.model
    assert isinstance(model, WindowPFusion) and model.window == 2 and res.trained.config.encoder == "mlp"
    assert res.history[-1]["test"]["death_or_transplant_2y/auroc"] > 0.5
    # counts follow sequence_module_counts: observed steps for a time-series encoder, subjects for a static one
    counts = Site("B", sites["B"]).module_counts(res.trained.preprocessor, "k", SiteSettings(seed=0),
                                                 res.trained.config, ts=schema)
    assert counts["encoders.lipids"] == 0 and counts["encoders.labs"] > counts["encoders.demographics"] > 0
    assert "init_state" not in counts
