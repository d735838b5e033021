"""The input pipeline: hold-out split, deterministic batches, normalisation.

Batching (:func:`batch_indices`, :func:`eval_batches`) is a pure function of
``(seed, epoch)``: resuming at step ``s`` of epoch ``e`` means taking row ``s``
of ``batch_indices(..., seed=seed, epoch=e)``. Multi-process sharding is done
per global batch: process ``p`` of ``P`` loads the ``p``-th contiguous slice of
every global batch, so the union over processes of a global batch does not
depend on ``P``.

Hold-out split, batching and channel statistics are NumPy; :func:`normalize`
is JAX, pure and ``jit``-able. Augmentation is in :mod:`synstrip_vit.augment`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def split_holdout(
    x: np.ndarray, y: np.ndarray, *, fraction: float, seed: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Deterministically holds out a fraction of the training data.

  The held-out part is the probe set for dead-neuron detection. Rows are
  chosen by ``np.random.default_rng(seed).permutation(N)``: the first
  ``round(fraction * N)`` permuted rows are held out. Both parts keep the
  original row order.

  Args:
    x: ``[N, ...]`` images (any dtype).
    y: ``[N]`` labels.
    fraction: held-out fraction, in the open interval ``(0, 1)``.
    seed: non-negative int.

  Returns:
    ``(x_train, y_train, x_holdout, y_holdout)``; both parts are non-empty.

  Raises:
    ValueError: ``fraction`` outside (0, 1), a part would be empty, bad seed,
      or ``len(x) != len(y)``.
  """
  if not isinstance(fraction, (float, int)) or isinstance(fraction, bool) \
      or not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in the open interval (0, 1), got "
                     f"{fraction!r}")
  check_nonneg_int("seed", seed)
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
  n = len(x)
  num_holdout = int(round(fraction * n))
  if not 0 < num_holdout < n:
    raise ValueError(
        f"fraction={fraction!r} of {n} examples leaves an empty part "
        f"({num_holdout} held out)")
  perm = np.random.default_rng(seed).permutation(n)
  holdout = np.sort(perm[:num_holdout])
  train = np.sort(perm[num_holdout:])
  return x[train], y[train], x[holdout], y[holdout]



# --------------------------------------------------------------------------
# Deterministic, resumable batching
# --------------------------------------------------------------------------


