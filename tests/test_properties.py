"""Property-based tests (hypothesis) of the library's invariants.

What is checked (each test's docstring says how):
* masks only shrink over repeated ``strip_params`` calls;
* per dead neuron: the threshold is ``torch.quantile``'s float32 value (an
  independent exact-arithmetic oracle of the algorithm described in
  ``shared/fixtures/README.md``, bit for bit) and ``np.quantile`` in float64
  (within a documented tolerance, exact when no interpolation happens); the
  pruned weights are exactly the non-zero weights strictly below it;
* stripping factor 0 prunes no weight (threshold = minimum);
* live columns, biases and non-targeted leaves are bit-identical to the input,
  shapes and dtypes are kept (float32 and bfloat16);
* a dead neuron with no non-zero weight left is left alone, no NaN anywhere;
* inputs (numpy arrays) are never modified;
* stripped weights stay exactly 0.0 (and their moments exactly 0) through 100
  steps of adamw / sgd+momentum / lion wrapped by ``with_stripping``;
* jitted calls agree bit for bit with eager ones (``strip_params`` and
  ``strip_event`` run different code under jit);
* activation statistics are split-invariant; ``dead_mask`` is invariant to how
  the probe set is split into batches.

Shapes and stripping factors are drawn from small fixed sets so that the jit
cache is reused (each new shape/factor costs a compilation of ~0.5 s on CPU);
the *contents* (zeros, ties, signs, magnitudes, masks, dead sets) vary freely,
so every non-zero count ``m`` in ``[0, fan_in]`` and both the ``top_k`` and
the sort path of the quantile are exercised.
"""

from __future__ import annotations

import copy
import functools
import math
from fractions import Fraction

import chex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _shared import assert_bitwise_equal, bits
from conftest import examples, normal, random_dead, small_params

from synstrip_jax import activations as acts
from synstrip_jax.stripping import strip_kernel, strip_params
from synstrip_jax.transform import (get_masks, set_masks, strip_event,
                                    with_stripping)

BF16 = jnp.bfloat16

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# Kernel shapes [..., fan_in, n]: dense, single-input, single-neuron, conv.
SHAPES = [(1, 1), (2, 3), (5, 1), (40, 12), (6, 2, 5), (2, 3, 4, 6)]
# Stripping factors: 0 and 1 (edges), the default, a non-representable one.
FACTORS = [0.0, 0.05, 1 / 3, 0.5, 1.0]
# bfloat16: fewer combinations (each one is a compilation).
BF16_SHAPES = [(2, 3), (40, 12), (2, 3, 4, 6)]
BF16_FACTORS = [0.05, 0.5]


# ----------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------

# Non-zero magnitudes stay in [2^-60, 1e6]: no subnormal can appear in the
# values, their differences or w * (b - a) (XLA:CPU treats subnormal inputs as
# zero, see the report), and nothing overflows.
_magnitude = st.floats(min_value=2.0**-60, max_value=1e6, width=32)
nonzero = st.builds(lambda m, s: np.float32(s * m), _magnitude,
                    st.sampled_from([-1.0, 1.0]))
zero = st.sampled_from([0.0, -0.0])


@st.composite
def values_array(draw, shape, dtype=np.float32):
  """Float array with exact zeros (+-0.0), repeated values and ties."""
  style = draw(st.sampled_from(["general", "pool", "integers"]))
  if style == "general":
    elements = st.one_of(zero, nonzero, nonzero)
  elif style == "pool":  # few distinct values: many ties at the quantile
    pool = draw(st.lists(nonzero, min_size=1, max_size=4))
    elements = st.sampled_from(pool + [0.0])
  else:
    elements = st.integers(-3, 3).map(float)
  arr = draw(hnp.arrays(np.float32, shape, elements=elements))
  return arr.astype(dtype)


@st.composite
def strip_case(draw, dtype=np.float32, factors=FACTORS, shapes=SHAPES,
               with_mask=True):
  shape = draw(st.sampled_from(shapes))
  kernel = draw(values_array(shape, dtype))
  n = shape[-1]
  dead = draw(hnp.arrays(np.bool_, (n,)))
  mask = (draw(hnp.arrays(np.bool_, shape)) if with_mask and draw(st.booleans())
          else np.ones(shape, np.bool_))
  q = draw(st.sampled_from(factors))
  return kernel, dead, mask, q


# ----------------------------------------------------------------------------
# Independent oracles
# ----------------------------------------------------------------------------

