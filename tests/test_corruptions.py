"""Tests of the common corruptions (synstrip_vit/corruptions.py) on real
CIFAR-10 images, against independent formulas where one exists."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from _shared import shared_file_or_skip
from experiments.corruptions import CORRUPTION_PARAMS, apply_corruption
from synstrip_vit import corruptions as C

IMPLEMENTED = tuple(n for n in C.CORRUPTIONS + C.EXTRA_CORRUPTIONS
                    if n != "spatter")
#: Corruptions whose mean distortion grows with severity by construction.
MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
            "defocus_blur", "zoom_blur", "gaussian_blur", "contrast",
            "brightness", "pixelate", "jpeg_compression", "motion_blur")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  """Six real 32x32 CIFAR-10 test images, uint8 ``[6, 32, 32, 3]``."""
  path = shared_file_or_skip("data", "cifar10_lossless_4k.npz")
  with np.load(path) as d:
    return d["x_test"][:6]


@pytest.fixture(scope="module")
def frost_dir(tmp_path_factory, images) -> Path:
  """Stand-in frost photographs (tiled real images, 320x400) under the
  reference's file names."""
  from PIL import Image
  out = tmp_path_factory.mktemp("frost")
  for i, f in enumerate(C.FROST_FILES):
    tile = np.tile(np.roll(images, i, axis=0)[:2], (1, 10, 6, 1))
    Image.fromarray(np.concatenate(list(tile), axis=1)[:320, :400]).save(
        out / f, quality=95)
  return out


def _distortion(a, b) -> float:
  return float(np.abs(a.astype(np.float64) - b).mean())


@pytest.mark.parametrize("name", IMPLEMENTED)
def test_every_corruption_and_severity(images, frost_dir, name):
  """Shape, dtype, determinism, not the identity, seed matters if random."""
  for severity in C.SEVERITIES:
    out = C.corrupt(images, name, severity, 3, frost_dir=frost_dir)
    assert out.shape == images.shape and out.dtype == np.uint8
    again = C.corrupt(images, name, severity, 3, frost_dir=frost_dir)
    np.testing.assert_array_equal(out, again)
    assert _distortion(out, images) > 0.2, (name, severity)
  random = ("noise", "glass", "motion", "snow", "frost", "fog", "elastic")
  if any(r in name for r in random):
    other = C.corrupt(images, name, 5, 4, frost_dir=frost_dir)
    assert not np.array_equal(other, C.corrupt(images, name, 5, 3,
                                               frost_dir=frost_dir))


@pytest.mark.parametrize("name", MONOTONE)
def test_distortion_grows_with_severity(images, name):
  dist = [_distortion(C.corrupt(images, name, s, 0), images)
          for s in C.SEVERITIES]
  steps = np.diff(dist)
  if name == "motion_blur":
    # Severities 3 and 4 differ only in radius (6 -> 8) at sigma 2: the
    # extra taps weigh < 1e-7, so with the same angles they round alike.
    assert steps[2] == 0
    steps = np.delete(steps, 2)
  assert np.all(steps > 0), dist


def test_gaussian_noise_is_additive_normal_noise(images):
  out = C.corrupt(images, "gaussian_noise", 2, 7)
  noise = np.random.default_rng(7).normal(size=images.shape, scale=0.06)
  expected = np.floor(np.clip(images / 255.0 + noise, 0, 1) * 255)
  np.testing.assert_array_equal(out, expected)


def test_contrast_formula(images):
  out = C.corrupt(images, "contrast", 4, 0)
  x = images / 255.0
  mean = x.mean(axis=(1, 2), keepdims=True)
  expected = np.floor(np.clip((x - mean) * 0.3 + mean, 0, 1) * 255)
  assert np.abs(out - expected).max() <= 1  # Float rounding at integers.
  assert np.mean(out == expected) > 0.99


def test_brightness_matches_colorsys(images):
  out = C.corrupt(images[:2], "brightness", 3, 0)
  for n, r, c in [(0, 0, 0), (0, 5, 17), (1, 31, 31), (1, 12, 3)]:
    h, s, v = colorsys.rgb_to_hsv(*(images[n, r, c] / 255.0))
    rgb = colorsys.hsv_to_rgb(h, s, min(v + 0.15, 1.0))
    np.testing.assert_allclose(out[n, r, c], np.floor(np.array(rgb) * 255),
                               atol=1)


def test_hsv_round_trip_and_colorsys(images):
  x = images[:2] / 255.0
  hsv = C.rgb_to_hsv(x)
  np.testing.assert_allclose(C.hsv_to_rgb(hsv), x, atol=1e-12)
  flat = x.reshape(-1, 3)[::37]
  ref = np.array([colorsys.rgb_to_hsv(*p) for p in flat])
  np.testing.assert_allclose(hsv.reshape(-1, 3)[::37], ref, atol=1e-12)


def test_impulse_noise_flips_a_share_c_of_values(images):
  x = np.tile(images, (8, 1, 1, 1))
  out = C.corrupt(x, "impulse_noise", 5, 0)
  changed = out != x
  assert np.all(np.isin(out[changed], (0, 255)))
  assert abs(changed.mean() - 0.07) < 0.01  # minus the already 0/255 ones


def test_shot_noise_is_poisson(images):
  flat = np.full((64, 32, 32, 3), 128, np.uint8)
  out = C.corrupt(flat, "shot_noise", 5, 0) / 255.0
  lam = 128 / 255.0 * 50
  np.testing.assert_allclose(out.mean(), lam / 50, atol=0.003)
  np.testing.assert_allclose(out.var(), lam / 50 ** 2, rtol=0.05)


