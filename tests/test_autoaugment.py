"""synstrip_vit.autoaugment against Pillow (the original's ops) on real images."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _shared import shared_file_or_skip
from synstrip_vit import augment
from synstrip_vit import autoaugment as aa
from synstrip_vit.input_pipeline import normalize

Image = pytest.importorskip("PIL.Image")
ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
ImageOps = pytest.importorskip("PIL.ImageOps")

NUM_IMAGES = 24
FILL = (128, 128, 128)
# Bicubic shear: PIL evaluates the cubic in float64, this module in float32,
# so pixels within ~1e-4 of an integer may truncate 1 apart. Measured on 200
# CIFAR-10 images at every shear bin and sign: at most 1.4e-3 of the values
# differ (bins 4 and 8), never by more than 1.
SHEAR_MAX_FRACTION = 2e-3


def _pil_op(image: np.ndarray, name: str, m: float, sign: int) -> np.ndarray:
  """The original's op (``src/autoaugment.py``) with its random sign fixed."""
  x = Image.fromarray(image)
  w, h = x.size
  affine = {"shearX": (1, m * sign, 0, 0, 1, 0),
            "shearY": (1, 0, 0, m * sign, 1, 0),
            "translateX": (1, 0, m * w * sign, 0, 1, 0),
            "translateY": (1, 0, 0, 0, 1, m * h * sign)}
  enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
             "sharpness": ImageEnhance.Sharpness,
             "brightness": ImageEnhance.Brightness}
  if name.startswith("shear"):
    y = x.transform(x.size, Image.AFFINE, affine[name], Image.BICUBIC,
                    fillcolor=FILL)
  elif name.startswith("translate"):
    y = x.transform(x.size, Image.AFFINE, affine[name], fillcolor=FILL)
  elif name == "rotate":
    rot = x.convert("RGBA").rotate(m * sign)
    y = Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4),
                        rot).convert(x.mode)
  elif name in enhance:
    y = enhance[name](x).enhance(1 + m * sign)
  elif name in ("posterize", "solarize"):
    y = getattr(ImageOps, name)(x, m)
  else:
    y = getattr(ImageOps, name)(x)
  return np.asarray(y)


def _cases() -> list[tuple[str, float, int]]:
  """Every op at its policy magnitudes 0, 3, 6, 9 (and both signs)."""
  cases = []
  for name in aa.OPS:
    for level in (0, 3, 6, 9):
      signs = (1, -1) if name in aa.SIGNED_OPS else (1,)
      cases += [(name, aa.RANGES[name][level], s) for s in signs]
  return sorted(set(cases), key=cases.index)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
  data = np.load(shared_file_or_skip("data", "cifar10_lossless_4k.npz"))
  return data["x_train"][:NUM_IMAGES]


@pytest.fixture(scope="module")
def applied(images):
  """``{case: (ours, PIL's)}``: every case on every image, in one call."""
  cases = tuple(_cases())
  batch = np.tile(images, (len(cases), 1, 1, 1))
  index = np.repeat(np.arange(len(cases)), len(images))
  out = np.asarray(aa.apply_ops(jnp.asarray(batch), cases, index))
  out = out.reshape(len(cases), *images.shape)
  return {case: (out[k], np.stack([_pil_op(im, *case) for im in images]))
          for k, case in enumerate(cases)}


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}-{c[1]:.3g}-"
                         f"{c[2]:+d}")
def test_op_matches_pil(applied, case):
  ours, pil = applied[case]
  assert ours.dtype == np.uint8 and ours.shape == pil.shape
  if case[0].startswith("shear"):
    diff = np.abs(ours.astype(int) - pil)
    assert diff.max() <= 1 and np.mean(diff > 0) <= SHEAR_MAX_FRACTION
  else:
    np.testing.assert_array_equal(ours, pil)


