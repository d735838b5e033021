"""Dead-neuron statistics and masks; Flax wiring (Linen and NNX)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import linen_variables, nnx_model, normal

import synstrip_jax as ss
from synstrip_jax import activations as acts, linen as ss_linen, probe
from synstrip_jax import nnx as ss_nnx


def test_detection_matches_original(reference):
  act = reference["detect__act"]
  stats = ss.init_stats(act.shape[-1])
  for b in range(2):  # two probe batches of 8, as the original's hooks saw them
    stats = ss.merge_stats(stats,
                           ss.batch_stats(jnp.asarray(act[8 * b: 8 * (b + 1)])))
  np.testing.assert_array_equal(ss.dead_mask(stats), reference["detect__dead"])
  # Feature 13 holds a single 1e-30: alive (exact rule, not a tolerance).
  assert not bool(ss.dead_mask(stats)[13])
  assert set(np.flatnonzero(reference["detect__dead"])) == {2, 7, 19}


def test_batch_stats_reduces_every_axis_but_last():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5) - 50
  s = ss.batch_stats(x)
  np.testing.assert_allclose(s.total, x.reshape(-1, 5).sum(0))
  np.testing.assert_allclose(s.abs_total, jnp.abs(x).reshape(-1, 5).sum(0))
  assert float(s.count) == 24 and s.total.shape == (5,)
  assert ss.batch_stats(jnp.ones(5)).count == 1


def test_where_drops_padding_examples():
  x = jnp.zeros((4, 3, 2)).at[3].set(1.0)  # example 3 is padding
  s = ss.batch_stats(x, where=jnp.array([True, True, True, False]))
  assert bool(jnp.all(ss.dead_mask(s))) and float(s.count) == 9
  with pytest.raises(ValueError, match="one flag per example"):
    ss.batch_stats(x, where=jnp.ones(3, bool))


def test_bf16_activations_accumulate_in_f32():
  x = jnp.full((1000, 2), 1.0, jnp.bfloat16)
  s = ss.batch_stats(x)
  assert s.total.dtype == jnp.float32 and float(s.total[0]) == 1000.0


def test_nonfinite_are_reported_not_counted_alive():
  x = jnp.zeros((4, 3)).at[0, 1].set(jnp.nan).at[2, 2].set(jnp.inf)
  s = ss.batch_stats(x)
  np.testing.assert_array_equal(acts.nonfinite_neurons(s), [False, True, True])
  np.testing.assert_array_equal(ss.dead_mask(s), [True, False, False])
  params = {name: {"kernel": jnp.ones((2, 3))} for name in ("a", "b")}
  bad = {"a": {"post_act": s}, "b": {"post_act": ss.batch_stats(jnp.ones((2, 3)))}}
  with pytest.raises(ValueError, match=r"a/post_act.*2 neurons"):
    ss.dead_tree(params, bad)
  # Under jit the check cannot raise: non-finite neurons are never dead.
  traced = jax.jit(ss.dead_tree)(params, bad)
  np.testing.assert_array_equal(traced["a"]["kernel"], [True, False, False])
  ok = ss.dead_tree(params, {"a": {"post_act": ss.batch_stats(jnp.zeros((2, 3)))},
                             "b": {"post_act": ss.batch_stats(jnp.ones((2, 3)))}})
  assert bool(jnp.all(ok["a"]["kernel"])) and not bool(jnp.any(ok["b"]["kernel"]))


def test_dormancy_threshold_redo():
  x = jnp.stack([jnp.full(10, 1.0), jnp.full(10, 0.05), jnp.zeros(10)], -1)
  s = ss.batch_stats(x)
  # mean |a| = [1, .05, 0]; layer mean .35; scores [2.86, .143, 0]
  np.testing.assert_allclose(acts.dormancy_score(s), [1 / 0.35, 0.05 / 0.35, 0], rtol=1e-6)
  np.testing.assert_array_equal(ss.dead_mask(s, tau=0.0), [False, False, True])
  np.testing.assert_array_equal(ss.dead_mask(s, tau=0.2), [False, True, True])
  np.testing.assert_array_equal(ss.dead_mask(s), [False, False, True])


def test_merge_is_split_invariant_and_jittable():
  x = jax.nn.relu(normal((32, 7, 16)) - 1.5)
  whole = ss.batch_stats(x)
  parts = ss.init_stats(16)
  step = jax.jit(lambda s, x: ss.merge_stats(s, ss.batch_stats(x)))
  for i in range(0, 32, 5):
    parts = step(parts, x[i:i + 5])
  np.testing.assert_allclose(parts.total, whole.total, rtol=1e-6)
  np.testing.assert_array_equal(ss.dead_mask(parts), ss.dead_mask(whole))
  assert float(parts.count) == float(whole.count)


# --------------------------------------------------------------- flax wiring

class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = ss_linen.ActDense(16, name="fc1")(x)
    x = ss_linen.ActDense(8, name="fc2")(x)
    return nn.Dense(3, name="head")(x)


def test_linen_dead_tree_aligned_with_kernels():
  model = _LinenMLP()
  x = normal((6, 5))
  params = linen_variables(model, 1, x)["params"]
  params["fc1"]["bias"] = params["fc1"]["bias"].at[3].set(-1e3)  # kill neuron 3
  _, state = model.apply({"params": params}, x, mutable=[ss_linen.ACTIVATIONS])
  stats = probe.reduce_stats_tree(ss_linen.linen_stats(state))
  dead = probe.dead_tree(params, stats)
  assert dead["head"]["kernel"] is None and dead["fc1"]["bias"] is None
  assert dead["fc1"]["kernel"].shape == (16,) and dead["fc2"]["kernel"].shape == (8,)
  assert bool(dead["fc1"]["kernel"][3])
  targets = probe.target_tree(params, stats)
  assert targets == {"fc1": {"kernel": True, "bias": False},
                     "fc2": {"kernel": True, "bias": False},
                     "head": {"kernel": False, "bias": False}}
  new_params, masks = ss.strip_params(params, dead, stripping_factor=0.1)
  assert not bool(jnp.all(masks["fc1"]["kernel"][:, 3]))


def test_linen_layer_called_twice_accumulates():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = ss_linen.ActDense(4, name="shared")
      return layer(x) + layer(x)

  x = jnp.ones((2, 4))
  v = linen_variables(Twice(), 0, x)
  _, state = Twice().apply({"params": v["params"]}, x, mutable=[ss_linen.ACTIVATIONS])
  s = probe.reduce_stats_tree(ss_linen.linen_stats(state))["shared"]["post_act"]
  assert float(s.count) == 4.0


def test_dead_tree_mismatch_names_the_path():
  model = _LinenMLP()
  x = jnp.ones((2, 5))
  params = linen_variables(model, 1, x)["params"]
  _, state = model.apply({"params": params}, x, mutable=[ss_linen.ACTIVATIONS])
  stats = probe.reduce_stats_tree(ss_linen.linen_stats(state))
  renamed = {"fc1": params["fc1"], "fc2_renamed": params["fc2"], "head": params["head"]}
  with pytest.raises(ValueError, match=r"\['fc2'\].*no kernel"):
    probe.dead_tree(renamed, stats)
  wrong = dict(params, fc2={"kernel": jnp.ones((16, 9)), "bias": jnp.ones(9)})
  with pytest.raises(ValueError, match=r"fc2/post_act.*\(8,\).*fc2/kernel.*9"):
    probe.dead_tree(wrong, stats)
  per_example = ss_linen.linen_stats(state)
  with pytest.raises(ValueError, match="reduce"):
    probe.dead_tree(params, per_example)
  with pytest.raises(ValueError, match="mutable"):
    ss_linen.linen_stats({"params": params})


class _NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = ss_nnx.ActLinear(5, 16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.fc1(x))


def test_nnx_dead_tree_aligned_with_kernels():
  model = nnx_model(lambda: _NNXMLP(nnx.Rngs(0)), 0)
  model.fc1.bias.value = model.fc1.bias.value.at[2].set(-1e3)
  x = normal((6, 5))
  _, inter = nnx.capture(model, nnx.Intermediate)(x)
  params = nnx.state(model, nnx.Param)
  stats = probe.reduce_stats_tree(inter)
  # The dead tree mirrors the params passed: a State (of plain arrays, None
  # where nothing is probed) here...
  dead = probe.dead_tree(params, stats)
  assert isinstance(dead, nnx.State) and dead["head"]["kernel"] is None
  assert isinstance(dead["fc1"]["kernel"], jax.Array)
  assert dead["fc1"]["kernel"].shape == (16,) and bool(dead["fc1"]["kernel"][2])
  # strip_params takes it with the pure params (NNX models strip in place
  # with synstrip_jax.nnx.strip).
  new_params, _ = ss.strip_params(nnx.to_pure_dict(params), dead.to_pure_dict(),
                                  stripping_factor=0.2)
  assert new_params["fc1"]["kernel"].shape == (5, 16)
  # A State of Variables with the plain-array dead tree names the remedy.
  with pytest.raises(ValueError, match=r"nnx.Variable leaves.*to_pure_dict"):
    ss.strip_params(params, dead, stripping_factor=0.2)
  # ... and a pure dict for a pure dict.
  pure = params.to_pure_dict()
  dead = probe.dead_tree(pure, stats)
  assert dead["head"]["kernel"] is None and bool(dead["fc1"]["kernel"][2])
  new_pure, _ = ss.strip_params(pure, dead, stripping_factor=0.2)
  np.testing.assert_array_equal(new_pure["fc1"]["kernel"],
                                new_params["fc1"]["kernel"])