def round_to_f32(x: Fraction) -> np.float32:
  """Correctly rounded (nearest, ties to even) float32 of an exact rational."""
  c = np.float32(float(x))
  cands = {c, np.nextafter(c, np.float32(np.inf)),
           np.nextafter(c, np.float32(-np.inf))}
  def key(v):
    return (abs(Fraction(float(v)) - x),
            int(np.array(v, np.float32).view(np.uint32)) & 1)
  return min(cands, key=key)


def torch_quantile_f32(v: np.ndarray, q: float) -> np.float32:
  """``torch.quantile(v, q)`` of float32 ``v`` as PyTorch's CPU computes it.

  Rank ``q (m - 1)`` in float64 from the Python float q, weight rounded to
  float32, ``b - a`` rounded to float32, then one FMA rounding (torch CPU
  lerp: ``a + w d`` if ``w < 0.5`` else ``b - d (1 - w)``), evaluated in exact
  rational arithmetic (fixtures/README.md describes the algorithm).
  """
  s = np.sort(np.asarray(v, np.float32))
  rank = float(q) * max(s.size - 1, 0)
  lo, hi = math.floor(rank), math.ceil(rank)
  w = np.float32(rank - lo)
  a, b = s[lo], s[hi]
  d = np.float32(b - a)
  fa, fb, fd, fw = (Fraction(float(t)) for t in (a, b, d, w))
  exact = fa + fw * fd if w < 0.5 else fb - fd * (1 - fw)
  return round_to_f32(exact)


def numpy_tolerance(v: np.ndarray, q: float, t: float) -> float:
  """How far torch's float32 quantile may be from the float64 np.quantile.

  1 float32 ulp of the result (its final rounding), plus the error of the
  float32 lerp: ``b - a`` and the weight ``w`` are each rounded to float32
  before the FMA, which moves the result by up to ``2^-23 |b - a|``. Zero
  when there is nothing to interpolate (``w == 0`` or ``a == b``): exact.
  """
  s = np.sort(np.asarray(v, np.float64))
  rank = float(q) * max(s.size - 1, 0)
  lo, hi = math.floor(rank), math.ceil(rank)
  if rank == lo or s[lo] == s[hi]:
    return 0.0
  return float(np.spacing(np.float32(abs(t)))) + 2.0**-23 * (s[hi] - s[lo])


def columns(x):
  """``[..., F, n] -> [F', n]`` (all fan-in axes flattened)."""
  x = np.asarray(x)
  return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------
# The oracles themselves, against the original's outputs
# ----------------------------------------------------------------------------

def test_oracle_reproduces_original_thresholds(reference):
  """``torch_quantile_f32`` gives the fixtures' thresholds bit for bit."""
  cases = sorted({k.split("__")[0] for k in reference
                  if k.endswith("__weight0")})
  checked = 0
  for case in cases:
    g = lambda name: reference[f"{case}__{name}"]
    dead, q = g("dead"), float(g("factor"))
    w = g("weight0")
    for k in range(1, int(g("iterations")) + 1):
      if f"{case}__noise_{k}" in reference:
        w = w + g(f"noise_{k}") * g(f"mask_{k - 1}") if k > 1 else w + g(f"noise_{k}")
      thr = g(f"thresholds_{k}")
      for j in np.flatnonzero(dead):
        row = w[j][w[j] != 0]
        if row.size:
          assert torch_quantile_f32(row, q) == thr[j], (case, k, j)
          checked += 1
      w = g(f"weight_{k}")
  assert checked > 50


# ----------------------------------------------------------------------------
# strip_kernel / strip_params invariants
# ----------------------------------------------------------------------------

@settings(max_examples=examples(40), **SETTINGS)
@given(case=strip_case(), more_dead=st.lists(
    hnp.arrays(np.bool_, 12), min_size=1, max_size=3))
def test_masks_only_shrink(case, more_dead):
  """Over repeated ``strip_params`` calls, new mask implies old mask, and
  every weight outside the mask is exactly 0.0."""
  kernel, dead, mask, q = case
  n = kernel.shape[-1]
  params = {"layer": {"kernel": kernel}}
  masks = {"layer": {"kernel": mask}}
  for d in [dead] + [m[:n] for m in more_dead]:
    new_params, new_masks = strip_params(params, {"layer": {"kernel": d}},
                                         masks, stripping_factor=q)
    old_m = np.asarray(masks["layer"]["kernel"])
    new_m = np.asarray(new_masks["layer"]["kernel"])
    assert new_m.dtype == np.bool_ and new_m.shape == kernel.shape
    assert not np.any(new_m & ~old_m), "a pruned weight came back"
    assert np.all(np.asarray(new_params["layer"]["kernel"])[~new_m] == 0)
    # Live neurons' masks do not move.
    np.testing.assert_array_equal(new_m[..., ~d], old_m[..., ~d])
    params, masks = new_params, new_masks


