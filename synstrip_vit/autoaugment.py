"""AutoAugment as the original Synaptic Stripping code applies it, in JAX.

The original trains with the PIL policies of the DeepVoltaire AutoAugment
implementation: ``CIFAR10Policy`` (CIFAR-10, CIFAR-100, Tiny ImageNet) and
``SVHNPolicy`` (SVHN). A policy is 25 sub-policies; each image draws one
uniformly, and the sub-policy's two ops are applied in order, each with its own
probability ``p`` (``uniform() < p``). An op's magnitude is bin ``level`` of
the 10 values in :data:`RANGES`; shear, translate, rotate, color, contrast,
sharpness and brightness draw a random sign per application.

The ops, on uint8 RGB images (``[B, H, W, 3]``), reproduce Pillow's arithmetic:

* ``shearX``/``shearY``: affine ``(1, m, 0, 0, 1, 0)`` / ``(1, 0, 0, m, 1, 0)``
  with PIL's bicubic filter (``a = -1`` cubic, edge-clamped taps, truncation)
  and fill 128. One of PIL's two fractional offsets is exactly 0 for a shear,
  so the filter is a 4-tap 1-D cubic; PIL evaluates it in float64, this module
  in float32 from the same integer taps, so a few pixels (those whose float64
  value lies within ~1e-4 of an integer) differ by 1.
* ``translateX``/``translateY``: shift by ``m * width`` / ``m * height``
  pixels, nearest neighbour (PIL's scale-affine path), fill 128: exact.
* ``rotate``: the original rotates the RGBA image (nearest, transparent fill)
  and composites it over grey ``(128,) * 4``, i.e. a nearest-neighbour
  rotation about the centre with fill 128 (PIL's 16.16 fixed-point path):
  exact.
* ``color``/``contrast``/``brightness``/``sharpness``: ``ImageEnhance``'s
  float32 blend ``trunc(clip(deg + f * (img - deg)))`` with ``f = 1 + m`` and
  ``deg`` the ITU-R 601 grey image, the mean grey level, black, or the
  ``SMOOTH``-filtered image (border kept): exact.
* ``posterize``, ``solarize``, ``invert``, ``autocontrast``, ``equalize``:
  ``ImageOps``' look-up tables, per image and channel where they depend on the
  histogram (``autocontrast`` reproduces float64 ``int(ix * scale + offset)``
  through a table of the inputs where it differs from the exact quotient):
  exact.

Geometric ops are gathers through per-variant index tables built with NumPy
at trace time (the image size and the policy are static); the rest are
per-image look-up tables and blends, so :func:`autoaugment` runs inside a
jitted training step, vectorised over the batch. The op kernels live in
:mod:`synstrip_vit.autoaugment_ops`.
"""

from __future__ import annotations

import functools
import types
from typing import Mapping, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from synstrip_vit.autoaugment_ops import FILL, OPS, SIGNED_OPS
from synstrip_vit.autoaugment_ops import _apply_entries, _plan

__all__ = ["FILL", "OPS", "SIGNED_OPS", "RANGES", "PolicyOp", "SubPolicy",
           "Policy", "CIFAR10_POLICY", "SVHN_POLICY", "policy_for", "OpSpec",
           "apply_ops", "apply_op", "autoaugment"]

Array = jax.Array


def _bins(start: float, stop: float) -> Tuple[float, ...]:
  return tuple(float(v) for v in np.linspace(start, stop, 10))


#: The 10 magnitudes per op (index = the policy's magnitude bin).
RANGES: Mapping[str, Tuple[float, ...]] = types.MappingProxyType({
    "shearX": _bins(0, 0.3), "shearY": _bins(0, 0.3),
    "translateX": _bins(0, 150 / 331), "translateY": _bins(0, 150 / 331),
    "rotate": _bins(0, 30), "color": _bins(0.0, 0.9),
    "posterize": tuple(int(v) for v in np.round(np.linspace(8, 4, 10), 0)),
    "solarize": _bins(256, 0), "contrast": _bins(0.0, 0.9),
    "sharpness": _bins(0.0, 0.9), "brightness": _bins(0.0, 0.9),
    "autocontrast": (0,) * 10, "equalize": (0,) * 10, "invert": (0,) * 10,
})


