"""Centralized training throughput (issue 14 item 1): MultiModN next to a plain PyTorch MLP of the same parameter
count, trained on the same rows in the same run, and the setup time of a large cohort.

    PYTHONPATH=. python benchmarks/bench_throughput.py                        # 10k, 100k, 1M rows
    PYTHONPATH=. python benchmarks/bench_throughput.py --rows 100000 --repeats 5
    PYTHONPATH=. python benchmarks/bench_throughput.py --paired-against 4fc3396   # results unchanged vs a git rev

Cohort: ``make_synthetic`` with 5 modalities of 8 numeric columns, each missing (MCAR) in ``--missing`` of the
rows, one binary task. MultiModN: the default architecture (``ModelConfig()``), ``train_epochs`` with
batch 256, Adam and gradient clipping as ``fit`` sets them (the hand-differentiated step, mmn_fed/fused.py;
also through autograd, ``fused=False``, in the same run). Baseline: ``nn.Sequential`` of 2 hidden ReLU layers
on the 40 imputed columns, the width chosen so the parameter count matches MultiModN's, trained with
Adam (foreach) and ``clip_grad_norm_`` at the same settings, the batch picked by ``randperm`` per step. One
torch thread. Per epoch: median and min over ``--repeats`` epochs (after one warm-up epoch each), the
two models' epochs alternated so that both see the same load; the ratio is the median of the paired ratios
(and min / min); target MultiModN / MLP <= 1.5.

Setup: ``train_centralized`` with ``epochs=0`` on the 1M-row cohort (input checks, preprocessing fit, missingness
audit, stratified split, encoding; everything before the first epoch), warm (imports done), CPU seconds;
target < 2 s.

``--paired-against REV``: centralized MultiModN with the default configuration trained by this tree and by the
code at git revision REV (``git archive`` into a temporary directory, run in a subprocess) on the benchmark
splits (benchmarks/splits.py: heart = FLamby's test patients, support2 = a held-out stratified 30%), seeds
0..4: AUROC of the first task on the test rows per seed and the mean paired difference (new - old); target
>= -0.005 on each dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO, TARGET_SETUP, TARGET_PAIRED = 1.5, 2.0, -0.005
MODALITIES = {f"m{i}": 8 for i in range(5)}


def cohort(n: int, missing: float, seed: int = 0):
    """The synthetic cohort: 5 modalities x 8 columns, one binary task ``outcome``."""
    from edge_runtime.schema import Schema
    from mmn_fed.data import make_synthetic

    df, schema = make_synthetic(n, MODALITIES, missing_rate=missing, seed=seed)
    d = schema.to_dict()
    d["tasks"] = [t for t in d["tasks"] if t["name"] == "outcome"]
    return df.drop(columns=["score"]), Schema.from_dict(d)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def baseline_mlp(d_in: int, target: int) -> nn.Sequential:
    """2 hidden ReLU layers of the width h whose parameter count (h^2 + (d_in + 3) h + 1) is closest to ``target``."""
    b = d_in + 3
    h = max(1, round((-b + (b * b + 4 * (target - 1)) ** 0.5) / 2))
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))


def mmn_epoch(data, schema, seed: int, fused: bool = True):
    """(one-epoch closure, parameter count) for MultiModN trained as ``fit`` trains it, batch 256; ``fused=False``:
    through autograd (``train_epochs(fused=False)``, the step before mmn_fed/fused.py)."""
    from mmn_fed.model import ModelConfig
    from mmn_fed.training import TrainConfig, train_epochs

    config = TrainConfig(batch_size=256, seed=seed)
    torch.manual_seed(seed)
    model = _mmn(data, schema, ModelConfig())
    gen = torch.Generator().manual_seed(seed)
    opt = _fit_optimizer(model, config)
    return (lambda: train_epochs(model, schema, data, config, 1, gen, optimizer=opt, fused=fused)), n_params(model)


def _mmn(data, schema, config):
    from mmn_fed.model import build_model

    dims = {m: int(x.shape[1]) for m, x in data.x.items()}
    return build_model(dims, {t: 1 for t in schema.tasks}, config)


def _fit_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    """The optimizer ``fit`` builds (whatever this tree's ``fit`` uses)."""
    from mmn_fed import training

    make = getattr(training, "make_optimizer", None)
    if make is not None:
        return make(model.parameters(), config)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def mlp_epoch(data, target_params: int, seed: int):
    """(one-epoch closure, parameter count) for the plain MLP: Adam (foreach), clip_grad_norm_, batch 256."""
    from mmn_fed.settings import DEFAULTS

    x = torch.cat([data.x[m] for m in data.x], dim=1)
    y = data.y["outcome"]
    torch.manual_seed(seed)
    model = baseline_mlp(x.shape[1], target_params)
    opt = torch.optim.Adam(model.parameters(), lr=DEFAULTS.lr, weight_decay=DEFAULTS.weight_decay, foreach=True)
    gen = torch.Generator().manual_seed(seed)
    model.train()

    def epoch() -> None:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 256):
            idx = perm[i:i + 256]
            loss = F.binary_cross_entropy_with_logits(model(x[idx]).squeeze(-1), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), DEFAULTS.grad_clip)
            opt.step()

    return epoch, n_params(model)


def timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of ``fn()``: on a shared machine the CPU time is the stable one."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - t0


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times):7.3f} s (min {min(times):.3f})"


def throughput(args) -> None:
    from mmn_fed.data import encode, fit_preprocessor

    print("CPU seconds per epoch (1 thread); ratio = median of the paired per-epoch ratios (min / min; wall-clock);"
          " autograd = the same MultiModN step through autograd (train_epochs(fused=False))")
    print(f"{'rows':>9}  {'MultiModN epoch, median (min)':>30}  {'rows/s':>8}  {'MLP epoch, median (min)':>26}"
          f"  {'ratio MMN / MLP':>19}  {'autograd epoch (ratio)':>24}  params MMN / MLP")
    for n in args.rows:
        df, schema = cohort(n, args.missing)
        data = encode(fit_preprocessor(schema, df), df)
        repeats = args.repeats if n < 1_000_000 else max(1, args.repeats // 2)
        run_mmn, p_mmn = mmn_epoch(data, schema, args.seed)
        run_auto, _ = mmn_epoch(data, schema, args.seed, fused=False)
        run_mlp, p_mlp = mlp_epoch(data, p_mmn, args.seed)
        run_mmn(), run_auto(), run_mlp()  # warm-up epochs
        mmn, mlp, auto, wall = [], [], [], []
        for _ in range(repeats):  # alternated, so all three see the same load on a shared machine
            (c_mmn, w_mmn), (c_mlp, w_mlp), (c_auto, _) = timed(run_mmn), timed(run_mlp), timed(run_auto)
            mmn.append(c_mmn)
            mlp.append(c_mlp)
            auto.append(c_auto)
            wall.append(w_mmn / w_mlp)
        ratio = statistics.median(a / b for a, b in zip(mmn, mlp))
        ratio_auto = statistics.median(a / b for a, b in zip(auto, mlp))
        print(f"{n:>9}  {fmt(mmn):>30}  {n / statistics.median(mmn):8.0f}  {fmt(mlp):>26}  "
              f"{ratio:8.2f} ({min(mmn) / min(mlp):.2f}; wall {statistics.median(wall):.2f})  "
              f"{statistics.median(auto):9.3f} s ({ratio_auto:.2f})  {p_mmn} / {p_mlp}", flush=True)
        print(f"           target MultiModN / MLP <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}")


def setup_time(args) -> None:
    from mmn_fed import TrainConfig, train_centralized

    df, schema = cohort(args.setup_rows, args.missing)
    train_centralized(df.iloc[:2000], schema, train_config=TrainConfig(epochs=0))  # imports, first-call caches
    for vf in (0.0, 0.2):
        times, wall = [], []
        for _ in range(args.repeats):
            cpu, w = timed(lambda: train_centralized(df, schema, train_config=TrainConfig(epochs=0, val_fraction=vf)))
            times.append(cpu)
            wall.append(w)
        ok = statistics.median(times) < TARGET_SETUP
        print(f"setup of {args.setup_rows} rows (val-fraction {vf:g}): CPU {fmt(times)}, wall {fmt(wall)}; "
              f"target < {TARGET_SETUP} s: {'met' if ok else 'NOT met'}", flush=True)


# ---- paired check against another revision ----------------------------------------------------------

WORKER = r"""
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
from splits import load_split
from mmn_fed import ModelConfig, TrainConfig, train_centralized
from mmn_fed.data import encode
from mmn_fed.evaluation import predict_final
from mmn_fed.metrics import auroc
name, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
split = load_split(name)
y, lab = split.labels(split.test)
out = {}
for seed in seeds:
    c = train_centralized(split.train, split.schema, ModelConfig(), TrainConfig(seed=seed))
    data = encode(c.trained.preprocessor, split.test[lab].reset_index(drop=True))
    p = predict_final(c.trained.model, data, c.trained.preprocessor.targets)[split.task]
    out[seed] = {"auroc": float(auroc(y[lab].astype(int), p)), "best_epoch": c.fit_info["best_epoch"],
                 "seconds": c.fit_info["seconds"]}
print("RESULT " + json.dumps(out))
"""


def run_tree(root: Path, name: str, seeds: list[int]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", WORKER, name, ",".join(map(str, seeds))], cwd=root, env=env,
                       capture_output=True, text=True)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"training in {root} failed:\n{r.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(line[-1][7:]).items()}


def paired(args) -> None:
    from mmn_fed.metrics import mean_ci

    with tempfile.TemporaryDirectory() as tmp:
        old_root = Path(tmp)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.paired_against], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive, check=True)
        seeds = list(range(args.seeds))
        for name in args.datasets:
            old = run_tree(old_root, name, seeds)
            new = run_tree(REPO, name, seeds)
            diffs = [new[s]["auroc"] - old[s]["auroc"] for s in seeds]
            print(f"== {name}: AUROC (first task, test rows), default MultiModN, {args.paired_against} vs this tree")
            for s in seeds:
                print(f"  seed {s}: old {old[s]['auroc']:.4f} (best epoch {old[s]['best_epoch']}, "
                      f"{old[s]['seconds']:.1f} s)  new {new[s]['auroc']:.4f} (best epoch {new[s]['best_epoch']}, "
                      f"{new[s]['seconds']:.1f} s)  diff {diffs[s]:+.4f}")
            m, lo, hi = mean_ci(diffs)
            print(f"  mean paired diff (new - old) {m:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}]; target >= {TARGET_PAIRED}: "
                  f"{'met' if m >= TARGET_PAIRED else 'NOT met'}; training time old "
                  f"{np.mean([old[s]['seconds'] for s in seeds]):.1f} s, new {np.mean([new[s]['seconds'] for s in seeds]):.1f} s",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=5, help="timed epochs per model (half at 1M rows), setup runs")
    ap.add_argument("--missing", type=float, default=0.1, help="share of rows missing each modality (MCAR)")
    ap.add_argument("--setup-rows", type=int, default=1_000_000, help="rows of the setup timing (0: skip it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paired-against", metavar="REV", help="only the paired AUROC check against git revision REV")
    ap.add_argument("--datasets", nargs="+", default=["heart", "support2"], help="--paired-against: datasets")
    ap.add_argument("--seeds", type=int, default=5, help="--paired-against: seeds 0..N-1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.paired_against:
        paired(args)
        return
    throughput(args)
    if args.setup_rows:
        setup_time(args)


if __name__ == "__main__":
    main()
