"""Dormancy criteria from one statistics pass, and the remedies side by side
(ReDo, continual backprop, shrink & perturb, stripping)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import synstrip_jax as ss
from synstrip_jax import activations as acts


# ------------------------------------------------------------ dormancy rules

def _three_rules_case():
  """8 examples x 4 positions x 4 neurons: neuron 0 always 1.0, neuron 1
  0.01 on every output, neuron 2 non-zero only on example 0 (one position),
  neuron 3 always 0."""
  x = np.zeros((8, 4, 4), np.float32)
  x[..., 0] = 1.0
  x[..., 1] = 0.01
  x[0, 0, 2] = 2.0
  return jnp.asarray(x)


@pytest.mark.parametrize("crit, expected", [
    (None, [False, False, False, True]),
    (acts.Dormancy("zero"), [False, False, False, True]),
    # mean |a| = [1, .01, 2/32, 0], layer mean .268: scores [3.73, .037, .23, 0]
    (0.1, [False, True, False, True]),
    (acts.Dormancy("score", 0.1), [False, True, False, True]),
    # active on 8/8, 8/8, 1/8, 0/8 examples
    (acts.Dormancy("inactive", 0.2), [False, False, True, True]),
    (acts.Dormancy("inactive", 0.125), [False, False, False, True]),
])
def test_rules_from_one_pass(crit, expected):
  x = _three_rules_case()
  stats = ss.batch_stats(x)
  np.testing.assert_array_equal(ss.dead_mask(stats, crit), expected)
  assert int(stats.examples) == 8
  np.testing.assert_array_equal(stats.active, [8, 8, 1, 0])
  params = {"fc": {"kernel": jnp.ones((3, 4))}}
  dead = ss.dead_tree(params, {"fc": {"post_act": stats}}, crit)
  np.testing.assert_array_equal(dead["fc"]["kernel"], expected)


def test_score_matches_definition():
  x = _three_rules_case()
  mean_abs = np.abs(np.asarray(x)).reshape(-1, 4).mean(0)
  np.testing.assert_allclose(acts.dormancy_score(ss.batch_stats(x)),
                             mean_abs / mean_abs.mean(), rtol=1e-6)


def test_large_finite_outputs_do_not_zero_the_other_scores():
  # Neuron 0's 100 outputs of 1e37 sum past float32's maximum; neuron 1's
  # 1e35 keep a true score of 1e35 / ((1e37 + 1e35) / 2) = 0.0198 > tau.
  x = jnp.stack([jnp.full(100, 1e37, jnp.float32),
                 jnp.full(100, 1e35, jnp.float32)], -1)
  stats = ss.init_stats(2)
  for i in range(0, 100, 25):
    stats = ss.merge_stats(stats, ss.batch_stats(x[i:i + 25]))
  assert np.all(np.isfinite(np.asarray(stats.abs_mean)))
  np.testing.assert_allclose(stats.abs_mean, [1e37, 1e35], rtol=1e-5)
  expected = np.array([1e37, 1e35]) / ((1e37 + 1e35) / 2)
  np.testing.assert_allclose(acts.dormancy_score(stats), expected, rtol=1e-5)
  np.testing.assert_array_equal(ss.dead_mask(stats, 0.01), [False, False])
  assert not np.any(np.asarray(stats.nonfinite))


@pytest.mark.parametrize("devices", [2, 3])
def test_reduction_across_devices_equals_whole(devices):
  """``axis_name`` reductions (here under ``vmap``, as under ``pmap``) give
  the statistics of the whole batch, including the weighted mean."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (devices * 4, 3, 5)))
  x = x.at[:, :, 1].set(0.0).at[0, 0, 1].set(7.0)
  whole = ss.batch_stats(x)
  per_device = jax.vmap(
      lambda xs: acts.reduce_examples(acts.example_stats(xs), axis_name="d"),
      axis_name="d")(x.reshape(devices, 4, 3, 5))
  for field in acts.ActivationStats._fields:
    np.testing.assert_allclose(getattr(per_device, field)[0],
                               getattr(whole, field), rtol=1e-6)
  assert int(whole.active[1]) == 1


@pytest.mark.parametrize("bad, err", [
    (acts.Dormancy("often", 0.1), ValueError),
    (acts.Dormancy("score", -1.0), ValueError),
    (acts.Dormancy("inactive", float("nan")), ValueError),
    ("0.1", TypeError),
])
def test_bad_criterion_named(bad, err):
  with pytest.raises(err, match="Dormancy|criterion"):
    ss.dead_mask(ss.batch_stats(jnp.ones((2, 3))), bad)
