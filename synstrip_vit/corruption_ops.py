"""The per-corruption image functions of :mod:`synstrip_vit.corruptions`.

Each ``_<corruption>(u, c, rng)`` maps float ``[N, H, W, C]`` images in
0..255 (``u``), one severity's parameters ``c`` (an entry of
:data:`synstrip_vit.corruptions.PARAMS`) and a NumPy generator to corrupted
float images; :data:`_FUNCTIONS` names them. Helpers reproduce the SciPy,
Pillow and Wand operations of ``make_cifar_c.py``.
"""

from __future__ import annotations

import io
import math
import types
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["FROST_FILES", "rgb_to_hsv", "hsv_to_rgb", "motion_blur_kernel",
           "load_frost_images"]

#: File names of the frost photographs ``frost`` draws from.
FROST_FILES: Tuple[str, ...] = (
    "frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


# ------------------------------------------------------------------ helpers

Rng = np.random.Generator


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
  """skimage's ``gaussian(x, sigma, multichannel=True)`` on ``[N, H, W, C]``:
  a Gaussian over H and W, ``mode="nearest"``, truncated at 4 sigma."""
  return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0),
                                 mode="nearest", truncate=4.0)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """skimage's ``rgb2hsv`` on ``[..., 3]`` floats in [0, 1]: hue in [0, 1),
  saturation ``(max - min) / max`` (0 where max == min), value ``max``."""
  v = rgb.max(-1)
  delta = v - rgb.min(-1)
  safe = np.where(delta == 0, 1.0, delta)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  h = np.where(r == v, (g - b) / safe, 0.0)  # Later channels win ties.
  h = np.where(g == v, 2.0 + (b - r) / safe, h)
  h = np.where(b == v, 4.0 + (r - g) / safe, h)
  h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
  s = np.where(delta == 0, 0.0, delta / np.where(v == 0, 1.0, v))
  return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """skimage's ``hsv2rgb`` on ``[..., 3]`` (inverse of :func:`rgb_to_hsv`)."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  hi = np.floor(h * 6)
  f = h * 6 - hi
  p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
  sector = hi.astype(np.int64) % 6
  choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  out = np.empty(hsv.shape, np.float64)
  for ch in range(3):
    out[..., ch] = np.choose(sector, [c[ch] for c in choices])
  return out


def _zoom_linear(x: np.ndarray, factor: float, axis: int) -> np.ndarray:
  """``scipy.ndimage.zoom(order=1)`` along one axis: ``round(n * factor)``
  outputs, output ``o`` read at ``o * (n - 1) / (n_out - 1)``, linearly."""
  n = x.shape[axis]
  n_out = int(round(n * factor))
  pos = np.arange(n_out) * ((n - 1) / (n_out - 1) if n_out > 1 else 0.0)
  i0 = np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
  i1 = np.minimum(i0 + 1, n - 1)
  shape = [1] * x.ndim
  shape[axis] = n_out
  t = (pos - i0).reshape(shape).astype(x.dtype)
  return np.take(x, i0, axis) * (1 - t) + np.take(x, i1, axis) * t


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
  """The reference's ``clipped_zoom`` on ``[N, H, W, C]``: the central
  ``ceil(H / factor)`` crop zoomed by ``factor`` (``scipy.ndimage.zoom``,
  order 1), trimmed to the central ``H x W``."""
  h, w = x.shape[1:3]
  ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
  top, left = (h - ch) // 2, (w - cw) // 2
  z = _zoom_linear(_zoom_linear(x[:, top:top + ch, left:left + cw], factor,
                                1), factor, 2)
  th, tw = (z.shape[1] - h) // 2, (z.shape[2] - w) // 2
  return z[:, th:th + h, tw:tw + w]


def motion_blur_kernel(radius: float, sigma: float,
                       angle: float) -> Tuple[np.ndarray, np.ndarray]:
  """ImageMagick's ``MotionBlurImage`` kernel: ``(weights [W], offsets
  [W, 2])``, ``W = 2 * ceil(radius) + 1``, offsets ``(row, col)`` in pixels
  of the source pixel each tap reads (``angle`` in degrees)."""
  width = int(2 * math.ceil(radius) + 1)
  i = np.arange(width, dtype=np.float64)
  k = np.exp(-(i * i) / (2.0 * sigma * sigma))
  a = math.radians(angle)
  rows = np.ceil(i * math.sin(a) - 0.5).astype(np.int64)
  cols = np.ceil(i * math.cos(a) - 0.5).astype(np.int64)
  return k / k.sum(), np.stack([rows, cols], -1)


def _motion_blur(x: np.ndarray, radius: float, sigma: float,
                 angles: np.ndarray) -> np.ndarray:
  """Motion blur of ``[N, H, W, C]`` images (0..255 floats), image ``n`` at
  ``angles[n]`` degrees, edges repeated; a tap reaching past the image ends
  that image's sum (as ImageMagick). Rounded and clipped to 0..255 as
  ImageMagick's 8-bit output."""
  n, h, w = x.shape[:3]
  kernels = [motion_blur_kernel(radius, sigma, a) for a in angles]
  offsets = np.stack([k[1] for k in kernels])  # [N, taps, 2]
  inside = (np.abs(offsets[..., 0]) < h) & (np.abs(offsets[..., 1]) < w)
  weights = np.stack([k[0] for k in kernels]) * np.cumprod(inside, axis=1)
  out = np.zeros(x.shape, np.float64)
  rows_n = np.arange(n)[:, None, None]
  for i in range(offsets.shape[1]):
    rows = np.clip(np.arange(h) + offsets[:, i, :1], 0, h - 1)  # [N, H]
    cols = np.clip(np.arange(w) + offsets[:, i, 1:], 0, w - 1)  # [N, W]
    out += (weights[:, i, None, None, None]
            * x[rows_n, rows[:, :, None], cols[:, None, :]])
  return np.clip(np.rint(out), 0, 255)


