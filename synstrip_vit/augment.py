"""Training augmentation as the original applies it (JAX).

The original's training transform is ``RandomCrop(32, padding=4, fill=128)``,
then ``RandomHorizontalFlip()`` (CIFAR-10, CIFAR-100, Tiny ImageNet; not
SVHN), then optionally AutoAugment (``CIFAR10Policy``, or ``SVHNPolicy`` for
SVHN), then normalisation. :func:`augment_batch` is that, on uint8 pixels, as
one pure, ``jit``-able function of an explicit PRNG key;
:func:`random_crop_flip` is its crop and flip, and
:mod:`synstrip_vit.autoaugment` its AutoAugment.
"""

from __future__ import annotations

import functools

from typing import Optional

import jax
import jax.numpy as jnp

from synstrip_vit import autoaugment as autoaugment_lib
from synstrip_vit.input_pipeline import normalize

Array = jax.Array

#: The original's crop fill (grey, in 0..255 pixel units).
FILL = 128


def _crop_flip_one(key: Array, image: Array, padding: int, flip: bool,
                   fill: float) -> Array:
  """One ``[H, W, C]`` image, cropped and maybe flipped with ``key``."""
  height, width, channels = image.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)),
                     constant_values=jnp.asarray(fill, image.dtype))
    offsets = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
    image = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0),
                                  (height, width, channels))
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key, 0.5), image[:, ::-1, :],
                      image)
  return image


@functools.partial(jax.jit, static_argnames=("padding", "flip", "fill"))
def random_crop_flip(key: Array, images: Array, *, padding: int = 4,
                     flip: bool = True, fill: float = FILL) -> Array:
  """Per-example random crop after padding with ``fill``, then random flip.

  Like torchvision's ``RandomCrop(H, padding=padding, fill=fill)`` followed
  by ``RandomHorizontalFlip(0.5)``: each image is padded by ``padding`` on
  every side with the constant ``fill`` and an ``H x W`` window is cut at a
  uniformly random offset in ``[0, 2 * padding]`` per axis; then, with
  probability 0.5, it is mirrored left-right. Per-example keys are
  ``jax.random.split(key, B)``, so the result is a pure function of
  ``(key, images)``. Implemented with ``jax.vmap`` +
  ``jax.lax.dynamic_slice``; jitted (``padding``/``flip``/``fill`` are
  static).

  ``fill`` is in the units of ``images``: the original pads raw pixels with
  grey 128 (the default), so apply this to raw pixels (uint8, or float
  0..255) and :func:`synstrip_vit.input_pipeline.normalize` afterwards.

  Args:
    key: PRNG key.
    images: ``[B, H, W, C]`` batch (float, or any dtype).
    padding: non-negative int; 0 disables cropping.
    flip: whether to apply random horizontal flips.
    fill: padding value.

  Returns:
    Array with the shape and dtype of ``images``.

  Raises:
    ValueError: ``images`` not 4-D or ``padding`` negative / not an int.
  """
  if isinstance(padding, bool) or not isinstance(padding, int) \
      or padding < 0:
    raise ValueError(f"padding must be a non-negative int, got {padding!r}")
  if images.ndim != 4:
    raise ValueError(
        f"random_crop_flip needs a [B, H, W, C] batch, got shape "
        f"{images.shape}")
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(
      functools.partial(_crop_flip_one, padding=padding, flip=bool(flip),
                        fill=fill))(keys, images)



def original_flip(dataset: str) -> bool:
  """Whether the original flips ``dataset``: not SVHN (names starting with
  ``svhn``), every other data set."""
  return not dataset.startswith("svhn")


def augment_batch(key: Array, images: Array, *, mean: Array, std: Array,
                  dataset: str, autoaugment: bool, padding: int = 4,
                  flip: Optional[bool] = None) -> Array:
  """The original's training transform: uint8 batch -> normalised float32.

  Crop after grey padding (:func:`random_crop_flip`, fill 128), the
  horizontal flip (``flip``; ``None`` is the original's rule for
  ``dataset``, :func:`original_flip`), then, if ``autoaugment``, the
  original's policy for ``dataset``
  (:func:`synstrip_vit.autoaugment.policy_for`), then
  :func:`synstrip_vit.input_pipeline.normalize`. Without AutoAugment the
  crop and flip draw from ``key`` itself; with it, from
  ``jax.random.split(key)[0]``, AutoAugment from ``[1]``. Pure and
  ``jit``-able (all keyword arguments but ``mean``/``std`` are static).

  Args:
    key: PRNG key.
    images: ``[B, H, W, C]`` uint8 raw pixels (``C == 3`` for AutoAugment).
    mean, std: ``[C]`` normalisation in pixel units (0..255).
    dataset: the data set's name (``svhn*``: SVHN's policy and no flip).
    autoaugment: whether to apply AutoAugment.
    padding: crop padding; 0 disables the crop.
    flip: horizontal flips; ``None`` for the original's rule.

  Returns:
    ``[B, H, W, C]`` float32.

  Raises:
    ValueError: ``images`` not uint8 (the grey fill and AutoAugment work in
      pixel units), or as :func:`random_crop_flip` /
      :func:`synstrip_vit.autoaugment.autoaugment`.
  """
  if images.dtype != jnp.uint8:
    raise ValueError(f"augment_batch needs uint8 pixels, got {images.dtype}")
  flip = original_flip(dataset) if flip is None else flip
  crop_key = key
  if autoaugment:
    crop_key, policy_key = jax.random.split(key)
  images = random_crop_flip(crop_key, images, padding=padding, flip=flip)
  if autoaugment:
    images = autoaugment_lib.autoaugment(
        policy_key, images, autoaugment_lib.policy_for(dataset))
  return normalize(images, mean, std)
