"""The folder layout is the architecture: imports only point down
simulations -> server/clients -> mmn_fed -> edge_runtime (docs/design.md)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "edge_runtime": {"torch", "pandas", "flwr", "mmn_fed", "clients", "server", "simulations"},
    "mmn_fed": {"flwr", "clients", "server", "simulations"},
    "clients": {"server", "simulations"},
    "server": {"simulations"},
}
ALLOWED = {"mmn_fed/records.py": {"flwr"}}  # the one module of mmn_fed that converts Flower records


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_the_layout(package):
    bad = []
    for f in (ROOT / package).rglob("*.py"):
        hits = imported_top_levels(f) & FORBIDDEN[package] - ALLOWED.get(str(f.relative_to(ROOT)), set())
        if hits:
            bad.append(f"{f.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)
