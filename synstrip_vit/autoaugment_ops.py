"""The AutoAugment op kernels of :mod:`synstrip_vit.autoaugment`, in JAX.

Pillow's resampling (bicubic shear, nearest translate/rotate) as per-variant
index tables built with NumPy at trace time, ``ImageOps``/``ImageEnhance``
look-up tables and blends, and :func:`_plan`/:func:`_apply_entries`, which
apply a static list of ``(name, magnitude, sign)`` entries per image.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FILL", "OPS", "SIGNED_OPS"]

Array = jax.Array

#: Fill value of the geometric ops (the original's ``fillcolor``).
FILL = 128

OPS: Tuple[str, ...] = (
    "shearX", "shearY", "translateX", "translateY", "rotate", "color",
    "posterize", "solarize", "contrast", "sharpness", "brightness",
    "autocontrast", "equalize", "invert")
#: The ops that draw a random sign for their magnitude.
SIGNED_OPS: Tuple[str, ...] = (
    "shearX", "shearY", "translateX", "translateY", "rotate", "color",
    "contrast", "sharpness", "brightness")

# ------------------------------------------------ geometry (NumPy, static)

def _pil_affine(name: str, magnitude: float, sign: int, height: int,
                width: int) -> tuple[Tuple[float, ...], bool]:
  """``(PIL affine data, bicubic?)`` of a geometric op, as the original."""
  m = magnitude * sign
  if name == "shearX":
    return (1.0, m, 0.0, 0.0, 1.0, 0.0), True
  if name == "shearY":
    return (1.0, 0.0, 0.0, m, 1.0, 0.0), True
  if name == "translateX":
    return (1.0, 0.0, magnitude * width * sign, 0.0, 1.0, 0.0), False
  if name == "translateY":
    return (1.0, 0.0, 0.0, 0.0, 1.0, magnitude * height * sign), False
  angle = m % 360.0  # rotate: Image.rotate's matrix, centre (w/2, h/2).
  if angle == 0:
    return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), False
  if angle in (90.0, 180.0, 270.0):
    raise ValueError(f"rotate by {m!r} degrees (a PIL transpose) is not "
                     f"supported")
  rad = -math.radians(angle)
  a, b = round(math.cos(rad), 15), round(math.sin(rad), 15)
  c, d = round(-math.sin(rad), 15), round(math.cos(rad), 15)
  cx, cy = width / 2, height / 2
  return (a, b, a * -cx + b * -cy + cx, c, d, c * -cx + d * -cy + cy), False


def _coord(v: float) -> int:
  return -1 if v < 0.0 else int(v)


def _nearest_scale_map(a, height: int, width: int) -> np.ndarray:
  """PIL's ``ImagingScaleAffine`` (nearest, ``a[1] == a[3] == 0``):
  ``[H, W]`` flat source index, ``H * W`` for the fill."""
  xo, xs = a[2] + a[0] * 0.5, []
  for _ in range(width):
    xs.append(_coord(xo))
    xo += a[0]
  valid = [x for x in range(width) if 0 <= xs[x] < width]
  xmin, xmax = (min(valid), max(valid) + 1) if valid else (0, 0)
  xintab = [xs[x] if 0 <= xs[x] < width else 0 for x in range(width)]
  out = np.full((height, width), height * width, np.int64)
  yo = a[5] + a[4] * 0.5
  for y in range(height):
    yi = _coord(yo)
    if 0 <= yi < height:
      for x in range(xmin, xmax):
        out[y, x] = yi * width + xintab[x]
    yo += a[4]
  return out


def _nearest_fixed_map(a, height: int, width: int) -> np.ndarray:
  """PIL's ``affine_fixed`` (nearest, 16.16 fixed point): ``[H, W]`` flat
  source index, ``H * W`` for the fill."""
  corners = [(0, 0), (width, height), (0, height), (width, 0)]
  if not all(abs(x * a[0] + y * a[1] + a[2]) < 32768.0
             and abs(x * a[3] + y * a[4] + a[5]) < 32768.0
             for x, y in corners):
    raise ValueError(f"affine {a!r} is outside PIL's fixed-point range")
  fix = lambda v: math.floor(v * 65536.0 + 0.5)
  a0, a1, a3, a4 = fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4])
  a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5)
  a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5)
  y, x = np.mgrid[0:height, 0:width].astype(np.int64)
  xin = (a2 + y * a1 + x * a0) >> 16
  yin = (a5 + y * a4 + x * a3) >> 16
  inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
  return np.where(inside, yin * width + xin, height * width)


def _bicubic_map(a, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """PIL's generic affine transform with ``bicubic_filter32RGB``, for maps
  where one fractional offset is 0 at every pixel (shears): ``[H, W, 4]``
  flat tap indices (edge-clamped) and ``[H, W]`` float64 offsets."""
  yc, xc = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
  xin = a[0] * xc + a[1] * yc + a[2]
  yin = a[3] * xc + a[4] * yc + a[5]
  inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
  xin, yin = xin - 0.5, yin - 0.5
  x0, y0 = np.floor(xin).astype(np.int64), np.floor(yin).astype(np.int64)
  dx, dy = xin - x0, yin - y0
  if np.any(inside & (dx != 0) & (dy != 0)):
    raise ValueError(f"affine {a!r} needs a 2-D bicubic filter")
  k = np.arange(-1, 3)
  cols = np.clip(x0[..., None] + k, 0, width - 1)
  rows = np.clip(y0[..., None] + k, 0, height - 1)
  horizontal = (dy == 0)[..., None]
  taps = np.where(horizontal, np.clip(y0, 0, height - 1)[..., None] * width
                  + cols, rows * width + np.clip(x0, 0, width - 1)[..., None])
  frac = np.where(horizontal[..., 0], dx, dy)
  return (np.where(inside[..., None], taps, height * width),
          np.where(inside, frac, 0.0))


def _warp_map(name: str, magnitude: float, sign: int, height: int,
              width: int) -> tuple[np.ndarray, np.ndarray]:
  """``([H*W, 4] int32 taps, [H*W] float32 offsets)`` of a geometric op;
  tap ``H * W`` is the fill pixel, nearest maps repeat one tap with 0."""
  a, bicubic = _pil_affine(name, magnitude, sign, height, width)
  if bicubic:
    taps, frac = _bicubic_map(a, height, width)
  else:
    nearest = (_nearest_scale_map if a[1] == 0 and a[3] == 0
               else _nearest_fixed_map)(a, height, width)
    taps, frac = np.repeat(nearest[..., None], 4, -1), np.zeros(nearest.shape)
  return (taps.reshape(-1, 4).astype(np.int32),
          frac.reshape(-1).astype(np.float32))


# ------------------------------------------------ look-up tables and blends

# Per-image op kinds beyond a gather and a static look-up table.
_NONE, _AUTOCONTRAST, _EQUALIZE, _BRIGHTNESS, _CONTRAST, _COLOR, _SHARPNESS = (
    range(7))
_KINDS = {"autocontrast": _AUTOCONTRAST, "equalize": _EQUALIZE,
          "brightness": _BRIGHTNESS, "contrast": _CONTRAST, "color": _COLOR,
          "sharpness": _SHARPNESS}
_GEOMETRIC = ("shearX", "shearY", "translateX", "translateY", "rotate")


def _static_lut(name: str, magnitude: float) -> np.ndarray:
  """``[256]`` uint8: ``ImageOps`` posterize / solarize / invert, else the
  identity."""
  i = np.arange(256)
  if name == "posterize":
    bits = int(magnitude)
    if bits != magnitude or not 1 <= bits <= 8:
      raise ValueError(f"posterize needs 1..8 bits, got {magnitude!r}")
    return (i & ~(2 ** (8 - bits) - 1)).astype(np.uint8)
  if name == "solarize":
    return np.where(i < magnitude, i, 255 - i).astype(np.uint8)
  if name == "invert":
    return (255 - i).astype(np.uint8)
  return i.astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _autocontrast_misses() -> np.ndarray:
  """Sorted ``lo * 65536 + hi * 256 + ix`` (``lo <= ix <= hi``) where PIL's
  float64 ``int(ix * scale - lo * scale)`` (``scale = 255 / (hi - lo)``) is
  one below the exact ``255 * (ix - lo) // (hi - lo)``.

  That can only happen where the quotient is an integer, i.e. at ``ix - lo``
  a multiple of ``(hi - lo) / gcd(hi - lo, 255)``; those are the candidates.
  """
  keys = []
  for span in range(1, 256):
    stride = span // math.gcd(span, 255)
    lo, j = np.meshgrid(np.arange(256 - span), np.arange(0, span + 1, stride),
                        indexing="ij")
    scale = 255.0 / span
    ix = lo + j
    pil = np.trunc(ix * scale + -lo * scale).astype(np.int64)
    miss = pil != 255 * j // span
    keys.append(lo[miss] * 65536 + (lo[miss] + span) * 256 + ix[miss])
  return np.sort(np.concatenate(keys)).astype(np.int32)


def _histograms(x: Array) -> Array:
  """``[B, H, W, C]`` uint8 -> ``[B, C, 256]`` int32 counts per channel."""
  b, _, _, c = x.shape
  bins = (jnp.arange(b)[:, None, None, None] * c
          + jnp.arange(c)) * 256 + x.astype(jnp.int32)
  return jnp.zeros(b * c * 256, jnp.int32).at[bins.reshape(-1)].add(1).reshape(
      b, c, 256)


def _autocontrast_lut(hist: Array) -> Array:
  """``ImageOps.autocontrast`` (cutoff 0): ``[..., 256]`` counts -> LUT."""
  i = jnp.arange(256)
  present = hist > 0
  lo = jnp.argmax(present, -1)[..., None]
  hi = (255 - jnp.argmax(present[..., ::-1], -1))[..., None]
  span = jnp.maximum(hi - lo, 1)
  exact = jnp.floor_divide(255 * (i - lo), span)
  misses = jnp.asarray(_autocontrast_misses())
  key = lo * 65536 + hi * 256 + i
  pos = jnp.clip(jnp.searchsorted(misses, key), 0, misses.shape[0] - 1)
  lut = jnp.clip(exact - (misses[pos] == key).astype(jnp.int32), 0, 255)
  return jnp.where(hi > lo, lut, i)


def _equalize_lut(hist: Array) -> Array:
  """``ImageOps.equalize``: ``[..., 256]`` counts -> LUT."""
  i = jnp.arange(256)
  present = hist > 0
  last = 255 - jnp.argmax(present[..., ::-1], -1)
  h_last = jnp.take_along_axis(hist, last[..., None], -1)
  step = (jnp.sum(hist, -1, keepdims=True) - h_last) // 255
  before = jnp.cumsum(hist, -1) - hist
  lut = jnp.clip((step // 2 + before) // jnp.maximum(step, 1), 0, 255)
  keep = (jnp.sum(present, -1, keepdims=True) <= 1) | (step == 0)
  return jnp.where(keep, i, lut)


def _split(factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float32 ``factor`` -> ``(hi, lo)``, ``hi + lo == factor``, each with at
  most 12 significant bits, so ``hi * d`` and ``lo * d`` are exact for
  ``|d| < 2**12``."""
  factor = np.asarray(factor, np.float32)
  hi = (factor.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
  return hi, factor - hi


def _blend(degenerate: Array, image: Array, factor_hi: Array,
           factor_lo: Array) -> Array:
  """PIL's ``Image.blend(degenerate, image, f)`` on integer values: float32
  ``deg + f * (img - deg)`` rounded after the product and after the sum,
  clipped to 0..255, truncated to uint8.

  ``f = factor_hi + factor_lo`` (:func:`_split`): both partial products are
  exact, so their sum is the once-rounded product whether or not XLA fuses a
  multiply and an add (one rounding where PIL rounds twice otherwise).
  """
  deg = degenerate.astype(jnp.float32)
  diff = (image.astype(jnp.int32) - degenerate.astype(jnp.int32)).astype(
      jnp.float32)
  product = factor_hi * diff + factor_lo * diff
  return jnp.clip(deg + product, 0.0, 255.0).astype(jnp.uint8)


def _luma(x: Array) -> Array:
  """``[B, H, W, 3]`` uint8 -> ``[B, H, W]`` int32, PIL's RGB -> L."""
  x = x.astype(jnp.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471
          + 0x8000) >> 16


def _smooth(x: Array) -> Array:
  """PIL's ``ImageFilter.SMOOTH`` (3x3, centre 5, /13, rounded; the border
  kept) on ``[B, H, W, C]`` uint8. PIL's float32 sum is never within its
  error of a rounding boundary, so this integer form is exact."""
  h, w = x.shape[1:3]
  if h < 3 or w < 3:
    return x
  v = x.astype(jnp.int32)
  n = 4 * v[:, 1:-1, 1:-1] + sum(
      v[:, dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
  return x.at[:, 1:-1, 1:-1].set(((2 * n + 13) // 26).astype(jnp.uint8))


# ------------------------------------------------ vectorised application

class _Plan(NamedTuple):
  """Static tables of a list of ``(name, magnitude, sign)`` entries.

  Entry 0 is the identity. ``taps``/``frac`` (``[V, H*W, 4]``, ``[V, H*W]``)
  hold the geometric variants (variant 0 the identity), ``geo``, ``lut``,
  ``kind``, ``factor`` (``[N]``, ``[N, 256]``, ``[N]``, ``[N, 2]``) each
  entry's variant, static table, kind and blend factor (:func:`_split`);
  ``kinds`` the kinds present.
  """
  taps: np.ndarray
  frac: np.ndarray
  geo: np.ndarray
  lut: np.ndarray
  kind: np.ndarray
  factor: np.ndarray
  kinds: frozenset


@functools.lru_cache(maxsize=32)
def _plan(entries: Tuple[tuple, ...], height: int, width: int) -> _Plan:
  """The :class:`_Plan` of ``entries`` (hashable, so cached per policy)."""
  identity = np.arange(height * width, dtype=np.int32)
  maps, variants = [(np.repeat(identity[:, None], 4, 1),
                     np.zeros(height * width, np.float32))], {}
  geo, luts, kinds, factors = [0], [_static_lut("", 0)], [_NONE], [1.0]
  for name, magnitude, sign in entries:
    if name not in OPS:
      raise ValueError(f"unknown AutoAugment op {name!r}; expected one of "
                       f"{OPS}")
    if sign not in (-1, 1):
      raise ValueError(f"sign must be -1 or 1, got {sign!r}")
    variant = 0
    if name in _GEOMETRIC:
      spec = (name, magnitude, sign)
      if spec not in variants:
        variants[spec] = len(maps)
        maps.append(_warp_map(name, magnitude, sign, height, width))
      variant = variants[spec]
    geo.append(variant)
    luts.append(_static_lut(name, magnitude))
    kinds.append(_KINDS.get(name, _NONE))
    factors.append(1.0 + magnitude * sign)
  return _Plan(np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps]),
               np.asarray(geo, np.int32), np.stack(luts),
               np.asarray(kinds, np.int32),
               np.stack(_split(np.asarray(factors, np.float32)), -1),
               frozenset(kinds))


def _warp(x: Array, taps: Array, frac: Array) -> Array:
  """Per-image gather + PIL's bicubic polynomial: ``[B, H, W, C]`` uint8,
  ``[B, H*W, 4]`` taps, ``[B, H*W]`` offsets -> uint8."""
  b, h, w, c = x.shape
  flat = jnp.concatenate(
      [x.reshape(b, h * w, c), jnp.full((b, 1, c), FILL, x.dtype)], 1)
  v = jnp.take_along_axis(flat, taps.reshape(b, -1, 1), 1).reshape(
      b, h * w, 4, c).astype(jnp.float32)
  v1, v2, v3, v4 = v[:, :, 0], v[:, :, 1], v[:, :, 2], v[:, :, 3]
  d = frac[..., None]
  p2, p3, p4 = -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
  out = v2 + d * (p2 + d * (p3 + d * p4))
  return jnp.clip(out, 0.0, 255.0).astype(jnp.uint8).reshape(b, h, w, c)


def _apply_lut(x: Array, lut: Array) -> Array:
  """``[B, H, W, C]`` uint8 through per-image-and-channel ``[B, C, 256]``."""
  b, h, w, c = x.shape
  idx = x.reshape(b, h * w, c).transpose(0, 2, 1).astype(jnp.int32)
  out = jnp.take_along_axis(lut, idx, -1).astype(jnp.uint8)
  return out.transpose(0, 2, 1).reshape(b, h, w, c)


def _dynamic_lut(x: Array, lut: Array, kind: Array, factor: Array,
                 kinds: frozenset) -> Array:
  """The ``[B, C, 256]`` table of each image: its entry's static table, or
  autocontrast / equalize / brightness / contrast of ``x`` where ``kind``
  says so (only kinds in ``kinds`` are computed)."""
  kind, hi, lo = kind[:, None, None], factor[:, 0, None, None], factor[
      :, 1, None, None]
  i = jnp.arange(256)
  if kinds & {_AUTOCONTRAST, _EQUALIZE}:
    hist = _histograms(x)
    if _AUTOCONTRAST in kinds:
      lut = jnp.where(kind == _AUTOCONTRAST, _autocontrast_lut(hist), lut)
    if _EQUALIZE in kinds:
      lut = jnp.where(kind == _EQUALIZE, _equalize_lut(hist), lut)
  if _BRIGHTNESS in kinds:
    lut = jnp.where(kind == _BRIGHTNESS, _blend(jnp.zeros_like(i), i, hi, lo),
                    lut)
  if _CONTRAST in kinds:
    n = x.shape[1] * x.shape[2]
    total = jnp.sum(_luma(x), (1, 2))[:, None, None]
    mean = (2 * total + n) // (2 * n)  # int(mean + 0.5), exactly.
    lut = jnp.where(kind == _CONTRAST, _blend(mean, i, hi, lo), lut)
  return lut


def _apply_entries(x: Array, entry: Array, plan: _Plan) -> Array:
  """Applies entry ``entry[b]`` of ``plan`` to image ``b`` (uint8)."""
  b, _, _, c = x.shape
  if plan.taps.shape[0] > 1:
    variant = jnp.asarray(plan.geo)[entry]
    x = _warp(x, jnp.asarray(plan.taps)[variant],
              jnp.asarray(plan.frac)[variant])
  kind, factor = jnp.asarray(plan.kind)[entry], jnp.asarray(plan.factor)[entry]
  lut = jnp.broadcast_to(jnp.asarray(plan.lut)[entry][:, None, :],
                         (b, c, 256)).astype(jnp.int32)
  x = _apply_lut(x, _dynamic_lut(x, lut, kind, factor, plan.kinds))
  if plan.kinds & {_COLOR, _SHARPNESS}:
    degenerate = x
    if _COLOR in plan.kinds:
      grey = jnp.broadcast_to(_luma(x)[..., None], x.shape)
      degenerate = jnp.where((kind == _COLOR)[:, None, None, None], grey,
                             degenerate)
    if _SHARPNESS in plan.kinds:
      degenerate = jnp.where((kind == _SHARPNESS)[:, None, None, None],
                             _smooth(x), degenerate)
    blended = (kind == _COLOR) | (kind == _SHARPNESS)
    alpha = jnp.where(blended[:, None], factor, jnp.asarray([1.0, 0.0]))
    x = _blend(degenerate, x, alpha[:, 0, None, None, None],
               alpha[:, 1, None, None, None])
  return x
