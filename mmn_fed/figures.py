"""The one place figures are made and saved: a headless pyplot and ``save_figure``."""
from __future__ import annotations

import base64
import html
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


def img_html(path: str | Path, alt: str) -> str:
    """A <figure> holding the PNG at ``path`` as a base64 data URI (the report needs no other file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(alt)}</figcaption></figure>')