def _per_image(x: np.ndarray, rng: Rng,
               fn: Callable[[np.ndarray, Rng], np.ndarray]) -> np.ndarray:
  """``fn`` applied to each image of ``x`` in order (shared ``rng``)."""
  return np.stack([fn(img, rng) for img in x]) if len(x) else x.copy()


def _pil_each(x: np.ndarray, fn: Callable) -> np.ndarray:
  """``fn(PIL image) -> PIL image`` on each uint8 image, back to float."""
  from PIL import Image  # Lazy: only pixelate and JPEG need Pillow.
  out = []
  for img in x:
    squeeze = img.shape[-1] == 1
    res = np.asarray(fn(Image.fromarray(img[..., 0] if squeeze else img)))
    out.append(res[..., None] if squeeze else res)
  return np.stack(out).astype(np.float64) if out else x.astype(np.float64)


def _plasma_fractal(n: int, mapsize: int, decay: float,
                    rng: Rng) -> np.ndarray:
  """``n`` of the reference's diamond-square height maps ``[n, mapsize,
  mapsize]`` in [0, 1] each (``mapsize`` a power of two; the uniform noise
  shrinks by ``decay`` per level)."""
  m = np.zeros((n, mapsize, mapsize), np.float64)
  step, wibble = mapsize, 100.0

  def wibbled(a):
    return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

  while step >= 2:
    half = step // 2
    corners = m[:, 0::step, 0::step]
    square = corners + np.roll(corners, -1, axis=1)
    square += np.roll(square, -1, axis=2)
    m[:, half::step, half::step] = wibbled(square)
    dr, ul = m[:, half::step, half::step], m[:, 0::step, 0::step]
    left = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=2))
    m[:, 0::step, half::step] = wibbled(left)
    top = (dr + np.roll(dr, 1, axis=2)) + (ul + np.roll(ul, -1, axis=1))
    m[:, half::step, 0::step] = wibbled(top)
    step //= 2
    wibble /= decay
  m -= m.min(axis=(1, 2), keepdims=True)
  return m / m.max(axis=(1, 2), keepdims=True)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """The reference's anti-aliased disk: a normalised 17x17 (or
  ``2 radius + 1``) disk blurred by a 3x3 (5x5) Gaussian, reflect-101."""
  if radius <= 8:
    grid, ksize = np.arange(-8, 9), 3
  else:
    grid, ksize = np.arange(-radius, radius + 1), 5
  xx, yy = np.meshgrid(grid, grid)
  disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  t = np.arange(ksize) - (ksize - 1) / 2
  g = np.exp(-t * t / (2.0 * alias_blur ** 2))
  g /= g.sum()
  for axis in (0, 1):
    disk = ndimage.correlate1d(disk, g, axis=axis, mode="mirror")
  return disk.astype(np.float32)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """OpenCV's ``getAffineTransform``: ``[2, 3]`` ``M`` with
  ``dst = M @ [src, 1]`` for three ``(x, y)`` points."""
  a = np.concatenate([src.astype(np.float64), np.ones((3, 1))], axis=1)
  return np.linalg.solve(a, dst.astype(np.float64)).T


def _warp_affine(img: np.ndarray, m: np.ndarray) -> np.ndarray:
  """OpenCV's ``warpAffine(img, m)`` on ``[H, W, C]``: ``out(p) =
  img(m^-1 p)`` bilinear, positions rounded to 1/32 pixel, reflect-101."""
  h, w = img.shape[:2]
  inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  sx = np.round((inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]) * 32) / 32
  sy = np.round((inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]) * 32) / 32
  return np.stack([ndimage.map_coordinates(img[..., ch], [sy, sx], order=1,
                                           mode="mirror")
                   for ch in range(img.shape[-1])], -1)