class PolicyOp(NamedTuple):
  """One op of a sub-policy: applied with probability ``prob`` at ``level``."""
  prob: float
  name: str
  level: int


SubPolicy = Tuple[PolicyOp, PolicyOp]
Policy = Tuple[SubPolicy, ...]


def _policy(table: str) -> Policy:
  """A table of ``p1 op1 level1  p2 op2 level2`` lines -> a :data:`Policy`."""
  ops = [[PolicyOp(float(p), name, int(level)) for p, name, level
          in zip(row[0::3], row[1::3], row[2::3])]
         for row in (line.split() for line in table.splitlines()) if row]
  return tuple((first, second) for first, second in ops)


#: The original's ``CIFAR10Policy`` (CIFAR-10, CIFAR-100, Tiny ImageNet).
CIFAR10_POLICY: Policy = _policy("""
    0.1 invert 7  0.2 contrast 6
    0.7 rotate 2  0.3 translateX 9
    0.8 sharpness 1  0.9 sharpness 3
    0.5 shearY 8  0.7 translateY 9
    0.5 autocontrast 8  0.9 equalize 2
    0.2 shearY 7  0.3 posterize 7
    0.4 color 3  0.6 brightness 7
    0.3 sharpness 9  0.7 brightness 9
    0.6 equalize 5  0.5 equalize 1
    0.6 contrast 7  0.6 sharpness 5
    0.7 color 7  0.5 translateX 8
    0.3 equalize 7  0.4 autocontrast 8
    0.4 translateY 3  0.2 sharpness 6
    0.9 brightness 6  0.2 color 8
    0.5 solarize 2  0.0 invert 3
    0.2 equalize 0  0.6 autocontrast 0
    0.2 equalize 8  0.6 equalize 4
    0.9 color 9  0.6 equalize 6
    0.8 autocontrast 4  0.2 solarize 8
    0.1 brightness 3  0.7 color 0
    0.4 solarize 5  0.9 autocontrast 3
    0.9 translateY 9  0.7 translateY 9
    0.9 autocontrast 2  0.8 solarize 3
    0.8 equalize 8  0.1 invert 3
    0.7 translateY 9  0.9 autocontrast 1
""")

#: The original's ``SVHNPolicy``.
SVHN_POLICY: Policy = _policy("""
    0.9 shearX 4  0.2 invert 3
    0.9 shearY 8  0.7 invert 5
    0.6 equalize 5  0.6 solarize 6
    0.9 invert 3  0.6 equalize 3
    0.6 equalize 1  0.9 rotate 3
    0.9 shearX 4  0.8 autocontrast 3
    0.9 shearY 8  0.4 invert 5
    0.9 shearY 5  0.2 solarize 6
    0.9 invert 6  0.8 autocontrast 1
    0.6 equalize 3  0.9 rotate 3
    0.9 shearX 4  0.3 solarize 3
    0.8 shearY 8  0.7 invert 4
    0.9 equalize 5  0.6 translateY 6
    0.9 invert 4  0.6 equalize 7
    0.3 contrast 3  0.8 rotate 4
    0.8 invert 5  0.0 translateY 2
    0.7 shearY 6  0.4 solarize 8
    0.6 invert 4  0.8 rotate 4
    0.3 shearY 7  0.9 translateX 3
    0.1 shearX 6  0.6 invert 5
    0.7 solarize 2  0.6 translateY 7
    0.8 shearY 4  0.8 invert 8
    0.7 shearX 9  0.8 translateY 3
    0.8 shearY 5  0.7 autocontrast 3
    0.7 shearX 2  0.1 invert 5
""")


def policy_for(dataset: str) -> Policy:
  """The original's policy for ``dataset``: SVHN's for names starting with
  ``svhn``, the CIFAR-10 policy otherwise (CIFAR-10/100, Tiny ImageNet)."""
  return SVHN_POLICY if dataset.startswith("svhn") else CIFAR10_POLICY