def check_strip_kernel(kernel, dead, mask, q):
  """Run ``strip_kernel`` and check every neuron against the oracles."""
  new_k, new_m, thr = strip_kernel(jnp.asarray(kernel), jnp.asarray(dead),
                                   jnp.asarray(mask), stripping_factor=q)
  new_k, new_m, thr = np.asarray(new_k), np.asarray(new_m), np.asarray(thr)
  assert new_k.dtype == kernel.dtype and new_k.shape == kernel.shape
  assert new_m.dtype == np.bool_ and new_m.shape == kernel.shape
  assert thr.dtype == np.float32 and thr.shape == dead.shape
  eff = np.where(mask, kernel, np.zeros((), kernel.dtype))
  # Pruned entries are exactly +0.0, the others are the input's bits.
  assert_bitwise_equal(new_k, np.where(new_m, kernel, np.zeros((), kernel.dtype)))
  eff32, old_m, new_mc = (columns(eff).astype(np.float32), columns(mask),
                          columns(new_m))
  old_k, out_k = columns(kernel), columns(new_k)
  stripped = 0
  for j in range(kernel.shape[-1]):
    col = eff32[:, j]
    nz = col[col != 0]
    if not dead[j] or nz.size == 0:
      # Live neuron, or dead with no non-zero weight left: left alone.
      assert np.isnan(thr[j]), (j, thr[j])
      np.testing.assert_array_equal(new_mc[:, j], old_m[:, j])
      continue
    t = thr[j]
    # 1. torch's float32 quantile, bit for bit.
    expected = torch_quantile_f32(nz, q)
    assert t == expected, f"neuron {j}: {t!r} != torch {expected!r} (q={q}, v={nz!r})"
    # 2. numpy's float64 quantile, within the documented tolerance.
    t_np = float(np.quantile(nz.astype(np.float64), q))
    tol = numpy_tolerance(nz, q, float(t))
    assert abs(float(t) - t_np) <= tol or np.float32(t_np) == t, (
        f"neuron {j}: {t!r} vs np.quantile {t_np!r}, tolerance {tol}")
    # 3. The newly zeroed weights are the non-zero weights strictly below t.
    newly_zeroed = (old_k[:, j].astype(np.float32) != 0) & old_m[:, j] & (
        out_k[:, j].astype(np.float32) == 0)
    assert newly_zeroed.sum() == np.sum(nz < t), j
    np.testing.assert_array_equal(newly_zeroed, (col != 0) & (col < t))
    # 4. The mask loses exactly the kept entries strictly below t (a kept
    #    entry that is exactly 0 goes too when t > 0, as in the original).
    np.testing.assert_array_equal(old_m[:, j] & ~new_mc[:, j],
                                  old_m[:, j] & (col < t))
    stripped += 1
  return stripped


@settings(max_examples=examples(60), **SETTINGS)
@given(case=strip_case())
def test_thresholds_and_pruned_counts_float32(case):
  """Per dead neuron with a non-zero weight: the threshold is torch's float32
  quantile (bit-exact oracle) and ``np.quantile`` in float64 within
  ``1 ulp + 2^-23 |b - a|`` (exact when nothing is interpolated); the weights
  zeroed are exactly the non-zero weights strictly below it; live neurons and
  empty dead neurons get a NaN threshold and an unchanged mask."""
  check_strip_kernel(*case)


@settings(max_examples=examples(30), **SETTINGS)
@given(case=strip_case(dtype=BF16, factors=BF16_FACTORS, shapes=BF16_SHAPES))
def test_thresholds_and_pruned_counts_bfloat16(case):
  """As the float32 test, for bfloat16 kernels (dtype kept, thresholds in
  float32 over the bfloat16 values)."""
  check_strip_kernel(*case)


def test_thresholds_on_seeded_data():
  """Many columns of seeded normal weights (30 % zeros, all m): every
  threshold equals the torch oracle bit for bit, and most (>= 90 %) equal
  ``float32(np.quantile)`` exactly, all within the documented tolerance.
  (Deterministic complement of the hypothesis test: rank rounding errors,
  e.g. a float32 rank, only show on some columns.)"""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(40, 12)).astype(np.float32)
  kernel[rng.random(kernel.shape) < 0.3] = 0.0
  dead = np.ones(12, bool)
  exact = total = 0
  for q in [0.05, 1 / 3, 0.5]:
    for _ in range(8):
      k = rng.permutation(kernel.ravel()).reshape(kernel.shape)
      k[:rng.integers(0, 40), rng.integers(0, 12)] = 0  # vary m further
      _, _, thr = strip_kernel(k, dead, np.ones_like(k, bool), stripping_factor=q)
      thr = np.asarray(thr)
      for j in range(12):
        nz = k[:, j][k[:, j] != 0]
        if not nz.size:
          assert np.isnan(thr[j])
          continue
        assert thr[j] == torch_quantile_f32(nz, q), (q, j, nz)
        t_np = np.quantile(nz.astype(np.float64), q)
        assert abs(float(thr[j]) - t_np) <= numpy_tolerance(nz, q, thr[j]) or (
            np.float32(t_np) == thr[j])
        exact += int(np.float32(t_np) == thr[j])
        total += 1
  assert exact / total >= 0.9, (exact, total)


