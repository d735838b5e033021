"""Input validation and edge-case policies of the library (issue 11, items 6, 7, 10).

* ``set_masks`` refuses masks that are not bool arrays of the kernel's shape,
  naming the path, the shape/dtype found and the one expected.
* ``summary`` / ``active_params`` / ``dead_counts`` / ``sparsity`` refuse dead
  vectors that are not bool ``[n]`` and non-bool masks, naming the path.
* Empty kernels (``[0, n]``, ``[f, 0]``) are a no-op for stripping and count
  as nothing in the metrics.
* Concrete 0-d arrays (jax or numpy) are accepted as a stripping factor; a
  traced one gives a clear error.
* ``None`` leaves in params are non-targets.
* NaN weights in a dead neuron's column (item 7): eager calls raise naming the
  kernel path and the neuron; under ``jit`` the neuron is skipped.
* Subnormal weights (item 10): the README's statement is checked against a
  numpy reference of the original's quantile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import normal

from synstrip_jax.metrics import active_params, dead_counts, sparsity, summary
from synstrip_jax.stripping import (strip_kernel, strip_params,
                                    validate_stripping_factor)
from synstrip_jax.transform import (get_masks, set_masks, strip_event,
                                    with_stripping)


def _dense(fan_in: int = 32, n: int = 16):
  params = {"d": {"kernel": jnp.ones((fan_in, n)), "bias": jnp.zeros(n)}}
  targets = {"d": {"kernel": True, "bias": False}}
  return params, targets


def _opt_state(params, targets):
  return with_stripping(optax.sgd(0.1), targets).init(params)


# ---------------------------------------------------------------- set_masks

def test_set_masks_refuses_float_mask():
  params, targets = _dense()
  state = _opt_state(params, targets)
  with pytest.raises(TypeError, match=r"masks\[d/kernel\].*bool.*float32\[32,16\]"):
    set_masks(state, {"d": {"kernel": jnp.ones((32, 16)), "bias": None}})


def test_set_masks_refuses_wrong_shape_mask():
  params, targets = _dense()
  state = _opt_state(params, targets)
  with pytest.raises(ValueError, match=r"masks\[d/kernel\].*\(16,\).*\(32, 16\)"):
    set_masks(state, {"d": {"kernel": jnp.ones((16,), bool), "bias": None}})


def test_set_masks_refuses_changed_targets():
  params, targets = _dense()
  state = _opt_state(params, targets)
  with pytest.raises(ValueError, match=r"masks\[d/bias\]"):
    set_masks(state, {"d": {"kernel": jnp.ones((32, 16), bool),
                            "bias": jnp.ones((16,), bool)}})
  with pytest.raises(ValueError, match=r"masks\[d/kernel\]"):
    set_masks(state, {"d": {"kernel": None, "bias": None}})


def test_set_masks_accepts_valid_masks_and_under_jit():
  params, targets = _dense()
  state = _opt_state(params, targets)
  new = {"d": {"kernel": jnp.zeros((32, 16), bool), "bias": None}}
  out = jax.jit(set_masks)(state, new)
  np.testing.assert_array_equal(get_masks(out)["d"]["kernel"], False)


# ------------------------------------------------------------------ metrics

def test_active_params_and_summary_refuse_int_dead():
  params, _ = _dense()
  dead = {"d": {"kernel": jnp.zeros(16, jnp.int32).at[0].set(2), "bias": None}}
  for fn in (lambda: active_params(params, dead),
             lambda: summary(params, dead, None),
             lambda: dead_counts(dead)):
    with pytest.raises(TypeError, match=r"dead\[d/kernel\].*bool.*int32"):
      fn()


def test_active_params_refuses_broadcast_dead():
  params, _ = _dense()
  dead = {"d": {"kernel": jnp.ones(1, bool), "bias": None}}
  with pytest.raises(ValueError, match=r"dead\[d/kernel\].*\(1,\).*16"):
    active_params(params, dead)


def test_summary_wrong_length_dead_names_path():
  params, _ = _dense()
  dead = {"d": {"kernel": jnp.ones(3, bool), "bias": None}}
  with pytest.raises(ValueError, match=r"dead\[d/kernel\].*\(3,\).*16"):
    summary(params, dead, None)


def test_metrics_refuse_non_bool_or_misshaped_masks():
  params, _ = _dense()
  float_masks = {"d": {"kernel": jnp.ones((32, 16)), "bias": None}}
  with pytest.raises(TypeError, match=r"masks\[d/kernel\].*float32"):
    active_params(params, None, float_masks)
  with pytest.raises(TypeError, match=r"masks\[d/kernel\].*float32"):
    sparsity(float_masks)
  with pytest.raises(ValueError, match=r"masks\[d/kernel\].*\(16,\)"):
    summary(params, None, {"d": {"kernel": jnp.ones((16,), bool), "bias": None}})


# ------------------------------------------------------------ empty kernels

@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (2, 0, 3)])
def test_strip_kernel_empty_kernel_is_noop(shape):
  kernel = jnp.zeros(shape)
  n = shape[-1]
  mask = jnp.ones(shape, bool)
  new_k, new_m, thr = strip_kernel(kernel, jnp.ones(n, bool), mask,
                                   stripping_factor=0.5)
  assert new_k.shape == shape and new_m.shape == shape and thr.shape == (n,)
  assert thr.dtype == jnp.float32 and bool(jnp.all(jnp.isnan(thr)))


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_strip_params_and_metrics_empty_kernel_is_noop(shape):
  params = {"e": jnp.zeros(shape), "k": jnp.arange(1.0, 9.0).reshape(4, 2)}
  dead = {"e": jnp.ones(shape[-1], bool), "k": jnp.array([True, False])}
  masks = {"e": jnp.ones(shape, bool), "k": jnp.ones((4, 2), bool)}
  for fn in (strip_params, jax.jit(strip_params)):
    new_p, new_m = fn(params, dead, masks)
    assert new_p["e"].shape == shape
    assert new_m["e"].shape == shape and new_m["e"].dtype == jnp.bool_
    # The non-empty kernel is still stripped (q=0.05 of [1,3,5,7]: 1 pruned).
    np.testing.assert_array_equal(new_m["k"][:, 0], [False, True, True, True])
  s = summary(params, dead, masks)
  assert float(s["sparsity/e"]) == 0.0 and int(s["active/e"]) == 0
  assert float(s["sparsity"]) == 0.0
  assert float(sparsity({"e": jnp.ones(shape, bool)})["total"]) == 0.0


# --------------------------------------------------------- stripping factor

@pytest.mark.parametrize("q", [jnp.float32(0.05), jnp.asarray(0.05),
                               np.float32(0.05), np.asarray(0.05),
                               jnp.asarray(1, jnp.int32)])
def test_concrete_0d_stripping_factor_accepted(q):
  assert validate_stripping_factor(q) == float(q)
  k = normal((20, 3))
  dead, mask = jnp.array([True, False, True]), jnp.ones((20, 3), bool)
  got = strip_kernel(k, dead, mask, stripping_factor=q)
  want = strip_kernel(k, dead, mask, stripping_factor=float(q))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  p, m = strip_params({"k": k}, {"k": dead}, stripping_factor=q)
  np.testing.assert_array_equal(m["k"], want[1])


@pytest.mark.parametrize("q", [np.asarray([0.05]), jnp.ones((1,)) * 0.05,
                               jnp.asarray(True), np.complex64(0.05),
                               jnp.asarray(1.5), "0.05"])
def test_bad_stripping_factor_refused(q):
  with pytest.raises(ValueError, match="stripping_factor"):
    validate_stripping_factor(q)
  with pytest.raises(ValueError, match="stripping_factor"):
    strip_kernel(jnp.ones((4, 2)), jnp.ones(2, bool), jnp.ones((4, 2), bool),
                 stripping_factor=q)


def test_traced_stripping_factor_clear_error():
  params, _ = _dense()
  dead = {"d": {"kernel": jnp.ones(16, bool), "bias": None}}
  fn = jax.jit(lambda q: strip_params(params, dead, stripping_factor=q))
  with pytest.raises(TypeError, match="static"):
    fn(0.05)


def test_strip_kernel_validates_dead_and_mask():
  k = jnp.ones((4, 2))
  with pytest.raises(ValueError, match=r"dead.*\(3,\).*2"):
    strip_kernel(k, jnp.ones(3, bool), jnp.ones((4, 2), bool))
  with pytest.raises(TypeError, match=r"dead.*bool.*int32"):
    strip_kernel(k, jnp.ones(2, jnp.int32), jnp.ones((4, 2), bool))
  with pytest.raises(TypeError, match=r"mask.*bool.*float32"):
    strip_kernel(k, jnp.ones(2, bool), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r"mask.*\(2,\).*\(4, 2\)"):
    strip_kernel(k, jnp.ones(2, bool), jnp.ones((2,), bool))


# ----------------------------------------------------------- None in params

def test_none_param_leaves_are_non_targets():
  params = {"d": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": None}}
  dead = {"d": {"kernel": jnp.array([True, False]), "bias": None}}
  new_p, new_m = strip_params(params, dead)
  assert new_p["d"]["bias"] is None and new_m["d"]["bias"] is None
  np.testing.assert_array_equal(new_m["d"]["kernel"][:, 0],
                                [False, True, True, True])
  s = summary(params, dead, new_m)
  assert int(s["active_params"]) == 4
  # Through the optimizer wrapper too.
  tx = with_stripping(optax.sgd(0.1), {"d": {"kernel": True, "bias": None}})
  state = tx.init(params)
  new_p, state = strip_event(params, state, dead)
  np.testing.assert_array_equal(get_masks(state)["d"]["kernel"],
                                new_m["d"]["kernel"])


def test_dead_entry_at_none_param_leaf_names_path():
  params = {"d": {"kernel": jnp.ones((4, 2)), "bias": None}}
  dead = {"d": {"kernel": None, "bias": jnp.ones(2, bool)}}
  with pytest.raises(ValueError, match=r"dead\[d/bias\].*params\[d/bias\] is None"):
    strip_params(params, dead)


# ------------------------------------------------------ NaN policy (item 7)

def _nan_case():
  k = normal((24, 4), 1)
  k = k.at[3, 1].set(jnp.nan).at[5, 2].set(jnp.nan)  # 2: live, 1: dead
  dead = jnp.array([True, True, False, True])
  return k, dead, jnp.ones(k.shape, bool)


def test_nan_weight_in_dead_column_eager_raises():
  k, dead, mask = _nan_case()
  with pytest.raises(ValueError, match=r"NaN.*neuron.*\[1\]"):
    strip_kernel(k, dead, mask, stripping_factor=0.2)
  with pytest.raises(ValueError, match=r"NaN.*params\[fc/kernel\] neuron\(s\) \[1\]"):
    strip_params({"fc": {"kernel": k}}, {"fc": {"kernel": dead}},
                 stripping_factor=0.2)


def _reference_prune(col: np.ndarray, q: float) -> np.ndarray:
  """The original's rule in numpy: quantile of the non-zero weights (linear
  interpolation, float32), prune those strictly below it."""
  col = np.asarray(col, np.float32)
  nz = col[col != 0]
  if nz.size == 0:
    return np.zeros(col.shape, bool)
  t = np.float32(np.quantile(nz, q))
  with np.errstate(invalid="ignore"):
    return col < t


def test_nan_weight_in_dead_column_jit_skips_neuron():
  k, dead, mask = _nan_case()
  new_k, new_m, thr = jax.jit(strip_kernel, static_argnames="stripping_factor")(
      k, dead, mask, stripping_factor=0.2)
  # The neuron with a NaN keeps everything (as the original, whose quantile is
  # NaN there); the others are stripped exactly as without the NaN.
  np.testing.assert_array_equal(new_m[:, 1], True)
  assert np.isnan(thr[1])
  np.testing.assert_array_equal(np.asarray(new_k[:, 1]), np.asarray(k[:, 1]))
  clean = k.at[3, 1].set(1.0).at[5, 2].set(1.0)
  _, ref_m, ref_thr = strip_kernel(clean, dead.at[1].set(False), mask,
                                   stripping_factor=0.2)
  np.testing.assert_array_equal(new_m, ref_m)
  np.testing.assert_array_equal(thr, ref_thr)
  for j in range(4):
    if dead[j]:
      np.testing.assert_array_equal(~np.asarray(new_m[:, j]),
                                    _reference_prune(np.asarray(k[:, j]), 0.2))
  # Through jitted strip_params and strip_event as well.
  p, m = jax.jit(strip_params, static_argnames="stripping_factor")(
      {"k": k}, {"k": dead}, stripping_factor=0.2)
  np.testing.assert_array_equal(m["k"], new_m)


def test_nan_weight_masked_out_or_in_live_neuron_is_ignored():
  k, dead, mask = _nan_case()
  mask = mask.at[3, 1].set(False)  # the dead neuron's NaN is already pruned
  new_k, new_m, _ = strip_kernel(k, dead, mask, stripping_factor=0.2)
  assert not bool(jnp.any(jnp.isnan(new_k[:, 1])))
  assert bool(jnp.isnan(new_k[5, 2]))  # live neuron: untouched
  assert int(jnp.sum(~new_m[:, 1])) > 1


# ------------------------------------------------- subnormals (item 10)

def test_subnormal_weights_count_as_zero_as_documented():
  """README: subnormal weights count as zero (XLA flushes them), which can
  change which normal weights are pruned. Checked against the numpy
  reference of the original's rule."""
  rng = np.random.default_rng(0)
  col = rng.standard_normal(20).astype(np.float32)
  tiny = np.float32(1e-40)
  col[[1, 3, 5, 7, 9, 11]] = [tiny, -tiny, 2 * tiny, -3 * tiny, tiny, tiny]
  _, m, _ = strip_kernel(jnp.asarray(col[:, None]), jnp.array([True]),
                         jnp.ones((20, 1), bool), stripping_factor=0.2)
  pruned = ~np.asarray(m[:, 0])
  flushed = np.where(np.abs(col) < np.finfo(np.float32).tiny, 0, col)
  np.testing.assert_array_equal(pruned, _reference_prune(flushed, 0.2))
  # ... and that is a deviation from the original on this column.
  assert pruned.sum() != _reference_prune(col, 0.2).sum()
