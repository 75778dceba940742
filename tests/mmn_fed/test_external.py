"""External validation: predict / evaluate / recalibrate on heart's rows (train on three hospitals, score the
fourth), with models trained for a few epochs."""
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mmn_fed.api import save_trained, train_centralized
from mmn_fed.cli import main
from mmn_fed.data import encode, load_builtin
from mmn_fed.evaluation import predict_final
from mmn_fed.export import ExportError, export_bundle
from mmn_fed.external import (
    ExternalError, audit_shifts, training_audit_of, evaluate_csv, evaluate_site, predict_csv, recalibrate, save_recalibrated,
)
from mmn_fed.metrics import bootstrap_ci, mean_ci
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import load_model, model_id
from mmn_fed.training import TrainConfig

EXTERNAL = "Cleveland"


@pytest.fixture(scope="module")
def heart():
    df, schema = load_builtin("heart")
    return df[df["dataset"] != EXTERNAL].reset_index(drop=True), df[df["dataset"] == EXTERNAL].reset_index(drop=True), schema


@pytest.fixture(scope="module")
def models(heart, tmp_path_factory):
    train, _, schema = heart
    d = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("multimodn", "pfusion"):
        res = train_centralized(train, schema, ModelConfig(kind=kind), TrainConfig(epochs=3))
        out[kind] = save_trained(d / f"{kind}.pt", res.trained)
    return out


@pytest.mark.parametrize("kind", ["multimodn", "pfusion"])
def test_predict_equals_predict_final(heart, models, tmp_path, kind):
    _, ext, _ = heart
    src = tmp_path / "ext.csv"
    ext.to_csv(src, index=False)
    s = predict_csv(models[kind], src, tmp_path / "pred.csv", keep=["id"])
    out = pd.read_csv(tmp_path / "pred.csv")
    trained = load_model(models[kind])
    expected = predict_final(trained.model, encode(trained.preprocessor, pd.read_csv(src)), trained.preprocessor.targets)
    assert s["rows"] == len(ext) == len(out) and (out["status"] == "ok").all()
    assert out["id"].tolist() == ext["id"].tolist()  # input order
    np.testing.assert_allclose(out["disease"], expected["disease"], rtol=1e-6)
    classes = trained.preprocessor.targets["severity"]["classes"]
    np.testing.assert_allclose(out[[f"severity_p_{c}" for c in classes]].to_numpy(), expected["severity"], rtol=1e-6)
    assert (out["severity"].astype(str) == np.array(classes)[expected["severity"].argmax(1)]).all()
    assert (out["model_id"] == model_id(models[kind])).all()


def test_bad_row_reported_with_its_line_others_predicted(heart, models, tmp_path):
    _, ext, _ = heart
    bad = ext.head(20).astype(object)
    bad.loc[6, "chol"] = "high"  # data row 7 = CSV line 8
    src = tmp_path / "bad.csv"
    bad.to_csv(src, index=False)
    predict_csv(models["multimodn"], src, tmp_path / "pred.csv")
    out = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert out.loc[6, "status"] == "not predicted" and out.loc[6, "disease"] == ""
    assert "line 8" in out.loc[6, "reason"] and "'chol'" in out.loc[6, "reason"]
    assert (out.drop(index=6)["status"] == "ok").all() and len(out) == 20