@settings(max_examples=examples(40), **SETTINGS)
@given(case=strip_case(factors=[0.0]))
def test_factor_zero_prunes_nothing(case):
  """``stripping_factor=0``: the threshold is the minimum non-zero weight and
  no weight changes value (strictly below the minimum is empty). Only a kept
  entry that is already exactly +-0.0 may lose its mask bit, when the
  minimum is > 0 (as in the original: every weight below the threshold)."""
  kernel, dead, mask, _ = case
  new_k, new_m, thr = strip_kernel(kernel, dead, mask, stripping_factor=0.0)
  eff = np.where(mask, kernel, np.zeros((), kernel.dtype))
  # No value changes; bit for bit except that a kept -0.0 whose mask bit
  # goes (threshold > 0) comes out as +0.0.
  np.testing.assert_array_equal(np.asarray(new_k).astype(np.float32),
                                eff.astype(np.float32))
  nonzero_in = eff.astype(np.float32) != 0
  assert_bitwise_equal(np.asarray(new_k)[nonzero_in], eff[nonzero_in])
  eff32 = columns(eff).astype(np.float32)
  lost = columns(mask) & ~columns(np.asarray(new_m))
  assert not np.any(lost & (eff32 != 0)), "a non-zero weight was pruned"
  for j in np.flatnonzero(dead):
    nz = eff32[:, j][eff32[:, j] != 0]
    if nz.size:
      assert np.asarray(thr)[j] == nz.min()
      assert not np.any(lost[:, j]) or nz.min() > 0


@st.composite
def param_tree(draw, dtype, dense_shapes=((40, 12), (2, 3))):
  """A params tree with targeted dense/conv kernels and untouched leaves."""
  dense = draw(values_array(draw(st.sampled_from(dense_shapes)), dtype))
  conv = draw(values_array((2, 3, 4, 6), dtype))
  params = {
      "dense": {"kernel": dense,
                "bias": draw(values_array((dense.shape[-1],), dtype))},
      "conv": {"kernel": conv, "bias": draw(values_array((6,), dtype))},
      "head": {"kernel": draw(values_array((5, 3), dtype)),  # not targeted
               "bias": draw(values_array((3,), dtype))},
      "scale": draw(values_array((), np.float32)),
  }
  dead = {
      "dense": {"kernel": draw(hnp.arrays(np.bool_, dense.shape[-1])),
                "bias": None},
      "conv": {"kernel": draw(hnp.arrays(np.bool_, 6)), "bias": None},
      "head": {"kernel": None, "bias": None},
      "scale": None,
  }
  return params, dead


@settings(max_examples=examples(40), **SETTINGS)
@given(dtype=st.sampled_from([np.float32, BF16]), data=st.data())
def test_untouched_leaves_and_live_columns_are_bit_identical(dtype, data):
  """``strip_params`` with no prior masks: live neurons' columns, biases and
  non-targeted leaves are bit-identical to the input; every leaf keeps its
  shape and dtype; dead columns only change entries to +0.0; the masks tree
  has a bool array exactly at the stripped kernels and None elsewhere."""
  params, dead = data.draw(param_tree(dtype))
  q = data.draw(st.sampled_from([0.05, 0.5]))
  new_params, masks = strip_params(params, dead, stripping_factor=q)
  flat_in = jax.tree_util.tree_leaves_with_path(params)
  flat_out = jax.tree_util.tree_leaves_with_path(new_params)
  assert [p for p, _ in flat_in] == [p for p, _ in flat_out]
  for (path, a), (_, b) in zip(flat_in, flat_out):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, path
  for name in ["head", "scale"]:
    for (p, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(params[name]),
        jax.tree_util.tree_leaves_with_path(new_params[name])):
      assert_bitwise_equal(b, a, f"{name}{p}")
  for name in ["dense", "conv"]:
    assert_bitwise_equal(new_params[name]["bias"], params[name]["bias"], name)
    d = dead[name]["kernel"]
    a, b = columns(params[name]["kernel"]), columns(new_params[name]["kernel"])
    assert_bitwise_equal(b[:, ~d], a[:, ~d], f"{name} live columns")
    changed = bits(b) != bits(a)
    assert np.all(bits(b)[changed] == 0), f"{name}: a change that is not +0.0"
    m = np.asarray(masks[name]["kernel"])
    assert m.dtype == np.bool_ and m.shape == params[name]["kernel"].shape
    assert masks[name]["bias"] is None
  assert masks["head"] == {"kernel": None, "bias": None}
  assert masks["scale"] is None


