"""The clinic's install (README, docs/edge.md): `pip install .` with no extras, in a fresh venv, brings the
edge runtime without torch, pandas, flwr, onnx or matplotlib; `mmn-edge predict` there gives the main
environment's predictions; `mmn-fed <command>` there names the extra it lacks (one line, exit 2).

Slow: it builds a venv and installs numpy, onnxruntime and cryptography from the package index (~20-60 s).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# what the wheel is built from (pyproject's [tool.setuptools.packages.find] plus the files it reads)
SOURCES = ("pyproject.toml", "README.md", "edge_runtime", "mmn_fed", "clients", "server", "simulations")
# the training / federation stack: none of it may reach the clinic
NOT_AT_THE_EDGE = ("torch", "pandas", "flwr", "onnx", "matplotlib", "scipy", "sklearn", "ray")


def clean_env() -> dict[str, str]:
    """The venv must see only itself: no PYTHONPATH onto a checkout, no pip noise."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    return env


def build_edge_venv(where: Path, root: Path = ROOT) -> Path:
    """A fresh venv at ``where/venv`` with the edge-only install (`pip install <copy of the repo>`, no extras).
    The repo is copied first because pip builds in the source tree (build/, *.egg-info)."""
    src = where / "src"
    src.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "node_modules")
    for name in SOURCES:
        path = root / name
        (shutil.copytree(path, src / name, ignore=ignore) if path.is_dir() else shutil.copy2(path, src / name))
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                         capture_output=True, text=True, timeout=600, env=clean_env(), cwd=where)
    assert out.returncode == 0, f"edge-only install failed:\n{out.stdout}\n{out.stderr}"
    return venv


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    return build_edge_venv(tmp_path_factory.mktemp("edge-install"))


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a console script (or python) of ``venv`` outside the checkout, so the repo is not on sys.path."""
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=300,
                          env=clean_env(), cwd=cwd)


def test_the_edge_install_has_no_training_or_federation_stack(edge_venv, tmp_path):
    code = f"""
import importlib.util, json
import edge_runtime, numpy, onnxruntime, cryptography
print(json.dumps({{
    "present": [m for m in {NOT_AT_THE_EDGE!r} if importlib.util.find_spec(m) is not None],
    "edge_runtime": edge_runtime.__file__,
}}))
"""
    out = run(edge_venv, "python", "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["present"] == [], f"the edge-only install pulled in {found['present']}"
    assert Path(found["edge_runtime"]).is_relative_to(edge_venv), found  # the installed copy, not the checkout


def test_mmn_edge_predicts_like_the_main_environment(edge_venv, heart, tmp_path):
    rows = heart.df.head(60)
    rows.to_csv(tmp_path / "in.csv", index=False)
    out = run(edge_venv, "mmn-edge", "predict", str(heart.bundle), "--trust-key", str(heart.public_key),
              "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.csv"), "--keep", "id",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "out.csv", newline="") as f:
        got = list(csv.DictReader(f))
    from edge_runtime import load_bundle

    ref = load_bundle(heart.bundle, trust_key=heart.public_key).predict(rows.to_dict("records"))
    assert [r["id"] for r in got] == [str(i) for i in rows["id"]]
    assert ref.ok.all()
    np.testing.assert_allclose([float(r["disease"]) for r in got], ref.values["disease"], atol=1e-6, rtol=0)
    probs = [[float(r[f"severity_p_{c}"]) for c in range(5)] for r in got]
    np.testing.assert_allclose(probs, ref.values["severity"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("command, extra", [(["train", "--dataset", "heart", "--out", "run"], "train"),
                                            (["simulate"], "federation")])
def test_mmn_fed_names_the_missing_extra(edge_venv, tmp_path, command, extra):
    out = run(edge_venv, "mmn-fed", *command, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"mmn-fed {command[0]} needs the '{extra}' extra: pip install \"mmn-fed[{extra}]\"")
    assert not (tmp_path / "run").exists()


def test_mmn_edge_serve_on_the_edge_install(edge_venv, heart, tmp_path):
    """`mmn-edge serve` runs on the base install: it answers /health and /predict on 127.0.0.1 with the main
    environment's prediction, and the test stops it."""
    import socket
    import time
    import urllib.request

    from edge_runtime import load_bundle

    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(edge_venv / "bin" / "mmn-edge"), "serve", str(heart.bundle), "--trust-key",
                             str(heart.public_key), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "mmn-edge serve did not answer /health within 60 s"
                time.sleep(0.2)
        inputs = set(load_bundle(heart.bundle, trust_key=heart.public_key).schema.input_columns)
        patient = {k: v for k, v in heart.df.iloc[0].to_dict().items() if k in inputs and v == v}
        req = urllib.request.Request(url + "/predict", data=json.dumps({"patient": patient}, default=str).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            got = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ref = load_bundle(heart.bundle, trust_key=heart.public_key).predict([patient])
    assert got["results"][0]["predictions"]["disease"] == pytest.approx(float(ref.values["disease"][0]), abs=1e-6)
