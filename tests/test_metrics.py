"""Tests of `synstrip_jax.metrics`: dead counts, active parameters, sparsity.

* ``active_params`` reproduces the original's ``count_active_parameters`` on
  the fixtures (2366 with masks, 2400 without), per layer and in total.
* ``dead_counts``, ``sparsity``, ``active_params`` and ``summary`` on small
  hand-made trees (None leaves skipped, biases never counted, dtypes).
* every function gives the same result under ``jax.jit`` (same keys, values
  and dtypes).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _shared import load_fixtures
from conftest import normal

from synstrip_jax.metrics import active_params, dead_counts, sparsity, summary
from synstrip_jax.transform import get_masks, strip_event, with_stripping


def fixture_trees():
  """The fixtures' Sequential(Linear(64,32), ReLU, Linear(32,16), ReLU) in
  Flax layout: kernels [in, out] (PyTorch masks transposed), plus biases."""
  fx = load_fixtures()
  params = {
      "fc1": {"kernel": jnp.zeros((64, 32), jnp.float32),
              "bias": jnp.zeros((32,), jnp.float32)},
      "fc2": {"kernel": jnp.asarray(fx["active__fc2_weight0"].T),
              "bias": jnp.zeros((16,), jnp.float32)},
  }
  dead = {"fc1": {"kernel": jnp.asarray(fx["active__dead_fc1"]), "bias": None},
          "fc2": {"kernel": jnp.asarray(fx["active__dead_fc2"]), "bias": None}}
  masks = {"fc1": {"kernel": jnp.asarray(fx["active__fc1_mask"].T),
                   "bias": None},
           "fc2": {"kernel": jnp.asarray(fx["active__fc2_mask"].T),
                   "bias": None}}
  return fx, params, dead, masks


# Hand-made example: two kernels (one Conv-like, rank 4) and a head.
def hand_params():
  return {
      "conv": {"kernel": jnp.ones((2, 2, 1, 3)), "bias": jnp.ones((3,))},
      "fc": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((5,))},
      "head": {"kernel": jnp.ones((5, 2)), "bias": jnp.ones((2,))},
  }


def hand_dead():
  return {
      "conv": {"kernel": jnp.array([True, False, True]), "bias": None},
      "fc": {"kernel": jnp.array([False, False, False, False, True]),
             "bias": None},
      "head": {"kernel": None, "bias": None},
  }


def hand_masks():
  conv = np.ones((2, 2, 1, 3), bool)
  conv[0, 0, 0, 0] = False      # in a dead neuron's column
  conv[1, 1, 0, 1] = False      # in a live column
  fc = np.ones((4, 5), bool)
  fc[:, 4] = [False, False, True, False]  # dead neuron 4: 3 of 4 pruned
  fc[2, 0] = False
  return {"conv": {"kernel": jnp.asarray(conv), "bias": None},
          "fc": {"kernel": jnp.asarray(fc), "bias": None},
          "head": {"kernel": None, "bias": None}}



def test_matches_original_count():
  """The original's active-parameter count: kept by the mask and not in a
  dead neuron, weights only: 2366; per layer as counted in numpy."""
  fx, params, dead, masks = fixture_trees()
  out = active_params(params, dead, masks)
  chex.assert_trees_all_equal(jax.jit(active_params)(params, dead, masks),
                              out, strict=True)
  assert set(out) == {"fc1/kernel", "fc2/kernel", "total"}
  assert int(out["total"]) == int(fx["active__count"])
  assert int(out["total"]) == 2366
  for name in ("fc1", "fc2"):
    m = fx[f"active__{name}_mask"]          # [out, in]
    d = fx[f"active__dead_{name}"]          # [out]
    assert int(out[f"{name}/kernel"]) == int(np.sum(m & ~d[:, None])), name
  assert out["total"].dtype == jnp.int32


def test_matches_original_count_without_masks():
  """Same count without stripping (masks ignored): 2400."""
  fx, params, dead, _ = fixture_trees()
  out = active_params(params, dead)
  chex.assert_trees_all_equal(jax.jit(active_params)(params, dead), out,
                              strict=True)
  assert int(out["total"]) == int(fx["active__count_without_masks"])
  assert int(out["total"]) == 2400
  # dead rows: fc1 3, 7 (64 weights each), fc2 0 (32 weights).
  assert int(out["fc1/kernel"]) == 64 * 30
  assert int(out["fc2/kernel"]) == 32 * 15


def test_summary_on_fixture():
  fx, params, dead, masks = fixture_trees()
  out = jax.jit(summary)(params, dead, masks)
  assert int(out["active_params"]) == 2366
  assert int(out["dead_neurons"]) == 3
  pruned = (~fx["active__fc1_mask"]).sum() + (~fx["active__fc2_mask"]).sum()
  np.testing.assert_allclose(float(out["sparsity"]),
                             pruned / (64 * 32 + 32 * 16), rtol=1e-6)


def test_with_masks_from_the_optimizer_state():
  """The masks read from a with_stripping state after a strip_event feed
  active_params directly."""
  _, params, dead, _ = fixture_trees()
  params["fc1"]["kernel"] = normal((64, 32))
  targets = {"fc1": {"kernel": True, "bias": False},
             "fc2": {"kernel": True, "bias": False}}
  opt = with_stripping(optax.sgd(0.1), targets)
  params, state = strip_event(params, opt.init(params), dead,
                              stripping_factor=0.5)
  masks = get_masks(state)
  out = active_params(params, dead, masks)
  expected = sum(int(np.sum(np.asarray(masks[k]["kernel"]) &
                            ~np.asarray(dead[k]["kernel"])[None, :]))
                 for k in ("fc1", "fc2"))
  assert int(out["total"]) == expected
  # Stripping only prunes dead neurons' weights, which are not counted
  # anyway: the count equals the one without masks.
  assert int(out["total"]) == int(active_params(params, dead)["total"])



def test_dead_counts():
  out = dead_counts(hand_dead())
  assert set(out) == {"conv/kernel", "fc/kernel"}
  assert int(out["conv/kernel"]) == 2
  assert int(out["fc/kernel"]) == 1
  assert out["conv/kernel"].dtype == jnp.int32
  none_dead = jax.tree_util.tree_map(
      lambda d: None if d is None else jnp.zeros_like(d), hand_dead(),
      is_leaf=lambda v: v is None)
  assert int(dead_counts(none_dead)["fc/kernel"]) == 0


def test_sparsity():
  out = sparsity(hand_masks())
  assert set(out) == {"conv/kernel", "fc/kernel", "total"}
  np.testing.assert_allclose(out["conv/kernel"], 2 / 12, rtol=1e-6)
  np.testing.assert_allclose(out["fc/kernel"], 4 / 20, rtol=1e-6)
  np.testing.assert_allclose(out["total"], 6 / 32, rtol=1e-6)
  assert out["total"].dtype == jnp.float32


def test_sparsity_edge_cases():
  only_none = {"a": {"kernel": None, "bias": None}}
  out = sparsity(only_none)
  assert set(out) == {"total"}
  assert float(out["total"]) == 0.0
  full = {"a": {"kernel": jnp.ones((3, 4), bool)},
          "b": {"kernel": jnp.zeros((2, 2), bool)}}
  out = jax.jit(sparsity)(full)
  assert float(out["a/kernel"]) == 0.0
  assert float(out["b/kernel"]) == 1.0
  np.testing.assert_allclose(out["total"], 4 / 16, rtol=1e-6)


def test_active_params():
  """Weights kept by the mask and not feeding a dead neuron, per targeted
  kernel (a kernel is counted when it has a dead or mask entry); biases and
  the head never count."""
  params, dead, masks = hand_params(), hand_dead(), hand_masks()
  fn = active_params
  both = fn(params, dead, masks)
  assert set(both) == {"conv/kernel", "fc/kernel", "total"}
  # conv: 4 fan-in x 3 neurons; neurons 0, 2 dead -> column 1 only (4),
  # minus the pruned [1,1,0,1] -> 3.
  assert int(both["conv/kernel"]) == 3
  # fc: neurons 0-3 live (16 weights), minus pruned [2, 0] -> 15.
  assert int(both["fc/kernel"]) == 15
  assert int(both["total"]) == 18
  assert both["total"].dtype == jnp.int32

  dead_only = fn(params, dead)
  assert int(dead_only["conv/kernel"]) == 4
  assert int(dead_only["fc/kernel"]) == 16
  assert int(dead_only["total"]) == 20

  masks_only = fn(params, None, masks)
  assert int(masks_only["conv/kernel"]) == 10
  assert int(masks_only["fc/kernel"]) == 16
  assert int(masks_only["total"]) == 26

  nothing = fn(params)
  assert set(nothing) == {"total"}
  assert int(nothing["total"]) == 0


def test_misaligned_trees_are_refused():
  params = hand_params()
  bad_dead = {"conv": {"kernel": None, "bias": None}}
  with pytest.raises(ValueError, match="fc/kernel"):
    active_params(params, bad_dead)
  bad_masks = dict(hand_masks(), extra={"kernel": jnp.ones((2, 2), bool)})
  with pytest.raises(ValueError, match="extra/kernel"):
    active_params(params, hand_dead(), bad_masks)


def test_summary_keys_and_values():
  params, dead, masks = hand_params(), hand_dead(), hand_masks()
  out = summary(params, dead, masks)
  assert set(out) == {
      "dead_neurons", "active_params", "sparsity",
      "dead/conv/kernel", "dead/fc/kernel",
      "active/conv/kernel", "active/fc/kernel",
      "sparsity/conv/kernel", "sparsity/fc/kernel"}
  for v in out.values():
    assert jnp.shape(v) == ()
  assert int(out["dead_neurons"]) == 3
  assert int(out["active_params"]) == 18
  np.testing.assert_allclose(out["sparsity"], 6 / 32, rtol=1e-6)
  assert int(out["dead/conv/kernel"]) == 2
  assert int(out["active/fc/kernel"]) == 15
  np.testing.assert_allclose(out["sparsity/fc/kernel"], 4 / 20, rtol=1e-6)


def test_summary_without_masks():
  params, dead = hand_params(), hand_dead()
  out = summary(params, dead, None)
  assert set(out) == {
      "dead_neurons", "active_params", "sparsity",
      "dead/conv/kernel", "dead/fc/kernel",
      "active/conv/kernel", "active/fc/kernel"}
  assert float(out["sparsity"]) == 0.0
  assert int(out["active_params"]) == 20


def test_jit_matches_eager():
  """The metrics run the same code under jit: equal keys, values and dtypes
  on the hand-made trees (with and without masks; the fixture tests check
  the fixture's trees)."""
  params, dead, masks = hand_params(), hand_dead(), hand_masks()
  for fn, args in ((active_params, (params, dead, masks)),
                   (active_params, (params, dead)),
                   (active_params, (params, None, masks)),
                   (sparsity, (masks,)), (dead_counts, (dead,)),
                   (summary, (params, dead, masks)),
                   (summary, (params, dead, None))):
    chex.assert_trees_all_equal(jax.jit(fn)(*args), fn(*args), strict=True)
