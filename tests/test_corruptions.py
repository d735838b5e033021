"""Tests of the CIFAR-10-C stand-in of the study (experiments/corruptions.py)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.corruptions import CORRUPTION_PARAMS, apply_corruption


def _gray_images(n=8, size=16):
  return np.full((n, size, size, 3), 128, np.uint8)


def _textured_images(n=8, size=16):
  return np.random.default_rng(1).integers(40, 216, (n, size, size, 3),
                                           dtype=np.uint8)


def test_corruption_shape_dtype_determinism():
  x = _textured_images()
  for kind in CORRUPTION_PARAMS:
    a = apply_corruption(x, kind, 3, seed=0)
    b = apply_corruption(x, kind, 3, seed=0)
    assert a.shape == x.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  noise = [apply_corruption(x, "gaussian_noise", 3, seed=s)
           for s in (0, 1)]
  assert not np.array_equal(*noise)


def test_gaussian_noise_std_grows_with_severity():
  x = _gray_images(n=16, size=32)
  stds = [np.std(apply_corruption(x, "gaussian_noise", s, seed=0)
                 .astype(np.float64) / 255.0) for s in range(1, 6)]
  assert np.all(np.diff(stds) > 0)
  np.testing.assert_allclose(stds, CORRUPTION_PARAMS["gaussian_noise"],
                             rtol=0.05)


def test_contrast_matches_formula_and_is_monotonic():
  x = _textured_images()
  out = apply_corruption(x, "contrast", 5, seed=0)
  xf = x / 255.0
  m = xf.mean(axis=(1, 2), keepdims=True)
  ref = np.rint(np.clip((xf - m) * 0.15 + m, 0, 1) * 255)
  assert np.max(np.abs(out - ref)) <= 1
  stds = [apply_corruption(x, "contrast", s, seed=0).std()
          for s in range(1, 6)]
  assert np.all(np.diff(stds) < 0) and stds[0] < x.std()


def test_gaussian_blur_is_monotonic_and_keeps_constants():
  x = _textured_images()
  tv = [np.abs(np.diff(apply_corruption(x, "gaussian_blur", s, seed=0)
                       .astype(np.float64), axis=2)).mean()
        for s in range(1, 6)]
  assert np.all(np.diff(tv) < 0)
  assert tv[0] < np.abs(np.diff(x.astype(np.float64), axis=2)).mean()
  gray = _gray_images()
  np.testing.assert_array_equal(
      apply_corruption(gray, "gaussian_blur", 5, seed=0), gray)
  # Channels are blurred independently.
  one = np.zeros((1, 9, 9, 3), np.uint8)
  one[0, 4, 4, 1] = 255
  blurred = apply_corruption(one, "gaussian_blur", 5, seed=0)
  assert blurred[..., 0].max() == 0 and blurred[..., 2].max() == 0
  assert blurred[0, 4, 3, 1] > 0


@pytest.mark.parametrize("kind,severity,match", [
    ("fog", 1, "unknown corruption kind 'fog'"),
    ("contrast", 0, "severity"),
    ("contrast", 6, "severity"),
    ("contrast", True, "severity"),
    ("contrast", 2.0, "severity"),
])
def test_corruption_bad_kind_or_severity(kind, severity, match):
  with pytest.raises(ValueError, match=match):
    apply_corruption(_gray_images(), kind, severity, seed=0)


def test_corruption_bad_images_or_seed():
  with pytest.raises(ValueError, match="uint8"):
    apply_corruption(np.zeros((2, 4, 4, 3), np.float32), "contrast", 1,
                          seed=0)
  with pytest.raises(ValueError, match="uint8"):
    apply_corruption(np.zeros((4, 4, 3), np.uint8), "contrast", 1, seed=0)
  with pytest.raises(ValueError, match="seed"):
    apply_corruption(_gray_images(), "gaussian_noise", 1, seed=-1)