def test_pixelate_and_jpeg_match_pillow(images):
  from PIL import Image
  img = Image.fromarray(images[0])
  small = img.resize((24, 24), Image.BOX).resize((32, 32), Image.BOX)
  np.testing.assert_array_equal(C.corrupt(images[:1], "pixelate", 4, 0)[0],
                                np.asarray(small))
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=58)
  np.testing.assert_array_equal(
      C.corrupt(images[:1], "jpeg_compression", 3, 0)[0],
      np.asarray(Image.open(buf)))


def test_motion_blur_kernel_and_horizontal_blur():
  weights, offsets = C.motion_blur_kernel(6, 2.0, 0.0)
  i = np.arange(13)
  np.testing.assert_allclose(weights, np.exp(-i ** 2 / 8) / np.exp(
      -i ** 2 / 8).sum())
  np.testing.assert_array_equal(offsets, np.stack([0 * i, i], -1))
  _, diag = C.motion_blur_kernel(2, 1.0, 45.0)
  np.testing.assert_array_equal(diag, [[0, 0], [1, 1], [1, 1], [2, 2],
                                       [3, 3]])
  row = np.zeros((2, 1, 41, 1))
  row[:, 0, 20] = 255.0
  both = C._motion_blur(row, 6, 2.0, np.array([0.0, 180.0]))  # pylint: disable=protected-access
  out = both[0, 0, :, 0]
  np.testing.assert_array_equal(both[1, 0, :, 0], out[::-1])
  # Pixel p reads p + i: the spike spreads to the left of column 20.
  np.testing.assert_array_equal(out[8:21], np.rint(255 * weights[::-1]))
  assert out[21:].max() == 0 and out[:7].max() == 0


def test_clipped_zoom_matches_scipy_zoom():
  x = np.random.default_rng(0).random((2, 32, 32, 3))
  for factor in (1.03, 1.17, 1.25):
    ref = ndimage.zoom(x, (1, factor, factor, 1), order=1)
    ours = C._zoom_linear(C._zoom_linear(x, factor, 1), factor, 2)  # pylint: disable=protected-access
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_defocus_kernel_is_a_normalised_symmetric_disk():
  for radius, blur in C.PARAMS["defocus_blur"]:
    k = C._disk_kernel(radius, blur)  # pylint: disable=protected-access
    assert k.shape == (17, 17)
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(k, k.T, atol=1e-7)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)


def test_grey_images_and_other_sizes(images):
  grey = images[:2, :, :, :1]
  for name in ("brightness", "snow", "glass_blur", "fog"):
    out = C.corrupt(grey, name, 3, 0)
    assert out.shape == grey.shape and not np.array_equal(out, grey)
  big = np.repeat(np.repeat(images[:2], 2, axis=1), 2, axis=2)
  for name in ("fog", "elastic_transform", "zoom_blur"):
    assert C.corrupt(big, name, 2, 0).shape == big.shape


def test_corrupted_split_blocks(images):
  y = np.arange(6)
  split = C.corrupted_split(images, y, ("contrast", "shot_noise"), (1, 4),
                            seed=5)
  assert split.blocks == (("contrast", 1), ("contrast", 4),
                          ("shot_noise", 1), ("shot_noise", 4))
  assert split.x.shape == (24, 32, 32, 3) and split.y.dtype == np.int32
  np.testing.assert_array_equal(split.y, np.tile(y, 4))
  alone = C.corrupted_split(images, y, ("shot_noise",), (4,), seed=5)
  np.testing.assert_array_equal(split.x[18:], alone.x)
  np.testing.assert_array_equal(
      alone.x, C.corrupt(images, "shot_noise", 4,
                         C.block_seed(5, "shot_noise", 4)))
  assert C.block_seed(5, "shot_noise", 4) != C.block_seed(6, "shot_noise", 4)


def test_load_released(tmp_path, images):
  x = np.concatenate([images + s for s in range(5)]).astype(np.uint8)
  np.save(tmp_path / "fog.npy", x)
  np.save(tmp_path / "labels.npy", np.tile(np.arange(6, dtype=np.uint8), 5))
  xs, ys = C.load_released(str(tmp_path), "fog", 3)
  np.testing.assert_array_equal(xs, images + 2)
  assert ys.dtype == np.int32 and list(ys) == list(range(6))
  with pytest.raises(FileNotFoundError, match="snow.npy"):
    C.load_released(str(tmp_path), "snow", 1)
  np.save(tmp_path / "labels.npy", np.arange(7))
  with pytest.raises(ValueError, match="labels.npy"):
    C.load_released(str(tmp_path), "fog", 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="fig"), "unknown corruption 'fig'"),
    (dict(severity=0), "severity"),
    (dict(severity=6), "severity"),
    (dict(severity=True), "severity"),
    (dict(severity=2.0), "severity"),
    (dict(seed=-1), "seed"),
    (dict(images=np.zeros((2, 4, 4, 3), np.float32)), "uint8"),
    (dict(images=np.zeros((4, 4, 3), np.uint8)), "uint8"),
    (dict(name="brightness", images=np.zeros((1, 4, 4, 2), np.uint8)),
     "1 or 3 channels"),
    (dict(name="spatter"), "not implemented"),
    (dict(name="frost"), "frost_dir"),
])
def test_errors(kwargs, match):
  args = dict(images=np.zeros((1, 8, 8, 3), np.uint8), name="contrast",
              severity=1, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    C.corrupt(args["images"], args["name"], args["severity"], args["seed"])


def test_study_names_are_the_module(images):
  assert CORRUPTION_PARAMS is C.PARAMS
  np.testing.assert_array_equal(
      apply_corruption(images, "gaussian_blur", 2, seed=1),
      C.corrupt(images, "gaussian_blur", 2, 1))
