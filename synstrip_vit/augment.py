"""Training augmentation: random crop (zero padding) + horizontal flip (JAX).

Pure, ``jit``-able, with an explicit PRNG key. Documented deviation from the
paper's CIFAR recipe: AutoAugment is **not** implemented.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _crop_flip_one(key: Array, image: Array, padding: int,
                   flip: bool) -> Array:
  """One ``[H, W, C]`` image, cropped and maybe flipped with ``key``."""
  height, width, channels = image.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
    image = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0),
                                  (height, width, channels))
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key, 0.5), image[:, ::-1, :],
                      image)
  return image


@functools.partial(jax.jit, static_argnames=("padding", "flip"))
def random_crop_flip(key: Array, images: Array, *, padding: int = 4,
                     flip: bool = True) -> Array:
  """Per-example random crop after zero padding, then random horizontal flip.

  Like torchvision's ``RandomCrop(H, padding=padding)`` followed by
  ``RandomHorizontalFlip(0.5)``: each image is zero-padded by ``padding`` on
  every side and an ``H x W`` window is cut at a uniformly random offset in
  ``[0, 2 * padding]`` per axis; then, with probability 0.5, it is mirrored
  left-right. Per-example keys are ``jax.random.split(key, B)``, so the
  result is a pure function of ``(key, images)``. Implemented with
  ``jax.vmap`` + ``jax.lax.dynamic_slice``; jitted (``padding``/``flip`` are
  static).

  The padding value is 0 in the units of ``images``. torchvision pads the raw
  image with black, so to match it apply this to raw pixels (uint8, or
  float 0..255) and :func:`synstrip_vit.input_pipeline.normalize`
  afterwards; applied to normalised images it pads with the channel mean
  instead.

  Documented deviation from the paper's CIFAR recipe: AutoAugment is not
  implemented.

  Args:
    key: PRNG key.
    images: ``[B, H, W, C]`` batch (float, or any dtype).
    padding: non-negative int; 0 disables cropping.
    flip: whether to apply random horizontal flips.

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
      functools.partial(_crop_flip_one, padding=padding, flip=bool(flip)))(
          keys, images)

