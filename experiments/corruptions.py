"""The study's corruptions: :mod:`synstrip_vit.corruptions` under the names
``experiments/study.py`` uses.

``apply_corruption(images, kind, severity, seed=...)`` is
:func:`synstrip_vit.corruptions.corrupt`; ``CORRUPTION_PARAMS`` its parameter
table (Hendrycks & Dietterich, ICLR 2019, CIFAR-10-C's ``make_cifar_c.py``).
"""

from __future__ import annotations

import numpy as np

from synstrip_vit.corruptions import PARAMS as CORRUPTION_PARAMS
from synstrip_vit.corruptions import corrupt

__all__ = ["CORRUPTION_PARAMS", "apply_corruption"]


def apply_corruption(images: np.ndarray, kind: str, severity: int, *,
                     seed: int) -> np.ndarray:
  """``corrupt(images, kind, severity, seed)``: uint8 ``[N, H, W, C]`` in and
  out (see :func:`synstrip_vit.corruptions.corrupt`)."""
  return corrupt(images, kind, severity, seed)