@settings(max_examples=examples(40), **SETTINGS)
@given(case=strip_case(), empty=st.data())
def test_dead_neuron_without_nonzero_weight_is_left_alone(case, empty):
  """A dead neuron whose column is all zero (zeros in the kernel or fully
  masked) keeps its mask, gets a NaN threshold, and no NaN appears in the
  kernel; the other dead neurons are stripped as usual."""
  kernel, dead, mask, q = case
  n = kernel.shape[-1]
  cols = empty.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n))
  kernel, mask, dead = kernel.copy(), mask.copy(), dead.copy()
  for j in cols:
    if empty.draw(st.booleans()):
      kernel[..., j] = 0
    else:
      mask[..., j] = False
    dead[j] = True
  new_k, new_m, thr = strip_kernel(kernel, dead, mask, stripping_factor=q)
  new_k, new_m, thr = np.asarray(new_k), np.asarray(new_m), np.asarray(thr)
  assert not np.any(np.isnan(new_k.astype(np.float32)))
  for j in set(cols):
    assert np.isnan(thr[j])
    np.testing.assert_array_equal(new_m[..., j], mask[..., j])
    assert np.all(new_k[..., j].astype(np.float32) == 0)
  check_strip_kernel(kernel, dead, mask, q)


_STRIP_PARAMS_JIT = jax.jit(strip_params, static_argnames="stripping_factor")


@settings(max_examples=examples(15), **SETTINGS)
@given(data=st.data())
def test_inputs_are_never_modified(data):
  """numpy params, dead, masks and gradients are the same (bits, dtype,
  writeability) after ``strip_params`` (eager and jit), ``strip_event`` and
  a ``with_stripping`` update."""
  params, dead = data.draw(param_tree(np.float32, dense_shapes=((2, 3),)))
  masks = jax.tree_util.tree_map(
      lambda d, p: None if d is None else data.draw(
          hnp.arrays(np.bool_, p.shape)),
      dead, params, is_leaf=lambda x: x is None)
  grads = jax.tree_util.tree_map(lambda p: np.ones_like(p), params)
  inputs = (params, dead, masks, grads)
  before = copy.deepcopy(inputs)

  strip_params(params, dead, masks, stripping_factor=0.5)
  _STRIP_PARAMS_JIT(params, dead, masks, stripping_factor=0.5)
  targets = jax.tree_util.tree_map(lambda d: d is not None, dead,
                                   is_leaf=lambda x: x is None)
  tx = with_stripping(optax.adamw(0.1, weight_decay=0.1), targets)
  state = set_masks(tx.init(params), masks)
  strip_event(params, state, dead, stripping_factor=0.5)
  tx.update(grads, state, params)

  flat_before = jax.tree_util.tree_leaves(before)
  flat_after = jax.tree_util.tree_leaves(inputs)
  assert len(flat_before) == len(flat_after)
  for b, a in zip(flat_before, flat_after):
    assert isinstance(a, np.ndarray) and a.flags.writeable
    assert_bitwise_equal(a, b)


# ----------------------------------------------------------------------------
# The optimizer wrapper: stripped weights stay exactly zero
# ----------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": (lambda: optax.adamw(1e-2, weight_decay=0.1), ("mu", "nu")),
    "sgd_momentum": (lambda: optax.sgd(1e-2, momentum=0.9), ("trace",)),
    "lion": (lambda: optax.lion(1e-3, weight_decay=0.1), ("mu",)),
}
TRAIN_TARGETS = {"fc": {"kernel": True, "bias": False},
                 "conv": {"kernel": True, "bias": False},
                 "head": {"kernel": False, "bias": False}}
HALF_STEPS = 50  # 2 x 50 = 100 steps, with a second stripping in between
TRAIN_SHAPES = {"fc": (12, 8), "conv": (3, 3, 2, 4), "head": (8, 3)}
TRAIN_LAYERS = ("fc", "conv")  # the stripped layers


def train_params(key):
  return small_params(TRAIN_SHAPES, key)


