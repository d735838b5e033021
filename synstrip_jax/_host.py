"""Synaptic stripping of one kernel in NumPy, on the host, without compiling.

The eager path of :func:`synstrip_jax.strip_params` (``method='auto'`` or
``'host'``): a strip event happens once per epoch or so, and compiling the
per-kernel XLA program (0.3-0.5 s per kernel shape on a 2-core CPU) costs
more than the computation itself. This module computes exactly what the
compiled program computes, bit for bit, on this machine's XLA:CPU:

* thresholds: the ``q`` quantile of each dead neuron's non-zero incoming
  weights, ``t = lerp(v_(l), v_(h), w)`` with PyTorch's one-rounding lerp
  (see :mod:`synstrip_jax.stripping`). The fused multiply-add is evaluated
  exactly: the product of two float32 values is exact in float64, the sum's
  rounding error is recovered exactly (TwoSum), and the float64 result is
  rounded to odd before the final rounding to float32, which makes the
  double rounding correct (53 >= 2 * 24 + 2 bits);
* XLA:CPU's flush-to-zero: subnormal float32 inputs count as zero (not as
  non-zero weights) and subnormal results of ``b - a`` and of the lerp are
  flushed to (signed) zero, as the compiled program does on CPU;
* only the dead columns are sorted (``np.partition`` at the needed ranks),
  so the cost follows the number of dead neurons.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: Smallest normal float32; smaller magnitudes are flushed by XLA:CPU.
_TINY = np.float32(np.finfo(np.float32).tiny)

#: Above this many distinct ranks a full sort beats a multi-kth partition.
_MAX_PARTITION_RANKS = 16


def flush(x: np.ndarray) -> np.ndarray:
  """Subnormal float32 values to signed zero (NaN and inf unchanged)."""
  return np.where(np.abs(x) < _TINY, np.copysign(np.float32(0), x), x)


def _round_fma(base: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """``float32(base + x * y)`` with one rounding (a float32 FMA).

  ``base``, ``x``, ``y`` float32. Non-finite intermediate values fall back
  to the float64 result (they are NaN/inf either way).
  """
  a = base.astype(np.float64)
  p = x.astype(np.float64) * y.astype(np.float64)  # exact: 48 bits
  s = a + p
  bb = s - a
  e = (a - (s - bb)) + (p - bb)  # TwoSum: s + e == a + p exactly
  with np.errstate(invalid="ignore"):
    inexact = np.isfinite(s) & (e != 0)
    # Round to odd: truncate towards zero, then set the sticky last bit.
    toward_zero = inexact & (np.sign(e) != np.sign(s))
  s = np.where(toward_zero, np.nextafter(s, 0.0), s)
  bits = s.view(np.int64) | inexact.astype(np.int64)
  return bits.view(np.float64).astype(np.float32)


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
  """PyTorch's CPU lerp in float32 under XLA:CPU's flush-to-zero."""
  with np.errstate(invalid="ignore", over="ignore"):
    d = flush(b - a)
    one_minus_w = np.float32(1.0) - w
    t = np.where(w < 0.5, _round_fma(a, w, d), _round_fma(b, -d, one_minus_w))
  return flush(t)


def _order_stats(cols: np.ndarray, lo: np.ndarray, hi: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``(cols[r] sorted)[lo[r]]`` and ``[hi[r]]`` for each row ``r``."""
  ranks = np.unique(np.concatenate([lo, hi]))
  if len(ranks) <= _MAX_PARTITION_RANKS:
    part = np.partition(cols, ranks, axis=1)
  else:
    part = np.sort(cols, axis=1)
  rows = np.arange(len(cols))
  return part[rows, lo], part[rows, hi]


def column_thresholds(cols: np.ndarray,
                      table: tuple[np.ndarray, np.ndarray, np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Thresholds of the neurons whose incoming weights are the rows of
  ``cols`` (``[c, fan_in]`` float32, masked-out weights at 0, subnormals
  already flushed).

  Args:
    cols: one dead neuron per row.
    table: ``(lo, hi, w)`` of :func:`synstrip_jax.stripping.
      _interpolation_table` for ``(fan_in, q)``, indexed by the non-zero
      count.

  Returns:
    ``(thresholds, has_nan)``, both ``[c]``: float32 thresholds, NaN for a
    row without a non-zero weight or with a NaN weight (``has_nan``: those
    rows are skipped, nothing is pruned there).
  """
  has_nan = np.isnan(cols).any(axis=1)
  zero = cols == 0
  m = cols.shape[1] - zero.sum(axis=1)
  lo, hi, w = (t[m] for t in table)
  a, b = _order_stats(np.where(zero, np.float32(np.inf), cols), lo, hi)
  thr = np.where((m > 0) & ~has_nan, _lerp(a, b, w), np.float32(np.nan))
  return thr.astype(np.float32), has_nan


def strip_kernel(kernel: np.ndarray, dead: np.ndarray,
                 mask: Optional[np.ndarray],
                 table: tuple[np.ndarray, np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(kernel, mask, skipped)`` after stripping (NumPy in, NumPy out).

  ``kernel`` ``[..., fan_in, n]``, ``dead`` ``[n]`` bool, ``mask`` bool of
  the kernel's shape or ``None`` (everything kept). Only the dead columns
  are read and sorted. Returns the kernel with every weight outside the new
  mask at 0.0 (the kernel's dtype; the others bit for bit), the new mask
  (``new <= old``) and ``skipped``: ``[n]`` bool, the dead neurons left
  alone for a NaN among their kept weights.
  """
  n = kernel.shape[-1]
  k2 = kernel.reshape(-1, n)
  new_mask = (np.ones(k2.shape, np.bool_) if mask is None
              else np.array(mask, np.bool_).reshape(-1, n))
  idx = np.flatnonzero(dead)
  skipped = np.zeros(n, np.bool_)
  if idx.size:
    kept = new_mask[:, idx]
    # [dead, fan_in] rows: contiguous for the partition below.
    cols = np.ascontiguousarray(flush(np.where(
        kept, k2[:, idx], np.zeros((), kernel.dtype)).astype(np.float32)).T)
    thr, skipped[idx] = column_thresholds(cols, table)
    with np.errstate(invalid="ignore"):
      # NaN thresholds compare False: empty and skipped columns keep all.
      new_mask[:, idx] = kept & ~(cols.T < thr)
  new_kernel = (kernel if mask is None and not idx.size
                else np.where(new_mask, k2, np.zeros((), kernel.dtype))
                .reshape(kernel.shape))
  return new_kernel, new_mask.reshape(kernel.shape), skipped


__all__ = ["column_thresholds", "flush", "strip_kernel"]