def test_output_equal_to_input_or_a_directory_is_refused(heart, models, tmp_path):
    _, ext, _ = heart
    src = tmp_path / "ext.csv"
    ext.head(5).to_csv(src, index=False)
    before = src.read_bytes()
    assert main(["predict", str(models["pfusion"]), "--input", str(src), "--output", str(src)]) == 2
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ext.csv"]
    with pytest.raises(ExternalError, match="directory"):
        predict_csv(models["pfusion"], src, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.csv"]


def test_evaluate_auroc_and_ci_match_sklearn_and_report(heart, models, tmp_path):
    _, ext, _ = heart
    src = tmp_path / "site.csv"
    ext.to_csv(src, index=False)
    res = evaluate_csv(models["pfusion"], src, tmp_path / "out", subgroups=["sex"], n_boot=300)
    recs = json.loads((tmp_path / "out" / "metrics.json").read_text())
    trained = load_model(models["pfusion"])
    p = predict_final(trained.model, encode(trained.preprocessor, ext), trained.preprocessor.targets)["disease"]
    y = (ext["num"] > 0).astype(int).to_numpy()
    top = next(r for r in recs if r["task"] == "disease" and r["metric"] == "auroc" and r["subgroup"] == "all"
               and r["combination"] == "all")
    assert top["value"] == pytest.approx(roc_auc_score(y, p))
    assert top["ci_low"] < top["value"] < top["ci_high"] and top["n"] == len(ext)
    assert (top["ci_low"], top["ci_high"]) == pytest.approx(bootstrap_ci(y, p, "auroc", n_boot=300))
    # subgroup metrics are computed on that subgroup's rows
    female = ext["sex"].astype(str) == "Female"
    sub = next(r for r in recs if r["subgroup"] == "sex=Female" and r["task"] == "disease" and r["metric"] == "auroc")
    assert sub["n"] == int(female.sum()) and sub["value"] == pytest.approx(roc_auc_score(y[female], p[female]))
    assert res["report"].endswith("report.html")
    # the report shows metrics.json's numbers
    cells = _cells(tmp_path / "out" / "report.html", "overall")
    shown = {(c[0], c[1]): (c[2], c[3]) for c in cells}
    for r in recs:
        if r["subgroup"] == "all" and r["combination"] == "all":
            value, ci = shown[(r["task"], r["metric"])]
            assert value == f"{r['value']:.3f}"
            if r["ci_low"] is not None:
                assert ci == f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    subs = {(c[0], c[1], c[2]): (c[3], c[4], c[5]) for c in _cells(tmp_path / "out" / "report.html", "subgroups")}
    shown_subs = [r for r in recs if r["subgroup"] != "all" and r["metric"] in ("auroc", "brier")]
    assert len(subs) == len(shown_subs) > 0
    for r in shown_subs:
        assert subs[(r["task"], r["subgroup"], r["metric"])] == (
            f"{r['value']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", str(r["n"]))


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self._cls, self._row, self._cell = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._cls = dict(attrs).get("class", "")
            self.tables[self._cls] = []
        elif tag == "tr" and self._cls is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row:
            self.tables[self._cls].append(self._row)
            self._row = None
        elif tag == "table":
            self._cls = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _cells(path, cls):
    p = _Tables()
    p.feed(path.read_text())
    return p.tables[cls]


def test_audit_comparison_flags_a_removed_modality(heart, models):
    _, ext, schema = heart
    trained = load_model(models["multimodn"])
    assert training_audit_of(trained)["findings"]  # stored at training time
    site = ext.copy()
    sick = site["num"] > 0
    site.loc[sick, ["cp"]] = np.nan  # symptoms removed for diseased patients only
    ev = evaluate_site(trained, site, n_boot=0)
    flagged = {(s["modality"], s["task"]) for s in ev.shifts if s["flag"]}
    assert ("symptoms", "disease") in flagged
    row = next(s for s in ev.shifts if s["modality"] == "symptoms" and s["task"] == "disease")
    assert row["rate_site"][row["labels"].index("1")] == 0.0 and row["dependent_site"]
    assert "present for 0% of disease = 1 patients here" in row["meaning"]
    clean = evaluate_site(trained, ext, n_boot=0)
    assert ("symptoms", "disease") not in {(s["modality"], s["task"]) for s in clean.shifts if s["flag"]}
    assert audit_shifts(ev.audit_site, None) == []


def test_recalibration_reduces_brier_on_a_miscalibrated_site(heart, models, tmp_path):
    _, ext, _ = heart
    # a site where disease is much rarer than in training: keep all healthy, a fifth of the diseased
    sick = np.flatnonzero(ext["num"].to_numpy() > 0)
    drop = np.random.default_rng(0).permutation(sick)[: int(0.8 * len(sick))]
    site = ext.drop(index=drop).reset_index(drop=True)
    trained = load_model(models["multimodn"])
    new, summary = recalibrate(trained, site)
    s = summary["disease"]
    assert s["brier_after"] < s["brier_before"] - 0.01
    assert s["rows"] == len(site) and not s["warnings"]  # ~190 rows, ~30 events: enough
    path = save_recalibrated(tmp_path / "recal.pt", new, model_id(models["multimodn"]))
    loaded = load_model(path)
    p_old = predict_final(trained.model, encode(trained.preprocessor, site), trained.preprocessor.targets)["disease"]
    p_new = predict_final(loaded.model, encode(loaded.preprocessor, site), loaded.preprocessor.targets)["disease"]
    z = np.log(p_old / (1 - p_old))
    np.testing.assert_allclose(p_new, 1 / (1 + np.exp(-(s["intercept"] + s["slope"] * z))), rtol=1e-4, atol=1e-6)
    assert p_new.mean() < p_old.mean()  # prevalence is lower here
    with pytest.raises(ExportError, match="recalibrated"):
        export_bundle(loaded, tmp_path / "bundle")


def test_mean_ci_stays_inside_the_seeds_range():
    m, lo, hi = mean_ci([0.99, 1.0, 0.97])
    assert 0.97 <= lo <= m <= hi <= 1.0
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    y = np.array([0, 1] * 20)
    lo, hi = bootstrap_ci(y, y.astype(float), "auroc", n_boot=200)
    assert lo == hi == 1.0


def test_cli_evaluate_recalibrate_writes_model(heart, models, tmp_path, capsys):
    _, ext, _ = heart
    src = tmp_path / "site.csv"
    ext.head(60).to_csv(src, index=False)
    assert main(["evaluate", str(models["multimodn"]), "--data", str(src), "--out", str(tmp_path / "o"),
                 "--recalibrate", "--bootstrap", "50", "--subgroup", "age"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "noisy" in err  # 60 rows < 100
    assert (tmp_path / "o" / "model-recalibrated.pt").exists()
    recs = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert any(re.match(r"age Q1 \[", r["subgroup"]) for r in recs)
    assert main(["evaluate", str(models["multimodn"]), "--data", str(src), "--subgroup", "nope",
                 "--out", str(tmp_path / "p")]) == 2