def _linear_resize(img: np.ndarray, factor: float) -> np.ndarray:
  """OpenCV's ``resize(img, fx=factor, fy=factor)`` (bilinear, half-pixel
  centres, edges clamped, no antialiasing) of uint8 ``[H, W, C]``, rounded."""

  def taps(n_in):
    n_out = int(round(n_in * factor))
    f = (np.arange(n_out) + 0.5) / factor - 0.5
    i0 = np.floor(f).astype(np.int64)
    t = np.where(i0 < 0, 0.0, f - i0)
    return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), t

  r0, r1, tr = taps(img.shape[0])
  c0, c1, tc = taps(img.shape[1])
  a = img.astype(np.float64)
  rows = a[r0] * (1 - tr)[:, None, None] + a[r1] * tr[:, None, None]
  out = rows[:, c0] * (1 - tc)[None, :, None] + rows[:, c1] * tc[None, :, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_frost_images(frost_dir: Optional[str]) -> Tuple[np.ndarray, ...]:
  """The five frost photographs of ``frost``, RGB uint8, resized by 0.2.

  Raises:
    ValueError: ``frost_dir`` is None or lacks one of :data:`FROST_FILES`
      (the message says where the files come from).
  """
  from PIL import Image  # Lazy: only frost reads photographs.
  where = "no frost_dir given" if frost_dir is None else repr(str(frost_dir))
  missing = [] if frost_dir is None else [
      f for f in FROST_FILES if not (Path(frost_dir) / f).is_file()]
  if frost_dir is None or missing:
    raise ValueError(
        f"corruption 'frost' needs the frost photographs {list(FROST_FILES)} "
        f"of hendrycks/robustness (ImageNet-C/create_c, Apache-2.0) in "
        f"frost_dir ({where}; missing {missing or list(FROST_FILES)})")
  out = []
  for f in FROST_FILES:
    with Image.open(Path(frost_dir) / f) as img:
      out.append(_linear_resize(np.asarray(img.convert("RGB")), 0.2))
  return tuple(out)


# -------------------------------------------------------------- corruptions
# Each takes uint8 [N, H, W, C] images, the severity's parameters and a
# Generator, and returns floats on the 0..255 scale.


def _gaussian_noise(u, c, rng):
  x = u / 255.0
  return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _shot_noise(u, c, rng):
  return np.clip(rng.poisson(u / 255.0 * c) / c, 0, 1) * 255


def _impulse_noise(u, c, rng):
  """skimage's ``random_noise(mode="s&p", amount=c)``: each value (each
  channel) flips with probability ``c``, to 1 or 0 with equal odds."""
  x = u / 255.0
  flipped = rng.random(x.shape) <= c
  salted = rng.random(x.shape) <= 0.5
  x = np.where(flipped & salted, 1.0, x)
  return np.where(flipped & ~salted, 0.0, x) * 255


def _speckle_noise(u, c, rng):
  x = u / 255.0
  return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


def _gaussian_blur(u, c, rng):
  del rng
  return np.clip(_gaussian(u / 255.0, c), 0, 1) * 255


def _glass_blur(u, c, rng):
  """Blur, then (``iterations`` times, from the bottom-right inwards) copy
  into each pixel a neighbour at offset ``(dy, dx)`` in ``[-d, d)``, blur."""
  sigma, d, iterations = c
  x = (_gaussian(u / 255.0, sigma) * 255).astype(np.uint8)
  n, h, w = x.shape[:3]
  rows = np.arange(n)
  for _ in range(iterations):
    for hh in range(h - d, d, -1):
      for ww in range(w - d, d, -1):
        dx, dy = rng.integers(-d, d, size=(2, n))
        x[rows, hh, ww] = x[rows, hh + dy, ww + dx]
  return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def _defocus_blur(u, c, rng):
  del rng
  kernel = _disk_kernel(*c)
  x = ndimage.correlate(u / 255.0, kernel[None, :, :, None], mode="mirror")
  return np.clip(x, 0, 1) * 255


def _motion_blur_images(u, c, rng):
  return _motion_blur(u.astype(np.float64), c[0], c[1],
                      rng.uniform(-45, 45, size=len(u)))


def _zoom_blur(u, c, rng):
  del rng
  x = (u / 255.0).astype(np.float32)
  out = np.zeros_like(x)
  for factor in c:
    out += _clipped_zoom(x, factor)
  return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


def _grey(x: np.ndarray) -> np.ndarray:
  """OpenCV's RGB -> grey (``0.299 R + 0.587 G + 0.114 B``) ``[..., 1]``;
  a one-channel image as it is."""
  if x.shape[-1] == 1:
    return x
  return (x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114)[..., None]


def _snow(u, c, rng):
  mean, std, zoom, threshold, radius, sigma, weight = c

  x = (u / 255.0).astype(np.float32)
  layer = rng.normal(size=x.shape[:3] + (1,), loc=mean, scale=std)
  layer = _clipped_zoom(layer, zoom)
  layer[layer < threshold] = 0
  layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8).astype(np.float64)
  layer = _motion_blur(layer, radius, sigma,
                       rng.uniform(-135, -45, size=len(x))) / 255.0
  x = weight * x + (1 - weight) * np.maximum(x, _grey(x) * 1.5 + 0.5)
  return np.clip(x + layer + np.rot90(layer, k=2, axes=(1, 2)), 0, 1) * 255


