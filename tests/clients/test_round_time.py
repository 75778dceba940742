"""Round time on the deployment engine (docs/federation.md, "Round time"): Flower 1.42 starts one ClientApp
process per message, so whatever the site's module imports is paid by every message. These tests pin what
the handlers' module must not import, and deploy-local's small default."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    """Top-level module names loaded in a fresh interpreter after ``code``."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_clientapp_module_imports_no_torch_and_the_handlers_no_sklearn():
    """Flower's per-message process loads clients.app: torch, pandas and the library stay in the site's worker
    (clients/worker.py), which imports clients.handlers once. summary, profile and train compute no metric:
    the handlers leave scikit-learn and SciPy (~1 s) out."""
    loaded = _modules_after("import clients.app")
    assert "flwr" in loaded  # the test measures the real module
    assert not {"torch", "pandas", "sklearn", "scipy"} & loaded
    loaded = _modules_after("import clients.handlers")
    assert "torch" in loaded and not {"sklearn", "scipy"} & loaded


def test_a_sites_metrics_import_no_sklearn_and_reports_import_it_when_needed():
    """Every train message scores the model it receives (the folded evaluation): its metrics are numpy."""
    code = ("import numpy as np, sys\nfrom mmn_fed import metrics as M\nassert 'sklearn' not in sys.modules\n"
            "y = np.array([0, 1, 0, 1]); p = np.array([0.1, 0.8, 0.4, 0.6])\n"
            "assert M.auroc(y, p) == 1.0 and abs(M.brier(y, p) - 0.0925) < 1e-12\n"
            "M.task_metrics('binary', y, p); M.task_metrics('multiclass', y, np.c_[1 - p, p]); M.task_metrics('regression', y, p)\n"
            "assert 'sklearn' not in sys.modules and 'scipy' not in sys.modules\n"
            "assert M.reliability(y, p)['n'] == [1, 1, 1, 1]\n"
            "lo, hi = M.bootstrap_ci(y, p, 'auroc', n_boot=50, seed=0)\nassert 0.0 <= lo <= hi <= 1.0\n")  # SciPy's rankdata
    assert "sklearn" in _modules_after(code)


def test_deploy_local_runs_3_rounds_by_default_and_says_so():
    from mmn_fed.cli import build_parser
    from server.engines.deployment import DEPLOY_LOCAL_ROUNDS

    argv = ["deploy-local", "--out", "x"]
    args = build_parser(argv).parse_args(argv)
    assert args.num_server_rounds == DEPLOY_LOCAL_ROUNDS == 3
    argv = ["deploy-local", "--rounds", "100"]
    assert build_parser(argv).parse_args(argv).num_server_rounds == 100


_TRAIN = """
import sys, json
import numpy as np, torch
if sys.argv[1] == "dynamo":
    import torch._dynamo  # the ordinary path: optimizers go through torch's dynamo wrappers
from clients.site import Site
from edge_runtime.preprocessing import Preprocessor, merge_summaries
from mmn_fed.data import load_builtin
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.settings import SiteSettings
torch.set_num_threads(1)
df, schema = load_builtin("heart")
site, settings = Site("Hungary", df[df.dataset == "Hungary"].reset_index(drop=True)), SiteSettings()
prep = Preprocessor.from_summary(schema, merge_summaries([site.summary(schema, settings)]))
torch.manual_seed(0)
params = {k: v.numpy().copy() for k, v in build_from_preprocessor(prep, ModelConfig()).state_dict().items()}
new, _, _ = site.train(prep, "k", ModelConfig(), settings, params, 1)
new, _, _ = site.train(prep, "k", ModelConfig(), settings, new, 2)
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, "w": {k: v.ravel().tolist() for k, v in new.items()}}))
"""


def _train_in_fresh_process(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _TRAIN, mode], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_site_trains_without_importing_torch_dynamo_and_to_the_same_weights():
    """torch imports torch._dynamo (~2.5 s, ~10 s on a loaded box) at an optimizer's first use only to keep it
    out of compiled graphs; a site's train process (one per message) skips that and trains bit-identically."""
    fast, ordinary = _train_in_fresh_process("site"), _train_in_fresh_process("dynamo")
    assert not fast["dynamo"] and ordinary["dynamo"]
    assert fast["w"] == ordinary["w"]
