"""The one place figures are made and saved: a headless pyplot and ``save_figure``."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use: figures are optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 100, layout: bool = True) -> Path:
    """Lay out ``fig`` (unless ``layout`` is False: it was laid out when made), write it as a PNG to ``path``
    (parents created) and close it."""
    path = Path(path)
    if layout:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
