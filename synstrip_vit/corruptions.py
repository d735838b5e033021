"""Common corruptions of Hendrycks & Dietterich (ICLR 2019) in NumPy/SciPy/Pillow.

:func:`corrupt` applies one of the 15 corruptions of CIFAR-10-C at a
severity 1..5 to uint8 ``[N, H, W, C]`` images, with the parameters of
``make_cifar_c.py`` (``hendrycks/robustness``, ``ImageNet-C/create_c``),
restated here. Four further corruptions of that script that the original
Synaptic Stripping evaluation also reads (``speckle_noise``,
``gaussian_blur``, ``saturate``, ``spatter``) are in
:data:`EXTRA_CORRUPTIONS`; ``spatter`` needs OpenCV's Canny, distance
transform and histogram equalisation and raises ``ValueError``.
:func:`corrupted_split` builds a corrupted evaluation split of any data set;
:func:`load_released` reads released ``-C`` files (``<name>.npy`` +
``labels.npy``, CIFAR-10-C / CIFAR-100-C / SVHN-C layout).

Every parameter table is CIFAR-10-C's (made for 32x32 images) whatever the
image size; Tiny-ImageNet-C was made at 64x64 with other tables, so for Tiny
ImageNet load the released folders instead (``folder:`` datasets).

Like the reference, each corruption works on ``x / 255`` in float64 and the
result ``r`` (on the 0..255 scale, clipped) is stored as ``uint8(r)``
(truncation). Randomness comes from ``np.random.default_rng(seed)`` instead of
NumPy's global state, so a generated set has the released set's
distribution, never its pixels. Other differences from the released files:

* ``motion_blur``, ``snow``: ImageMagick's ``MotionBlurImage`` is restated in
  NumPy: a one-sided Gaussian kernel of ``2 * radius + 1`` taps,
  ``k_i ~ exp(-i^2 / (2 sigma^2))`` normalised, tap ``i`` read at the offset
  ``(row, col) = (ceil(i sin(a) - 0.5), ceil(i cos(a) - 0.5))`` with edge
  pixels repeated, rounded to uint8 as the 8-bit PNG ImageMagick writes.
  ImageMagick's own kernel build and quantum arithmetic may differ by 1 grey
  level.
* ``frost``: needs the reference's frost photographs (``frost1.png`` ..
  ``frost5.jpg`` of ``ImageNet-C/create_c``, Apache-2.0, not bundled), found
  in ``frost_dir``; without them ``frost`` raises ``ValueError``. OpenCV's
  ``resize(fx=0.2, fy=0.2)`` (bilinear, no antialiasing, fixed-point) is
  restated in float64 and rounded: pixels may differ by 1.
* ``defocus_blur``: OpenCV's ``GaussianBlur``/``filter2D`` as separable and
  2-D correlations with reflect-101 borders (``scipy.ndimage`` ``mirror``);
  OpenCV filters a 17x17 kernel through a DFT, so results differ at the
  1e-7 level (a truncated value can move by 1).
* ``elastic_transform``: OpenCV's ``warpAffine`` (bilinear, sample positions
  rounded to 1/32 pixel as OpenCV's fixed-point tables do, reflect-101
  border) is restated with ``scipy.ndimage.map_coordinates``.
* ``glass_blur``: the reference's "swap" of two pixels assigns NumPy views,
  so it copies the neighbour into the pixel and leaves the neighbour as it
  was; that is what is done here, as in the released files.
* ``jpeg_compression``, ``pixelate``: Pillow, as the reference (the JPEG
  codec version may change bits).

The per-corruption image functions live in :mod:`synstrip_vit.corruption_ops`.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from synstrip_vit.corruption_ops import (FROST_FILES, hsv_to_rgb,
                                         load_frost_images, motion_blur_kernel,
                                         rgb_to_hsv)
# The private helpers are re-exported for the tests that check them.
from synstrip_vit.corruption_ops import (_COLOUR, _FUNCTIONS, _disk_kernel,
                                         _frost, _motion_blur, _zoom_linear)

__all__ = ["CORRUPTIONS", "EXTRA_CORRUPTIONS", "SEVERITIES", "FROST_FILES",
           "PARAMS", "CorruptedSplit", "corrupt", "block_seed",
           "iter_corrupted", "corrupted_split", "load_released",
           "load_frost_images", "rgb_to_hsv", "hsv_to_rgb",
           "motion_blur_kernel"]

#: The 15 corruptions of CIFAR-10-C, in the reference's order.
CORRUPTIONS: Tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
    "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
#: The reference's four extra corruptions (``spatter`` is not implemented).
EXTRA_CORRUPTIONS: Tuple[str, ...] = (
    "speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES: Tuple[int, ...] = (1, 2, 3, 4, 5)

#: ``make_cifar_c.py``'s parameters, one entry per severity 1..5.
PARAMS: Mapping[str, Tuple] = types.MappingProxyType({
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate per unit
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # salt+pepper share
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),  # multiplicative std
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma
    # (sigma, max_delta, iterations)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2),
                   (0.4, 1, 2)),
    # (disk radius, alias blur sigma)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2),
                     (1.5, 0.1)),
    # (radius, sigma); angle ~ U(-45, 45) degrees
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # zoom factors averaged with the image
    "zoom_blur": tuple(np.arange(1, top, 0.01)
                       for top in (1.06, 1.11, 1.16, 1.21, 1.26)),
    # (mean, std, zoom, threshold, blur radius, blur sigma, image weight)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    # (image weight, frost weight)
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    # (fog strength, plasma wibble decay)
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # scale around channel mean
    # (displacement scale, displacement sigma, affine jitter), x 32 pixels
    "elastic_transform": tuple(
        tuple(32 * v for v in c) for c in
        ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
         (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # downscale factor (box)
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
})


class CorruptedSplit(NamedTuple):
  """A corrupted evaluation split, blocks of ``N`` rows each.

  Attributes:
    x: ``[K * N, H, W, C]`` uint8; rows ``k * N : (k + 1) * N`` hold block
      ``k``.
    y: ``[K * N]`` int32, the clean labels repeated ``K`` times.
    blocks: ``K`` pairs ``(corruption, severity)``, one per block.
  """
  x: np.ndarray
  y: np.ndarray
  blocks: Tuple[Tuple[str, int], ...]


# ---------------------------------------------------------------------- API


def _check_args(images: np.ndarray, name: str, severity: int,
                seed: int) -> None:
  """Raises ``ValueError`` naming the first bad argument of :func:`corrupt`."""
  if name not in _FUNCTIONS:
    raise ValueError(f"unknown corruption {name!r}; valid: "
                     f"{list(CORRUPTIONS) + list(EXTRA_CORRUPTIONS)}")
  if (isinstance(severity, bool) or not isinstance(severity, (int, np.integer))
      or not 1 <= severity <= 5):
    raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
      or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if not isinstance(images, np.ndarray) or images.dtype != np.uint8 \
      or images.ndim != 4:
    raise ValueError(
        f"corrupt needs uint8 [N, H, W, C] images, got "
        f"{getattr(images, 'dtype', type(images).__name__)}, shape "
        f"{getattr(images, 'shape', None)}")
  if name in _COLOUR and images.shape[-1] not in (1, 3):
    raise ValueError(f"corruption {name!r} needs 1 or 3 channels, got "
                     f"shape {images.shape}")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int, *,
            frost_dir: Optional[str] = None) -> np.ndarray:
  """One common corruption of Hendrycks & Dietterich at CIFAR-10-C's
  parameters (see the module docstring for what differs from the released
  files).

  Args:
    images: ``[N, H, W, C]`` uint8 (C = 3 for RGB; other C work for every
      corruption but ``frost``/``brightness``/``saturate``, which need 1 or
      3: one channel is treated as a grey RGB image).
    name: one of :data:`CORRUPTIONS` or :data:`EXTRA_CORRUPTIONS`.
    severity: int in 1..5 (:data:`PARAMS` ``[name][severity - 1]``).
    seed: non-negative int; the result is a function of ``(images, name,
      severity, seed)`` (``np.random.default_rng(seed)``, images drawn in
      order).
    frost_dir: folder with :data:`FROST_FILES` (``frost`` only).

  Returns:
    ``[N, H, W, C]`` uint8, a new array: ``uint8(clip(r, 0, 255))`` of the
    corruption's result ``r`` (truncation, as the reference).

  Raises:
    ValueError: bad name (lists the valid ones), severity, seed or images;
      ``frost`` without its photographs; ``spatter``.
  """
  _check_args(images, name, severity, seed)
  c = PARAMS[name][int(severity) - 1] if name in PARAMS else None
  fn = _FUNCTIONS[name]
  if name == "frost":
    fn = functools.partial(_frost, frost_dir=frost_dir)
  rng = np.random.default_rng(int(seed))
  grey = name in _COLOUR and images.shape[-1] == 1
  out = fn(np.repeat(images, 3, axis=-1) if grey else images, c, rng)
  if grey:
    out = out.mean(axis=-1, keepdims=True)
  return np.clip(out, 0, 255).astype(np.uint8)


def block_seed(seed: int, name: str, severity: int) -> int:
  """Seed of the ``(name, severity)`` block of a corrupted split: a hash of
  ``(seed, index of name, severity)`` (``np.random.SeedSequence``)."""
  index = (CORRUPTIONS + EXTRA_CORRUPTIONS).index(name)
  state = np.random.SeedSequence([int(seed), index, int(severity)])
  return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def iter_corrupted(x: np.ndarray, names: Sequence[str] = CORRUPTIONS,
                   severities: Sequence[int] = SEVERITIES, seed: int = 0, *,
                   frost_dir: Optional[str] = None
                   ) -> Iterator[Tuple[str, int, np.ndarray]]:
  """``(name, severity, corrupt(x, name, severity, block_seed(...)))`` for
  each name, then each severity: one block in memory at a time."""
  for name in names:
    for severity in severities:
      yield name, severity, corrupt(x, name, severity,
                                    block_seed(seed, name, severity),
                                    frost_dir=frost_dir)


def corrupted_split(x: np.ndarray, y: np.ndarray,
                    names: Sequence[str] = CORRUPTIONS,
                    severities: Sequence[int] = SEVERITIES, seed: int = 0, *,
                    frost_dir: Optional[str] = None) -> CorruptedSplit:
  """A corrupted evaluation split of any data set's ``(x, y)``.

  Blocks are ordered as the released files (corruption, then severity); block
  ``(name, s)`` is ``corrupt(x, name, s, block_seed(seed, name, s))``, so it
  does not depend on which other blocks are asked for. Holds
  ``len(names) * len(severities) * N`` images: for the full CIFAR-10 test
  set, 750,000 images (2.3 GB); use :func:`iter_corrupted` to stream.

  Args:
    x: ``[N, H, W, C]`` uint8 clean images.
    y: ``[N]`` integer labels.
    names, severities, seed, frost_dir: as :func:`corrupt`.
  """
  y = np.asarray(y)
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"y must be integer labels of shape ({len(x)},), got "
                     f"{y.dtype} {y.shape}")
  blocks, xs = [], []
  for name, severity, xc in iter_corrupted(x, names, severities, seed,
                                           frost_dir=frost_dir):
    blocks.append((name, int(severity)))
    xs.append(xc)
  if not blocks:
    raise ValueError("corrupted_split needs at least one name and severity")
  return CorruptedSplit(x=np.concatenate(xs),
                        y=np.tile(y.astype(np.int32), len(blocks)),
                        blocks=tuple(blocks))


def load_released(root: str, name: str,
                  severity: int) -> Tuple[np.ndarray, np.ndarray]:
  """One severity of a released ``-C`` set in CIFAR-10-C's layout.

  ``<root>/<name>.npy`` holds ``[5 * n, H, W, C]`` uint8 (severities 1..5
  stacked, ``n`` images each: 10000 for CIFAR-10-C and CIFAR-100-C, 26032
  for SVHN-C); ``<root>/labels.npy`` holds ``5 * n`` (or ``n``) labels.

  Returns:
    ``(x [n, H, W, C] uint8, y [n] int32)`` of ``severity``.

  Raises:
    FileNotFoundError: a file is missing (named).
    ValueError: bad severity, shapes or dtypes (named).
  """
  if isinstance(severity, bool) or severity not in SEVERITIES:
    raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
  paths = [Path(root).expanduser() / f for f in (f"{name}.npy", "labels.npy")]
  for p in paths:
    if not p.is_file():
      raise FileNotFoundError(f"released corruption file {str(p)!r} does not "
                              f"exist")
  x = np.load(paths[0], mmap_mode="r", allow_pickle=False)
  y = np.load(paths[1], allow_pickle=False)
  if x.dtype != np.uint8 or x.ndim != 4 or len(x) % 5:
    raise ValueError(f"{str(paths[0])!r}: expected uint8 [5 * n, H, W, C], "
                     f"got {x.dtype} {x.shape}")
  n = len(x) // 5
  if y.ndim != 1 or len(y) not in (n, 5 * n) \
      or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{str(paths[1])!r}: expected {5 * n} or {n} integer "
                     f"labels, got {y.dtype} {y.shape}")
  rows = slice((severity - 1) * n, severity * n)
  return (np.array(x[rows]), (y[rows] if len(y) == 5 * n else y)
          .astype(np.int32))