@functools.lru_cache(maxsize=None)
def make_steps(name):
  """``(tx, steps)``: ``steps`` jit-compiles 50 updates with random grads."""
  tx = with_stripping(OPTIMIZERS[name][0](), TRAIN_TARGETS)

  @jax.jit
  def steps(params, state, key, scale):
    treedef = jax.tree_util.tree_structure(params)
    def body(carry, k):
      params, state = carry
      keys = jax.random.split(k, treedef.num_leaves)
      grads = jax.tree_util.tree_map(
          lambda p, kk: scale * jax.random.normal(kk, p.shape), params,
          jax.tree_util.tree_unflatten(treedef, list(keys)))
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      masks = get_masks(state)
      # Largest |w| over the stripped weights after this step (NaN -> inf).
      worst = jnp.max(jnp.stack([
          jnp.max(jnp.where(masks[l]["kernel"], 0.0,
                            jnp.nan_to_num(jnp.abs(params[l]["kernel"]),
                                           nan=jnp.inf)))
          for l in ("fc", "conv")]))
      return (params, state), worst
    (params, state), worst = jax.lax.scan(
        body, (params, state), jax.random.split(key, HALF_STEPS))
    return params, state, worst

  return tx, steps


@pytest.mark.slow
@settings(max_examples=examples(8), **SETTINGS)
@given(name=st.sampled_from(sorted(OPTIMIZERS)),
       q=st.just(0.5),
       seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-3, 1.0, 1e3]),
       p_dead=st.sampled_from([0.0, 0.3, 1.0]))
def test_stripped_weights_stay_exactly_zero_through_training(
    name, q, seed, scale, p_dead):
  """Strip, 50 steps, strip again, 50 steps of ``with_stripping(opt)`` with
  random gradients: after every step every weight outside the mask is
  exactly 0.0 (+0.0, no NaN), masks only shrink, and the inner moments of the
  weights stripped before the first step are exactly 0."""
  key = jax.random.PRNGKey(seed)
  kp, kd1, kd2, kg = jax.random.split(key, 4)
  params = train_params(kp)
  dead_tree = functools.partial(random_dead, params, p_dead,
                                layers=TRAIN_LAYERS)
  tx, steps = make_steps(name)
  state = tx.init(params)
  params, state = strip_event(params, state, dead_tree(kd1), stripping_factor=q)
  masks1 = get_masks(state)
  k1, k2 = jax.random.split(kg)
  params, mid_state, worst1 = steps(params, state, k1, jnp.float32(scale))
  params, state = strip_event(params, mid_state, dead_tree(kd2),
                              stripping_factor=q)
  masks2 = get_masks(state)
  params, state, worst2 = steps(params, state, k2, jnp.float32(scale))
  np.testing.assert_array_equal(np.asarray(worst1), 0.0)
  np.testing.assert_array_equal(np.asarray(worst2), 0.0)
  masks = get_masks(state)
  for layer in ("fc", "conv"):
    m1, m2 = np.asarray(masks1[layer]["kernel"]), np.asarray(masks2[layer]["kernel"])
    assert not np.any(m2 & ~m1)
    np.testing.assert_array_equal(np.asarray(masks[layer]["kernel"]), m2)
    w = np.asarray(params[layer]["kernel"])
    assert np.all(bits(w[~m2]) == 0), "stripped weight is not +0.0"
    assert np.all(np.isfinite(w))
    for field in OPTIMIZERS[name][1]:
      for s in (mid_state, state):
        moment = optax.tree_utils.tree_get(s, field)[layer]["kernel"]
        assert np.all(np.asarray(moment)[~m1] == 0), (field, layer)


# ----------------------------------------------------------------------------
# jit and no-jit agree bit for bit
# ----------------------------------------------------------------------------

_STRIP_EVENT_JIT = jax.jit(strip_event, static_argnames="stripping_factor")


@settings(max_examples=examples(30), **SETTINGS)
@given(data=st.data())
def test_jit_strip_params(data):
  """``strip_params`` (and a second call with masks) under jit: params and
  masks bit-identical to the eager call's."""
  dtype = data.draw(st.sampled_from([np.float32, BF16]))
  params, dead = data.draw(param_tree(dtype, dense_shapes=((2, 3),)))
  q = 0.5
  got_p, got_m = _STRIP_PARAMS_JIT(params, dead, stripping_factor=q)
  ref_p, ref_m = strip_params(params, dead, stripping_factor=q)
  got_p2, got_m2 = _STRIP_PARAMS_JIT(got_p, dead, got_m, stripping_factor=q)
  ref_p2, ref_m2 = strip_params(ref_p, dead, ref_m, stripping_factor=q)
  for a, b in zip(jax.tree_util.tree_leaves((got_p, got_m, got_p2, got_m2)),
                  jax.tree_util.tree_leaves((ref_p, ref_m, ref_p2, ref_m2))):
    assert_bitwise_equal(a, b)