def _frost(u, c, rng, frost_dir=None):
  frosts = load_frost_images(frost_dir)
  h, w = u.shape[1:3]

  def one(img, r):
    f = frosts[r.integers(len(frosts))]
    top, left = r.integers(0, f.shape[0] - h), r.integers(0, f.shape[1] - w)
    crop = f[top:top + h, left:left + w].astype(np.float64)
    return np.clip(c[0] * img + c[1] * crop, 0, 255)

  return _per_image(u.astype(np.float64), rng, one)


def _fog(u, c, rng):
  strength, decay = c
  h, w = u.shape[1:3]
  mapsize = max(32, 1 << int(math.ceil(math.log2(max(h, w)))))

  x = u / 255.0
  max_val = x.max(axis=(1, 2, 3), keepdims=True)
  x = x + strength * _plasma_fractal(len(x), mapsize, decay,
                                     rng)[:, :h, :w, None]
  return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


def _brightness(u, c, rng):
  del rng
  hsv = rgb_to_hsv(u / 255.0)
  hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
  return np.clip(hsv_to_rgb(hsv), 0, 1) * 255


def _saturate(u, c, rng):
  del rng
  hsv = rgb_to_hsv(u / 255.0)
  hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
  return np.clip(hsv_to_rgb(hsv), 0, 1) * 255


def _contrast(u, c, rng):
  del rng
  x = u / 255.0
  means = x.mean(axis=(1, 2), keepdims=True)
  return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(u, c, rng):
  scale, sigma, jitter = c

  def one(img, r):
    h, w = img.shape[:2]
    centre = np.float32((h, w)) // 2
    size = min(h, w) // 3
    src = np.float32([centre + size, [centre[0] + size, centre[1] - size],
                      centre - size])
    dst = src + r.uniform(-jitter, jitter, size=src.shape).astype(np.float32)
    img = _warp_affine(img, _affine_from_points(src, dst))
    dx, dy = [(ndimage.gaussian_filter(r.uniform(-1, 1, size=(h, w)), sigma,
                                       mode="reflect", truncate=3) * scale
               ).astype(np.float32) for _ in range(2)]
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.stack([ndimage.map_coordinates(img[..., ch], [ys + dy, xs + dx],
                                            order=1, mode="reflect")
                    for ch in range(img.shape[-1])], -1)
    return np.clip(out, 0, 1) * 255

  return _per_image((u / 255.0).astype(np.float32), rng, one)


def _pixelate(u, c, rng):
  del rng
  from PIL import Image  # Lazy: Pillow only here and for JPEG.
  h, w = u.shape[1:3]
  return _pil_each(u, lambda img: img.resize(
      (int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX))


def _jpeg(img, quality):
  """Pillow JPEG round trip of one PIL image at ``quality``."""
  from PIL import Image  # Lazy.
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  buf.seek(0)
  with Image.open(buf) as out:
    out.load()
    return out.copy()


def _jpeg_compression(u, c, rng):
  del rng
  return _pil_each(u, lambda img: _jpeg(img, c))


def _spatter(u, c, rng):
  raise ValueError(
      "corruption 'spatter' is not implemented: it needs OpenCV's Canny edge "
      "detector, distance transform and histogram equalisation")


_FUNCTIONS: Mapping[str, Callable] = types.MappingProxyType({
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise, "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur, "motion_blur": _motion_blur_images,
    "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost, "fog": _fog,
    "brightness": _brightness, "contrast": _contrast,
    "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression, "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur, "spatter": _spatter,
    "saturate": _saturate,
})
#: Corruptions that need RGB: one-channel images are corrupted as grey RGB
#: images and averaged back over the channels.
_COLOUR = ("frost", "brightness", "saturate")