def _check_images(images: Array) -> None:
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
    raise ValueError(f"AutoAugment needs uint8 [B, H, W, 3] images, got "
                     f"{images.dtype} {images.shape}")


OpSpec = Tuple[str, float, int]


@functools.partial(jax.jit, static_argnames=("ops",))
def apply_ops(images: Array, ops: Tuple[OpSpec, ...], index: Array) -> Array:
  """Op ``ops[index[b]]`` applied to image ``b``, all in one gather pass.

  Args:
    images: ``[B, H, W, 3]`` uint8.
    ops: static tuple of ``(name, magnitude, sign)``: ``name`` one of
      :data:`OPS`; ``magnitude`` the value as in the original's table (e.g.
      ``0.3`` for a shear, ``4`` posterize bits, a solarize threshold, degrees
      for rotate, ``m`` of the enhance factor ``1 + m``; ignored by
      autocontrast, equalize and invert); ``sign`` ``1`` or ``-1``, the
      original's random sign (used by shear, translate, rotate, color,
      contrast, sharpness, brightness).
    index: ``[B]`` int, in ``[0, len(ops))``.

  Returns:
    ``[B, H, W, 3]`` uint8.

  Raises:
    ValueError: bad images, an unknown op name, a bad sign or magnitude.
  """
  _check_images(images)
  plan = _plan(tuple(ops), *images.shape[1:3])
  return _apply_entries(images, jnp.asarray(index, jnp.int32) + 1, plan)


def apply_op(images: Array, name: str, magnitude: float, sign: int = 1
             ) -> Array:
  """One op (see :func:`apply_ops`) applied to every ``[B, H, W, 3]`` uint8
  image; ``name``, ``magnitude`` and ``sign`` are static."""
  return apply_ops(images, ((name, magnitude, sign),),
                   jnp.zeros(images.shape[0], jnp.int32))


def _policy_entries(policy: Policy) -> Tuple[tuple, ...]:
  """Entry ``1 + (2 * s + j) * 2 + k`` of the plan is op ``j`` of
  sub-policy ``s`` with sign ``(-1, 1)[k]``."""
  return tuple((op.name, RANGES[op.name][op.level], sign)
               for sub in policy for op in sub for sign in (-1, 1))


@functools.partial(jax.jit, static_argnames=("policy",))
def autoaugment(key: Array, images: Array, policy: Policy = CIFAR10_POLICY
                ) -> Array:
  """The original's AutoAugment, vectorised over the batch.

  Per image: a sub-policy drawn uniformly from ``policy``; for each of its
  two ops, applied when ``uniform() < prob``, at magnitude
  ``RANGES[name][level]`` with a sign drawn uniformly from ``(-1, 1)``. A
  pure function of ``(key, images)``; jitted (``policy`` is static).

  Args:
    key: PRNG key.
    images: ``[B, H, W, 3]`` uint8.
    policy: :data:`CIFAR10_POLICY`, :data:`SVHN_POLICY` or any
      :data:`Policy` (hashable).

  Returns:
    ``[B, H, W, 3]`` uint8.
  """
  _check_images(images)
  if not policy:
    raise ValueError("policy has no sub-policies")
  plan = _plan(_policy_entries(policy), *images.shape[1:3])
  b = images.shape[0]
  choice_key, apply_key, sign_key = jax.random.split(key, 3)
  sub = jax.random.randint(choice_key, (b,), 0, len(policy))
  probs = jnp.asarray([[op.prob for op in s] for s in policy], jnp.float32)
  applied = jax.random.uniform(apply_key, (b, 2)) < probs[sub]
  positive = jax.random.bernoulli(sign_key, 0.5, (b, 2)).astype(jnp.int32)
  entry = jnp.where(applied, 1 + (2 * sub[:, None] + jnp.arange(2)) * 2
                    + positive, 0)
  images, _ = jax.lax.scan(
      lambda x, slot_entry: (_apply_entries(x, slot_entry, plan), None),
      images, entry.T)
  return images
