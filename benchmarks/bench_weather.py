"""Weather (issue 11; the paper's Weather experiment in miniature): temperature 24 h ahead, predicted at every hour
of each 72-hour window, at the 3 New York airports (the built-in nycflights13_weather; the airports are the sites).

Train on windows that end (with their 24 h target) before October 1, test on windows starting October 1 or
later (by time: the data is one stream per airport). Scored by RMSE (degrees F) over every test hour with a
target, per airport, then the mean over airports, next to:
- persistence: the temperature now as the forecast for 24 h later;
- ridge regression on lags 0, 1, 3, 6, 12, 24 h of temp, dewp, humid, wind_speed, pressure, precip, plus sin/cos
  of the hour of day and the day of year (missing values: training means), alpha by 5-fold CV, fitted on the
  training hours;
- MultiModN centralized and federated over the 3 airports (default settings; ``mmn_fed.sequences``).

    python benchmarks/bench_weather.py [--seeds 5] [--first-seed 0] [--models centralized federated] [--epochs 150]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmn_fed import ModelConfig, TrainConfig, load_builtin
from mmn_fed.metrics import mean_ci
from mmn_fed.sequences import build_sequences, encode_sequences, predict_steps, row_schema, train_sequences

OCT1 = 273 * 24  # hours from 2013-01-01 00:00 UTC to 2013-10-01 00:00 UTC
LAG_VARS = ["temp", "dewp", "humid", "wind_speed", "pressure", "precip"]
LAGS = [0, 1, 3, 6, 12, 24]
CLOCK = ["hour_sin", "hour_cos", "doy_sin", "doy_cos"]


def rmse_by_airport(rows: pd.DataFrame, pred: np.ndarray) -> dict[str, float]:
    ok = rows["temp_24h"].notna().to_numpy() & np.isfinite(pred)
    err = (pred - rows["temp_24h"].to_numpy()) ** 2
    return {a: float(np.sqrt(err[ok & (rows["origin"] == a).to_numpy()].mean())) for a in sorted(rows["origin"].unique())}


def lag_features(stream: pd.DataFrame) -> pd.DataFrame:
    """Per airport and absolute hour: the lagged variables and the clock (one row per recorded hour)."""
    out = stream[["origin", "abs_hour"] + CLOCK].copy()
    for lag in LAGS:
        shifted = stream[["origin", "abs_hour"] + LAG_VARS].assign(abs_hour=stream["abs_hour"] + lag)
        shifted = shifted.rename(columns={v: f"{v}_lag{lag}" for v in LAG_VARS})
        out = out.merge(shifted, on=["origin", "abs_hour"], how="left")
    return out


def ridge(train_rows: pd.DataFrame, test_rows: pd.DataFrame, stream: pd.DataFrame) -> np.ndarray:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = lag_features(stream)
    cols = [c for c in feats.columns if c not in ("origin", "abs_hour")]
    tr = train_rows.drop_duplicates(["origin", "abs_hour"]).merge(feats, on=["origin", "abs_hour"], how="left",
                                                                  suffixes=("", "_f"))
    tr = tr[tr["temp_24h"].notna()]
    te = test_rows[["origin", "abs_hour"]].merge(feats, on=["origin", "abs_hour"], how="left")
    model = make_pipeline(SimpleImputer(), StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13), cv=5))
    fcols = [c + ("_f" if c in CLOCK else "") for c in cols]
    model.fit(tr[fcols].to_numpy(), tr["temp_24h"].to_numpy())
    return model.predict(te[cols].to_numpy())


def mmn_predict(trained, schema, seqs) -> np.ndarray:
    data = encode_sequences(trained.preprocessor, seqs, schema.timeseries.step_modalities)
    return predict_steps(trained.model, data, trained.preprocessor.targets, row_schema(schema))["temp_24h"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--models", nargs="+", default=["centralized", "federated"], choices=["centralized", "federated"])
    ap.add_argument("--epochs", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    df, schema = load_builtin("nycflights13_weather")
    train_df = df[df["start"] + 72 + 24 <= OCT1].reset_index(drop=True)
    test_df = df[df["start"] >= OCT1].reset_index(drop=True)
    train, test = build_sequences(schema, train_df), build_sequences(schema, test_df)
    rows = test.steps
    print(f"weather: {len(train.ids)} training windows ({len(train.steps)} hours), {len(test.ids)} test windows "
          f"({len(rows)} hours, {int(rows['temp_24h'].notna().sum())} with a target)")
    stream = df.drop_duplicates(["origin", "abs_hour"])
    peers = {"persistence": rmse_by_airport(rows, rows["temp"].to_numpy(dtype=float)),
             "ridge (lags)": rmse_by_airport(rows, ridge(train.steps, rows, stream))}
    for name, r in peers.items():
        print(f"  {name:<24} RMSE {np.mean(list(r.values())):.3f} F  ({', '.join(f'{a} {v:.2f}' for a, v in r.items())})")
    results: dict[str, list[float]] = {m: [] for m in args.models}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for kind in args.models:
            t0 = time.perf_counter()
            if kind == "centralized":
                res = train_sequences(train, schema, ModelConfig(), TrainConfig(epochs=args.epochs, seed=seed))
                trained, info = res.trained, f"best epoch {res.fit_info['best_epoch']}"
            else:
                from server.engines import run_federation

                sites = {a: g.reset_index(drop=True) for a, g in train_df.groupby("origin")}
                with tempfile.TemporaryDirectory() as tmp:
                    fed = run_federation(sites, schema, seed=seed, run_dir=Path(tmp) / "run")
                trained = fed.trained
                info = f"{fed.extra['selection']['rounds_run']} rounds, final round {fed.extra['selection']['final_round']}"
            r = rmse_by_airport(rows, mmn_predict(trained, schema, test))
            results[kind].append(float(np.mean(list(r.values()))))
            print(f"  seed {seed} MultiModN {kind:<12} RMSE {results[kind][-1]:.3f} F ({', '.join(f'{a} {v:.2f}' for a, v in r.items())}; "
                  f"{info}, {time.perf_counter() - t0:.0f} s)", flush=True)
    ridge_rmse = float(np.mean(list(peers["ridge (lags)"].values())))
    pers = float(np.mean(list(peers["persistence"].values())))
    for kind, vals in results.items():
        m, lo, hi = mean_ci(vals)
        print(f"MultiModN {kind}: RMSE {m:.3f} [{lo:.3f}, {hi:.3f}] F over {len(vals)} seeds; minus persistence "
              f"{m - pers:+.3f} (target < 0), minus ridge {m - ridge_rmse:+.3f} (target <= +0.3)")
    if len(results) == 2 and all(results.values()):
        d = mean_ci([f - c for f, c in zip(results["federated"], results["centralized"])])
        print(f"federated - centralized: {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] F (target within 0.2)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