@settings(max_examples=examples(10), **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), q=st.just(0.5))
def test_jit_strip_event(seed, q):
  """``strip_event`` under jit: params and the whole optimizer state
  bit-identical to the eager call's."""
  tx = with_stripping(optax.adamw(1e-2, weight_decay=0.1), TRAIN_TARGETS)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  params = train_params(k1)
  state = tx.init(params)
  dead = random_dead(params, 0.5, k2, TRAIN_LAYERS)
  got = _STRIP_EVENT_JIT(params, state, dead, stripping_factor=q)
  ref = strip_event(params, state, dead, stripping_factor=q)
  chex.assert_trees_all_equal_structs(got, ref)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    assert_bitwise_equal(a, b)


@settings(max_examples=examples(10), **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1))
def test_jit_update_with_fma_free_inner_is_bit_identical(seed):
  """With an inner optimizer whose arithmetic is one operation per element
  (plain SGD: ``-lr * g``), ``with_stripping``'s update under jit is
  bit-identical to the eager one: updates, masks, state. (FMA-heavy
  optimizers are covered by the next test: XLA contracts ``a * b + c`` under
  jit only, so optax itself is not bit-identical across jit for them.)"""
  _check_update(seed, optax.sgd(0.1), exact=True)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_jit_update_masked_entries_bit_identical(name):
  """For adamw / sgd+momentum / lion: masks and the stripped entries of the
  updates (exactly ``-params``) and of the moments are bit-identical under
  jit and eagerly; kept entries agree to float32 rounding (FMA contraction)."""
  for seed in range(3):
    _check_update(seed, OPTIMIZERS[name][0](), exact=False)


