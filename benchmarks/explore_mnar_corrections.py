"""Exploration that chose the MNAR correction (kept for the record; docs/simulations.md quotes it).

Centralized MultiModN at 80% label-dependent MNAR (the shipped exp4 scenarios), scored on the clean and the
label-flipped test rows, comparing: no correction ("off"), the former loss weights ("weight",
TrainConfig.balance_missingness), presence-balanced modality dropout ("drop", as mmn_fed/correction.py now
does), and the oracle (trained without the injected rule). The loss weights were removed afterwards, so this
script runs against commit 4f078a4 or earlier (`git worktree add /tmp/old 4f078a4`, then run it there with
PYTHONPATH=/tmp/old):

    python benchmarks/explore_mnar_corrections.py exp4-mnar off,weight,drop,oracle 3
    python benchmarks/explore_mnar_corrections.py exp4-mnar-support2 off,weight,drop,oracle 2

Measured there (AUROC, mean over seeds): heart clean/flipped off 0.865/0.364, weight 0.884/0.823, drop
0.893/0.896, oracle 0.897/0.890; support2 (disease modality) off 0.743/0.140, weight 0.748/0.663, drop
0.754/0.713, oracle 0.756/0.710.
"""
import copy, sys, time, json
import numpy as np, torch
from simulations.scenario import load, _at_point
from simulations.runner import prepare
from mmn_fed.data import encode, fit_preprocessor, TensorData
from mmn_fed.api import stratify_key
from mmn_fed.model import ModelConfig
from mmn_fed.model_io import build_from_preprocessor
from mmn_fed.training import TrainConfig, train_epochs, split_indices, monitor_value, default_monitor
from mmn_fed.evaluation import predict_final
from mmn_fed.metrics import auroc
torch.set_num_threads(1)

def keep_probs(data, task, mods, prior=1.0):
    """per modality: keep prob per row so that P(present|y) equal across y (min)."""
    y = data.y[task].numpy(); lab = data.y_present[task].numpy()
    out = {}
    for m in mods:
        p = data.present[m].numpy()
        rates = {}
        for c in np.unique(y[lab]):
            r = lab & (y == c)
            rates[c] = (p[r].sum() + prior * p[lab].mean()) / (r.sum() + prior)
        target = min(rates.values())
        k = np.ones(len(y), dtype=np.float32)
        for c, rc in rates.items():
            k[lab & (y == c)] = target / rc if rc > 0 else 1.0
        out[m] = k
    return out

def with_present(d, pres):
    return TensorData(d.x, pres, d.y, d.y_present, d.cell_weight)

def fit(model, schema, targets, train, val, tc, mode, task, gen_seed):
    torch.manual_seed(tc.seed); gen = torch.Generator().manual_seed(tc.seed)
    rng = np.random.default_rng(gen_seed)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
    mods = list(model.modalities)
    kp = keep_probs(train, task, mods) if mode.startswith("drop") else None
    if mode.startswith("drop") and val is not None:
        kv = keep_probs(val, task, mods)
        val = with_present(val, {m: val.present[m] & torch.from_numpy(rng.random(len(val)) < kv[m]) for m in mods})
    monitor = default_monitor(schema)
    best, best_state, best_epoch = -1e9, None, 0
    import dataclasses; cfg = dataclasses.replace(tc, balance_missingness=(mode == "weight"))
    for epoch in range(1, tc.epochs + 1):
        d = train
        if kp is not None:
            d = with_present(train, {m: train.present[m] & torch.from_numpy(rng.random(len(train)) < kp[m]) for m in mods})
        train_epochs(model, schema, d, cfg, 1, gen, optimizer=opt)
        s = monitor_value(model, schema, val, monitor, targets)
        if s > best + 1e-6: best, best_epoch, best_state = s, epoch, copy.deepcopy(model.state_dict())
        if epoch - best_epoch >= tc.patience: break
    model.load_state_dict(best_state); model.eval()

def score(model, prep, df, task):
    d = encode(prep, df); ok = d.y_present[task].numpy()
    p = predict_final(model, d, prep.targets)[task]
    return auroc(d.y[task].numpy()[ok], p[ok])

def run(name, frac, seed, mode, kind="multimodn"):
    sc = load(name)
    sc = _at_point(sc.raw, {"missingness.0.fraction": frac}, sc.base_dir)
    data = prepare(sc, seed)
    # test rows: always from the 0.8 scenario (same seed -> same test patients)
    sc8 = _at_point(load(name).raw, {"missingness.0.fraction": 0.8}, sc.base_dir)
    tests = prepare(sc8, seed).tests
    schema = sc.schema; task = next(iter(schema.tasks))
    df = data.train
    prep = fit_preprocessor(schema, df)
    keep, vi = split_indices(len(df), 0.2, seed, stratify_key(schema, df))
    enc = encode(prep, df)
    torch.manual_seed(seed)
    model = build_from_preprocessor(prep, ModelConfig(kind=kind))
    tc = TrainConfig(seed=seed)
    fit(model, schema, prep.targets, enc.subset(keep), enc.subset(vi), tc, mode, task, seed + 99)
    return {c: score(model, prep, t, task) for c, t in tests.items()}

if __name__ == "__main__":
    name = sys.argv[1]; modes = sys.argv[2].split(","); seeds = range(int(sys.argv[3]))
    kind = sys.argv[4] if len(sys.argv) > 4 else "multimodn"
    res = {}
    for mode in modes:
        frac = 0.0 if mode == "oracle" else (0.0 if mode.endswith("-clean") else 0.8)
        m = mode.replace("oracle", "off").replace("-clean", "")
        vals = [run(name, frac, s, m, kind) for s in seeds]
        c = np.mean([v["clean"] for v in vals]); f = np.mean([v["mnar_flipped"] for v in vals])
        print(f"{name} {kind} {mode:12s} clean {c:.3f} flipped {f:.3f}  per-seed flipped {[round(v['mnar_flipped'],3) for v in vals]}", flush=True)
