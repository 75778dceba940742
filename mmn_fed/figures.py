"""The one place figures are drawn to PNG and embedded in self-contained HTML reports (headless: Agg)."""
from __future__ import annotations

import base64
import html
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, write ``fig`` as PNG (creating the folder) and close it; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def img_html(path: str | Path, alt: str) -> str:
    """A <figure> holding the PNG at ``path`` as a base64 data URI (the report needs no other file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(alt)}</figcaption></figure>')