def check_nonneg_int(what: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an int >= 0 (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
      or value < 0:
    raise ValueError(f"{what} must be a non-negative int, got {value!r}")


def check_pos_int(what: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an int >= 1 (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
      or value < 1:
    raise ValueError(f"{what} must be a positive int, got {value!r}")



def epoch_permutation(num_examples: int, *, seed: int,
                      epoch: int) -> np.ndarray:
  """The shuffled example order of one epoch.

  ``np.random.default_rng([seed, epoch]).permutation(num_examples)``: a pure
  function of ``(num_examples, seed, epoch)``, so training can resume
  anywhere, and different epochs get independent orders.

  Returns:
    ``[num_examples]`` int64, a permutation of ``0..num_examples-1``.
  """
  check_pos_int("num_examples", num_examples)
  check_nonneg_int("seed", seed)
  check_nonneg_int("epoch", epoch)
  return np.random.default_rng([int(seed), int(epoch)]).permutation(
      int(num_examples))


def _global_batches(num_examples: int, global_batch_size: int, *, seed: int,
                    epoch: int, shuffle: bool, drop_remainder: bool,
                    process_index: int, process_count: int
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Shared implementation of :func:`batch_indices` / :func:`eval_batches`."""
  check_pos_int("num_examples", num_examples)
  check_pos_int("global_batch_size", global_batch_size)
  check_pos_int("process_count", process_count)
  check_nonneg_int("process_index", process_index)
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} must be < "
                     f"process_count={process_count}")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}")
  if drop_remainder and global_batch_size > num_examples:
    raise ValueError(
        f"global_batch_size={global_batch_size} > num_examples="
        f"{num_examples} with drop_remainder=True gives no batch")
  if shuffle:
    order = epoch_permutation(num_examples, seed=seed, epoch=epoch)
  else:
    check_nonneg_int("seed", seed)
    check_nonneg_int("epoch", epoch)
    order = np.arange(num_examples, dtype=np.int64)
  if drop_remainder:
    num_batches = num_examples // global_batch_size
  else:
    num_batches = -(-num_examples // global_batch_size)
  total = num_batches * global_batch_size
  valid = np.arange(total) < num_examples
  order = np.concatenate(
      [order[:total], np.zeros(max(total - num_examples, 0), np.int64)])
  local = global_batch_size // process_count
  cols = slice(process_index * local, (process_index + 1) * local)
  return (order.reshape(num_batches, global_batch_size)[:, cols],
          valid.reshape(num_batches, global_batch_size)[:, cols])


def batch_indices(num_examples: int, global_batch_size: int, *, seed: int,
                  epoch: int, shuffle: bool = True,
                  drop_remainder: bool = True, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """Rows this process loads for each global batch of one epoch.

  The epoch's order is :func:`epoch_permutation` (or ``arange`` if not
  ``shuffle``); global batch ``b`` is ``order[b*G:(b+1)*G]``
  (``G = global_batch_size``) and process ``p`` takes its ``p``-th
  contiguous slice of ``G // process_count`` rows. The union over processes
  of a global batch is therefore the same for every ``process_count``. To
  resume at step ``s`` of epoch ``e``, use row ``s`` of the result for
  ``epoch=e``.

  With ``drop_remainder=True`` the last ``num_examples % G`` examples of the
  order are skipped (a different subset each epoch when shuffling). With
  ``drop_remainder=False`` the last batch is padded with index ``0``; use
  :func:`eval_batches` (which also returns the validity mask) so padded
  slots are not counted.

  Args:
    num_examples: dataset size (>= 1).
    global_batch_size: examples per global batch, divisible by
      ``process_count``; ``<= num_examples`` when ``drop_remainder``.
    seed, epoch: non-negative ints fixing the order.
    shuffle: permute the examples (else dataset order).
    drop_remainder: drop the final partial batch (else pad it).
    process_index, process_count: this process / number of processes
      (``jax.process_index()``, ``jax.process_count()``).

  Returns:
    ``[num_batches, global_batch_size // process_count]`` int64 row indices.

  Raises:
    ValueError: on any invalid argument (named in the message).
  """
  indices, _ = _global_batches(
      num_examples, global_batch_size, seed=seed, epoch=epoch,
      shuffle=shuffle, drop_remainder=drop_remainder,
      process_index=process_index, process_count=process_count)
  return indices


class EvalBatches(NamedTuple):
  """Padded evaluation batches of one process (see :func:`eval_batches`).

  Attributes:
    indices: ``[num_batches, local_batch]`` int64 row indices; padded slots
      hold index 0 (a real row, so gathering never fails).
    valid: ``[num_batches, local_batch]`` bool, False exactly on padded
      slots. Over all processes and batches each example has exactly one
      True slot.
  """
  indices: np.ndarray
  valid: np.ndarray


def eval_batches(num_examples: int, global_batch_size: int, *,
                 process_index: int = 0,
                 process_count: int = 1) -> EvalBatches:
  """Fixed-shape evaluation batches that cover every example exactly once.

  Dataset order (no shuffle), ``ceil(num_examples / G)`` global batches of
  ``G = global_batch_size``; the last one is padded with index 0 and marked
  invalid. Weight per-example metrics by ``valid`` (e.g.
  ``sum(correct * valid)`` and ``sum(valid)``) so every example counts
  exactly once. Sharding across processes is as in :func:`batch_indices`.

  Returns:
    :class:`EvalBatches` ``(indices, valid)``, both
    ``[num_batches, global_batch_size // process_count]``.
  """
  return EvalBatches(*_global_batches(
      num_examples, global_batch_size, seed=0, epoch=0, shuffle=False,
      drop_remainder=False, process_index=process_index,
      process_count=process_count))



# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------


def channel_stats(x_train: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and (population) std of uint8 images, in 0..255 units.

  Exact and memory-light (per-channel 256-bin histograms; no float copy of
  the data).

  Args:
    x_train: ``[N, H, W, C]`` uint8 images (N >= 1).

  Returns:
    ``(mean, std)``, each ``[C]`` float32 (std with ``ddof=0``). Pass them to
    :func:`normalize`.

  Raises:
    ValueError: not a non-empty uint8 4-D array.
  """
  x = np.asarray(x_train)
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(
        f"channel_stats needs non-empty uint8 [N, H, W, C] images, got "
        f"dtype {x.dtype}, shape {x.shape}")
  values = np.arange(256, dtype=np.float64)
  means, stds = [], []
  for c in range(x.shape[-1]):
    counts = np.bincount(x[..., c].reshape(-1), minlength=256)
    total = counts.sum()
    mean = float(counts @ values) / total
    var = float(counts @ (values - mean) ** 2) / total
    means.append(mean)
    stds.append(math.sqrt(var))
  return np.asarray(means, np.float32), np.asarray(stds, np.float32)


def check_normalizable(mean: np.ndarray, std: np.ndarray,
                       dataset: str) -> None:
  """Raise ``ValueError`` if a channel of the training images is constant.

  :func:`normalize` divides by ``std``: a channel with ``std == 0`` (e.g. an
  RGBA alpha channel that is 255 everywhere) would make every input NaN.

  Args:
    mean, std: from :func:`channel_stats`.
    dataset: the dataset's name, for the message.
  """
  for c, (m, s) in enumerate(zip(np.asarray(mean), np.asarray(std))):
    if not s > 0:
      raise ValueError(
          f"dataset {dataset!r}: channel {c} of the training images is "
          f"constant (value {float(m):g}, std 0), so normalising it divides "
          "by zero; drop that channel from the data")


def normalize(images: Array, mean: Array, std: Array) -> Array:
  """``(images - mean) / std`` in float32.

  Args:
    images: ``[..., C]`` images, typically uint8 raw pixels (any dtype).
    mean, std: ``[C]`` (broadcastable) in the same units as ``images``
      (0..255 for raw pixels, as returned by :func:`channel_stats`).

  Returns:
    float32 array of ``images``' shape. Pure; works under ``jit``.
  """
  images = jnp.asarray(images).astype(jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images - mean) / std


__all__ = ["EvalBatches", "batch_indices", "channel_stats", "check_nonneg_int",
           "check_normalizable", "check_pos_int", "epoch_permutation",
           "eval_batches", "normalize", "split_holdout"]
