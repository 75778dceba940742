"""The federated missingness audit and the correction it decides, through the real ServerApp and ClientApps."""
import json

import numpy as np
import pytest

from clients.app import app as client_app
from server.engines import run_federation, write_site_data
from server.engines.inprocess import InProcessGrid, server_context
from server.app import app as server_app

FAST = {"local_epochs": 1, "state_size": 8, "hidden": 8}


def mnar_sites(heart_sites, fraction=0.85):
    """heart's hospitals with exercise_ecg removed for ``fraction`` of the diseased patients at every site."""
    sites, schema = heart_sites
    rng = np.random.default_rng(0)
    out = {}
    for name, df in sites.items():
        df = df.copy()
        hit = (df["num"] > 0).to_numpy() & (rng.random(len(df)) < fraction)
        df.loc[hit, list(schema.modalities["exercise_ecg"])] = np.nan
        out[name] = df
    return out, schema


@pytest.mark.parametrize("mode, corrected", [("auto", {"exercise_ecg": "disease"}), ("off", {})])
def test_the_audit_finds_the_mnar_modality_and_auto_corrects_it(heart_sites, tmp_path, mode, corrected):
    sites, schema = mnar_sites(heart_sites)
    res = run_federation(sites, schema, rounds=1, seed=0, run_dir=tmp_path / mode, missingness=mode, **FAST)
    plan = json.loads((tmp_path / mode / "audit.json").read_text())
    assert plan["mode"] == mode and plan["corrected"] == corrected
    assert plan["audit"]["flagged"] == {"exercise_ecg": "disease"}  # found whatever the mode
    flagged_sites = {f["site"] for f in plan["audit"]["findings"] if f["flagged"] and f["name"] == "exercise_ecg"}
    assert {"Cleveland", "Hungary", "VA Long Beach"} <= flagged_sites  # per site, not only pooled
    assert res.trained.metadata["provenance"]["missingness"]["corrected"] == corrected
    assert {r["corrected"] for r in res.records} == {",".join(corrected)}


def test_sites_train_with_the_correction_the_server_decided_and_small_cells_stay_home(heart_sites, tmp_path):
    sites, schema = mnar_sites(heart_sites)
    seen = []

    def spying_client(msg, ctx):
        reply = client_app(msg, ctx)
        seen.append((msg, reply))
        return reply

    rc = {"num-server-rounds": 1, "seed": 0, "data-dir": str(write_site_data(tmp_path / "data", sites, schema)),
          "run-dir": str(tmp_path / "run"), "local-epochs": 1, "state-size": 8, "hidden": 8, "audit-min-cell": 10}
    grid = InProcessGrid(spying_client, [{"partition-id": i, "num-partitions": 4} for i in range(4)], rc)
    server_app(grid, server_context(rc))
    trains = [m for m, _ in seen if m.metadata.message_type == "train"]
    assert trains and all(json.loads(str(m.content["config"]["correction"])) == {"exercise_ecg": "disease"}
                          for m in trains)
    # every count a site sent in the clear is 0 or >= the minimum cell count
    for m, reply in seen:
        if m.metadata.message_type == "query.summary":
            counts = json.loads(str(reply.content["audit"]["json"]))
            assert counts["min_cell"] == 10
            for t in counts["tables"]:
                if t.get("suppressed"):
                    assert "n" not in t and "present" not in t
                    continue
                cells = t["present"] + [a - b for a, b in zip(t["n"], t["present"])]
                assert all(c == 0 or c >= 10 for c in cells)
    # Switzerland has fewer than 10 healthy patients: its tables were suppressed, not sent
    plan = json.loads((tmp_path / "run" / "audit.json").read_text())
    swiss = [f for f in plan["audit"]["findings"] if f["site"] == "Switzerland"]
    assert swiss and all(f["suppressed"] for f in swiss)
