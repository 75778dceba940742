"""Installed size of the clinic's edge-only install next to the full install (issue 12, item 1).

    python benchmarks/bench_install.py            # edge-only and full, each in a fresh venv under /tmp
    python benchmarks/bench_install.py --edge-only

edge-only: `pip install <repo>` with no extras (numpy, onnxruntime, cryptography and what they pull in).
full: the README's command, `pip install torch==2.13.0 && pip install -e "<repo>[all]"` (the CPU torch).
Each is built from a copy of the repo (pip builds in the source tree) into a fresh `python -m venv`. Sizes are
disk usage (du) of the venv's site-packages; "installed" leaves out what `python -m venv` seeds (pip,
setuptools), measured on the empty venv before the install.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "edge_runtime", "mmn_fed", "clients", "server", "simulations")
ISSUE_BASELINE_MB = 1700  # `pip install -e .` before the extras, as quoted in issue 12


def du(path: Path) -> dict[str, int]:
    """Disk usage in bytes per top-level entry of ``path`` (hard links counted once), like `du -s`."""
    seen: set[tuple[int, int]] = set()
    sizes: dict[str, int] = {}
    for entry in path.iterdir():
        total = 0
        for dirpath, dirnames, filenames in os.walk(entry) if entry.is_dir() else [(str(path), [], [entry.name])]:
            for name in [*filenames, *dirnames]:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
        sizes[entry.name] = total
    return sizes


def copy_sources(dst: Path) -> Path:
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "node_modules")
    for name in SOURCES:
        path = ROOT / name
        shutil.copytree(path, dst / name, ignore=ignore) if path.is_dir() else shutil.copy2(path, dst / name)
    return dst


def pip(venv: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True, env=env,
                   cwd=venv.parent)


def measure(where: Path, label: str, steps: list[list[str]]) -> dict:
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    seed = sum(du(site).values())
    t0 = time.perf_counter()
    for step in steps:
        pip(venv, *step)
    seconds = time.perf_counter() - t0
    sizes = du(site)
    total = sum(sizes.values())
    dists = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                           capture_output=True, text=True, check=True).stdout.split()
    return {"label": label, "total": total, "seed": seed, "installed": total - seed, "seconds": seconds,
            "top": sorted(sizes.items(), key=lambda kv: -kv[1])[:8], "dists": dists}


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge-only", action="store_true", help="skip the full install (quote the issue's figure)")
    ap.add_argument("--keep", action="store_true", help="keep the venvs (their folder is printed)")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-install-"))
    try:
        src = copy_sources(tmp / "src")
        results = [measure(tmp / "edge", "edge-only: pip install <repo>", [[str(src)]])]
        if not args.edge_only:
            full_src = copy_sources(tmp / "full-src")
            results.append(measure(tmp / "full", 'full: pip install torch==2.13.0 && pip install -e "<repo>[all]"',
                                   [["torch==2.13.0"], ["-e", f"{full_src}[all]"]]))
        print(f"{'install':68} {'site-packages':>14} {'venv seed':>10} {'installed':>10} {'pip time':>9}")
        for r in results:
            print(f"{r['label']:68} {mb(r['total']):>14} {mb(r['seed']):>10} {mb(r['installed']):>10} "
                  f"{r['seconds']:8.0f}s")
        if args.edge_only:
            print(f"{'baseline (issue 12, pip install -e . before the extras; not measured here)':68} "
                  f"{'~' + mb(ISSUE_BASELINE_MB * 10**6):>14}")
        for r in results:
            print(f"\n{r['label']}: largest entries of site-packages")
            for name, size in r["top"]:
                print(f"  {mb(size):>10}  {name}")
            if len(r["dists"]) <= 20:
                print("  distributions: " + " ".join(r["dists"]))
            else:
                print(f"  {len(r['dists'])} distributions")
        if args.keep:
            print(f"\nvenvs kept under {tmp}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
