"""CIFAR-10-C stand-in for the study: corrupt test images offline (NumPy).

Used by ``experiments/study.py`` to evaluate the final models of the
``cifar_vit`` study under Gaussian noise, Gaussian blur and contrast at
CIFAR-10-C's parameters (Hendrycks & Dietterich, ICLR 2019). The real
CIFAR-10-C is loaded by :func:`synstrip_vit.datasets.load_dataset` as
``cifar10_corrupted/<corruption>_<severity>`` when prepared with TFDS.
"""

from __future__ import annotations

import types
from typing import Mapping, Tuple

import numpy as np

from synstrip_vit.input_pipeline import check_nonneg_int

#: Hendrycks & Dietterich (ICLR 2019) CIFAR-10-C parameters, severities 1..5.
CORRUPTION_PARAMS: Mapping[str, Tuple[float, ...]] = types.MappingProxyType({
    # Additive N(0, c^2) noise on the [0, 1] scale.
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    # Gaussian blur with standard deviation c pixels.
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    # (x - mean) * c + mean, mean per image and channel.
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
})


def apply_corruption(images: np.ndarray, kind: str, severity: int, *,
                     seed: int) -> np.ndarray:
  """Corrupts uint8 images like CIFAR-10-C (offline stand-in).

  Parameters follow Hendrycks & Dietterich (2019), ``make_cifar_c.py``, on
  the ``[0, 1]`` scale (``x = images / 255``):

  * ``gaussian_noise``: ``x + N(0, c^2)``, ``c = [.04, .06, .08, .09, .10]``.
  * ``gaussian_blur``: Gaussian filter with ``sigma = [.4, .6, .7, .8, 1]``
    pixels over H and W of each channel (``scipy.ndimage.gaussian_filter``,
    ``mode="nearest"`` as skimage's ``gaussian`` used by the original).
  * ``contrast``: ``(x - m) * c + m``, ``m`` the per-image, per-channel
    mean, ``c = [.75, .5, .4, .3, .15]``.

  Results are clipped to ``[0, 1]`` and mapped back with
  ``round(x * 255)`` (the original truncates with ``np.uint8``; rounding
  avoids its -0.5 bias). Only ``gaussian_noise`` uses randomness:
  ``np.random.default_rng(seed)``.

  Args:
    images: ``[N, H, W, C]`` uint8.
    kind: a key of :data:`CORRUPTION_PARAMS`.
    severity: int in 1..5.
    seed: non-negative int.

  Returns:
    ``[N, H, W, C]`` uint8 corrupted images (a new array).

  Raises:
    ValueError: unknown ``kind`` (lists the valid ones), ``severity`` not in
      1..5, bad ``seed``, or images not uint8 4-D.
  """
  if kind not in CORRUPTION_PARAMS:
    raise ValueError(f"unknown corruption kind {kind!r}; valid: "
                     f"{sorted(CORRUPTION_PARAMS)}")
  if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
      or not 1 <= severity <= 5:
    raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
  check_nonneg_int("seed", seed)
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
        f"apply_corruption needs uint8 [N, H, W, C] images, got dtype "
        f"{images.dtype}, shape {images.shape}")
  c = CORRUPTION_PARAMS[kind][int(severity) - 1]
  x = images.astype(np.float32) / 255.0
  if kind == "gaussian_noise":
    rng = np.random.default_rng(int(seed))
    x = x + rng.normal(scale=c, size=x.shape).astype(np.float32)
  elif kind == "gaussian_blur":
    from scipy import ndimage  # Lazy: only needed here.
    x = ndimage.gaussian_filter(x, sigma=(0.0, c, c, 0.0), mode="nearest")
  else:  # contrast
    means = x.mean(axis=(1, 2), keepdims=True)
    x = (x - means) * c + means
  return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