def _check_update(seed, inner, *, exact):
  """Three steps of ``with_stripping(inner)``'s update, jitted and eager,
  from masked weights that are not zero yet: compared (bit for bit when
  ``exact``), stripped entries exactly ``-params`` in both."""
  tx = with_stripping(inner, TRAIN_TARGETS)
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = train_params(keys[0])
  state = tx.init(params)
  dead = random_dead(params, 0.5, keys[1], TRAIN_LAYERS)
  params, state = strip_event(params, state, dead, stripping_factor=0.5)
  masks = get_masks(state)
  # Masked weights that are not zero yet: the update must be exactly -p.
  params = jax.tree_util.tree_map(lambda p: p + 1.0, params)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = jax.tree_util.tree_map(
        lambda p: normal(p.shape, [seed, step]), params)
    got_u, got_s = update(grads, state, params)
    ref_u, ref_s = tx.update(grads, state, params)
    if exact:
      for a, b in zip(jax.tree_util.tree_leaves((got_u, got_s)),
                      jax.tree_util.tree_leaves((ref_u, ref_s))):
        assert_bitwise_equal(a, b, f"step {step}")
    else:
      for a, b in zip(jax.tree_util.tree_leaves(got_u),
                      jax.tree_util.tree_leaves(ref_u)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
      for a, b in zip(jax.tree_util.tree_leaves(get_masks(got_s)),
                      jax.tree_util.tree_leaves(get_masks(ref_s))):
        assert_bitwise_equal(a, b)
    for layer in ("fc", "conv"):
      m = np.asarray(masks[layer]["kernel"])
      p = np.asarray(params[layer]["kernel"])
      for u in (got_u, ref_u):
        assert_bitwise_equal(np.asarray(u[layer]["kernel"])[~m], -p[~m])
    params = optax.apply_updates(params, ref_u)
    state = ref_s
    for layer in ("fc", "conv"):
      m = np.asarray(masks[layer]["kernel"])
      assert np.all(np.asarray(params[layer]["kernel"])[~m] == 0)


# ----------------------------------------------------------------------------
# Activation statistics: split invariance
# ----------------------------------------------------------------------------

@st.composite
def activation_case(draw, kind):
  """Activations ``[B, (T,) n]`` and a split of the batch into chunks."""
  b = draw(st.integers(1, 8))
  n = draw(st.sampled_from([1, 8]))
  shape = draw(st.sampled_from([(b, n), (b, 3, 2, n)]))
  if kind == "int":
    x = draw(hnp.arrays(np.float32, shape,
                        elements=st.integers(-5, 5).map(float)))
  else:
    x = draw(values_array(shape))
  if kind in ("relu", "int"):
    x = np.maximum(x, 0)  # ReLU outputs (+0.0 / positive values)
  if draw(st.booleans()):  # some features dead everywhere
    x[..., draw(hnp.arrays(np.bool_, n))] = 0
  cuts = sorted(draw(st.lists(st.integers(0, b), max_size=4)))
  chunks = [x[i:j] for i, j in zip([0] + cuts, cuts + [b])]
  return x, chunks


def accumulate(chunks, order):
  """Merge per-chunk statistics in a given association order."""
  n = chunks[0].shape[-1]
  parts = [acts.batch_stats(c) for c in chunks]
  if order == "update":
    s = acts.init_stats(n)
    for c in chunks:
      s = acts.merge_stats(s, acts.batch_stats(c))
    return s
  if order == "right":
    s = parts[-1]
    for p in reversed(parts[:-1]):
      s = acts.merge_stats(p, s)
    return s
  # pairwise tree reduction
  while len(parts) > 1:
    parts = [acts.merge_stats(*parts[i:i + 2]) if i + 1 < len(parts)
             else parts[i] for i in range(0, len(parts), 2)]
  return parts[0]


@pytest.mark.slow
@settings(max_examples=examples(15), **SETTINGS)
@given(case=activation_case("int"),
       order=st.sampled_from(["update", "right", "tree"]))
def test_batch_stats_split_invariant_exact_for_integers(case, order):
  """Integer-valued activations: merging the statistics of any split of the
  batch (empty chunks included, any association order) equals the
  statistics of the whole batch exactly; so does summing per-example
  statistics, and ``where`` equals dropping the rows."""
  x, chunks = case
  whole = acts.batch_stats(x)
  merged = accumulate(chunks, order)
  for a, b in zip(whole, merged):
    assert_bitwise_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(whole, acts.reduce_examples(acts.example_stats(x))):
    assert_bitwise_equal(np.asarray(a), np.asarray(b))
  keep = np.arange(x.shape[0]) % 2 == 0
  for a, b in zip(acts.batch_stats(x, where=keep), acts.batch_stats(x[keep])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(acts.dead_mask(whole), acts.dead_mask(merged))
  np.testing.assert_array_equal(
      acts.dead_mask(whole), np.all(x.reshape(-1, x.shape[-1]) == 0, axis=0))


@pytest.mark.slow
@settings(max_examples=examples(15), **SETTINGS)
@given(case=activation_case("float"),
       order=st.sampled_from(["update", "right", "tree"]))
def test_batch_stats_split_invariant_floats(case, order):
  """Float activations (signed, zeros, ties): split statistics agree with the
  whole batch up to float32 summation order (``allclose`` with a tolerance
  scaled by the sum of magnitudes); count and non-finite counts exactly."""
  x, chunks = case
  whole, merged = acts.batch_stats(x), accumulate(chunks, order)
  scale = np.sum(np.abs(x.reshape(-1, x.shape[-1]).astype(np.float64)), axis=0)
  for field in ("total", "abs_total"):
    np.testing.assert_allclose(getattr(whole, field), getattr(merged, field),
                               rtol=0, atol=1e-5 * scale.max() + 1e-30)
  np.testing.assert_array_equal(whole.nonfinite, merged.nonfinite)
  np.testing.assert_array_equal(whole.count, merged.count)
  assert float(whole.count) == x.size // x.shape[-1]


@settings(max_examples=examples(15), **SETTINGS)
@given(case=activation_case("relu"),
       order=st.sampled_from(["update", "right", "tree"]),
       nonfinite=st.booleans())
def test_dead_mask_invariant_to_probe_split_relu(case, order, nonfinite):
  """ReLU outputs: ``dead_mask`` is the same however the probe set is split
  into batches, and equals "all outputs are exactly 0". A neuron with a NaN
  or inf output is never dead, in every split."""
  x, chunks = case
  if nonfinite:
    x = x.copy()
    x.reshape(-1, x.shape[-1])[0, 0] = np.nan
    chunks = [x[i:i + 1] for i in range(x.shape[0])]
  whole, merged = acts.batch_stats(x), accumulate(chunks, order)
  flat = x.reshape(-1, x.shape[-1])
  expected = np.all(flat == 0, axis=0)
  np.testing.assert_array_equal(acts.dead_mask(whole), expected)
  np.testing.assert_array_equal(acts.dead_mask(merged), expected)
  np.testing.assert_array_equal(acts.nonfinite_neurons(merged),
                                ~np.all(np.isfinite(flat), axis=0))
  tree = {"a": whole, "b": {"c": merged}}
  got = jax.tree.map(acts.dead_mask, tree,
                     is_leaf=lambda x: isinstance(x, acts.ActivationStats))
  np.testing.assert_array_equal(got["a"], got["b"]["c"])