def test_apply_op_is_apply_ops_of_one(images):
  out = aa.apply_op(jnp.asarray(images), "solarize", 128.0)
  pil = np.stack([_pil_op(im, "solarize", 128.0, 1) for im in images])
  np.testing.assert_array_equal(np.asarray(out), pil)


def test_autoaugment_jit_deterministic_and_key_dependent(images):
  # autoaugment is jitted; calling it directly shares its compilation with
  # the augment_batch test below.
  x = jnp.asarray(images)
  a = np.asarray(aa.autoaugment(jax.random.key(0), x, aa.CIFAR10_POLICY))
  b = np.asarray(aa.autoaugment(jax.random.key(0), x, aa.CIFAR10_POLICY))
  c = np.asarray(aa.autoaugment(jax.random.key(1), x, aa.CIFAR10_POLICY))
  assert a.dtype == np.uint8 and a.shape == images.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Some images change, and (probabilities < 1) not necessarily all.
  changed = np.any(a != images, axis=(1, 2, 3))
  assert 0 < changed.sum()


@pytest.mark.parametrize("policy", [aa.CIFAR10_POLICY, aa.SVHN_POLICY])
def test_policy_tables(policy):
  assert len(policy) == 25
  for sub in policy:
    assert len(sub) == 2
    for op in sub:
      assert op.name in aa.OPS and 0 <= op.level < 10 and 0 <= op.prob <= 1


def test_ranges_are_the_originals():
  assert aa.RANGES["posterize"] == (8, 8, 7, 7, 6, 6, 5, 5, 4, 4)
  np.testing.assert_allclose(aa.RANGES["rotate"], np.linspace(0, 30, 10))
  np.testing.assert_allclose(aa.RANGES["solarize"], np.linspace(256, 0, 10))
  assert all(len(v) == 10 for v in aa.RANGES.values())


def test_policy_for():
  assert aa.policy_for("svhn_cropped") is aa.SVHN_POLICY
  assert aa.policy_for("cifar100") is aa.CIFAR10_POLICY


@pytest.mark.parametrize("args,match", [
    ((np.zeros((2, 8, 8, 3), np.float32), "invert", 0), "uint8"),
    ((np.zeros((2, 8, 8, 1), np.uint8), "invert", 0), r"\[B, H, W, 3\]"),
    ((np.zeros((2, 8, 8, 3), np.uint8), "blur", 0), "blur"),
    ((np.zeros((2, 8, 8, 3), np.uint8), "posterize", 9), "posterize"),
])
def test_apply_op_errors(args, match):
  with pytest.raises(ValueError, match=match):
    aa.apply_op(*args)


MEAN, STD = np.array([125.0, 123.0, 114.0]), np.array([63.0, 62.0, 66.0])


@pytest.mark.parametrize("dataset,flips", [("cifar10", True),
                                           ("svhn_cropped", False)])
def test_original_flip_rule(dataset, flips):
  assert augment.original_flip(dataset) is flips


@pytest.mark.parametrize("autoaugment", [False, True])
def test_augment_batch_is_crop_flip_then_policy(images, autoaugment):
  key = jax.random.key(5)
  x = jnp.asarray(images)
  out = augment.augment_batch(key, x, mean=MEAN, std=STD, dataset="cifar10",
                              autoaugment=autoaugment)
  if autoaugment:
    crop_key, policy_key = jax.random.split(key)
    want = aa.autoaugment(policy_key, augment.random_crop_flip(crop_key, x),
                          aa.CIFAR10_POLICY)
  else:
    want = augment.random_crop_flip(key, x)
  np.testing.assert_allclose(
      np.asarray(out), np.asarray(normalize(want, MEAN, STD)), rtol=1e-6)


def test_augment_batch_needs_uint8():
  with pytest.raises(ValueError, match="uint8"):
    augment.augment_batch(jax.random.key(0), jnp.zeros((1, 4, 4, 3)),
                          mean=MEAN, std=STD, dataset="cifar10",
                          autoaugment=False)
