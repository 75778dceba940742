"""`mmn-edge serve` (issue 12): latency of one patient over HTTP next to ``Bundle.predict`` in process, the
throughput of a 100-patient request, and the start-up (verify + first prediction).

A small heart model is trained, exported and served on 127.0.0.1 (port 0) in this process; the client is
urllib, one connection per request (as simple clinic software would call it).

    python benchmarks/bench_serve.py [--repeats 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from edge_runtime.bundle import load_bundle
from edge_runtime.serve import ServeConfig, Service, make_server
from mmn_fed import ModelConfig, TrainConfig, load_builtin, train_centralized
from mmn_fed.export import export_bundle, generate_keypair


def quantiles(times: list[float]) -> str:
    q = statistics.quantiles(times, n=100)
    return f"p50 {statistics.median(times) * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    df, schema = load_builtin("heart")
    res = train_centralized(df, schema, ModelConfig(dropout=0.0), TrainConfig(epochs=3, patience=3, seed=0))
    cols = list(schema.input_columns)
    rows = [{c: v for c, v in r.items() if v == v} for r in df[cols].astype(object).to_dict("records")]  # v != v: NaN
    with tempfile.TemporaryDirectory() as tmp:
        priv, pub = generate_keypair(Path(tmp) / "keys")
        b = export_bundle(res.trained, Path(tmp) / "b", sign_key=priv)
        t0 = time.perf_counter()
        service = Service(b, pub)
        service.predict({"patient": rows[0]})
        print(f"start-up (verify, load, first prediction): {(time.perf_counter() - t0) * 1e3:.0f} ms")
        bundle = load_bundle(b, trust_key=pub)
        server = make_server(service, ServeConfig(port=0))
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def post(body: dict) -> dict:
            req = urllib.request.Request(server.url + "/predict", json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                return json.loads(r.read())

        for name, fn in [("in process, Bundle.predict([row], explain=True)",
                          lambda i: bundle.predict([rows[i % len(rows)]], explain=True)),
                         ("HTTP POST /predict, 1 patient, explain",
                          lambda i: post({"patient": rows[i % len(rows)]}))]:
            times = []
            for i in range(args.repeats):
                t = time.perf_counter()
                fn(i)
                times.append(time.perf_counter() - t)
            print(f"{name:<50} {quantiles(times)}")
        batch = rows[:100]
        times = []
        for _ in range(max(10, args.repeats // 10)):
            t = time.perf_counter()
            post({"patients": batch})
            times.append(time.perf_counter() - t)
        print(f"{'HTTP POST /predict, 100 patients, explain':<50} {quantiles(times)} "
              f"({100 / statistics.median(times):.0f} patients/s)")
        print(f"load average {os.getloadavg()[0]:.1f}")
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
