"""Matplotlib helpers of the study reports (Agg backend, no display).

Shared by ``experiments/report.py`` and ``experiments/stress_report.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def band(ax: Any, x: np.ndarray, mean: np.ndarray, std: np.ndarray,
         label: str, color: Optional[str], ls: str = "-",
         marker: Optional[str] = None, alpha: float = 0.2) -> None:
  """Plot ``mean`` over ``x`` with a shaded ``mean +- std`` band."""
  ax.plot(x, mean, color=color, ls=ls, marker=marker, label=label)
  ax.fill_between(x, mean - std, mean + std, color=color, alpha=alpha, lw=0)


def save_figure(fig: Any, path: Path, written: list) -> None:
  """Write ``fig`` to ``path`` (130 dpi), close it, append ``path`` to
  ``written``."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)
  written.append(path)


__all__ = ["band", "plt", "save_figure"]
