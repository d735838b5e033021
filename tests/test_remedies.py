"""Dormancy criteria from one statistics pass, and the remedies side by side
(ReDo, continual backprop, shrink & perturb, stripping)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import normal, small_params

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


@pytest.mark.parametrize("devices", [
    2, pytest.param(3, marks=pytest.mark.slow)])
def test_reduction_across_devices_equals_whole(devices):
  """``axis_name`` reductions (here under ``vmap``, as under ``pmap``) give
  the statistics of the whole batch, including the weighted mean."""
  x = np.maximum(normal((devices * 4, 3, 5)), 0.0)
  x[:, :, 1] = 0.0
  x[0, 0, 1] = 7.0
  whole = ss.batch_stats(x)
  # One program: vmap runs the same reductions eagerly op by op.
  per_device = jax.jit(jax.vmap(
      lambda xs: acts.reduce_examples(acts.example_stats(xs), axis_name="d"),
      axis_name="d"))(x.reshape(devices, 4, 3, 5))
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


# ------------------------------------------------------------------ remedies

import optax  # noqa: E402

from synstrip_jax import redo as ss_redo, remedies  # noqa: E402

OUTGOING = {"fc0/kernel": "fc1/kernel", "fc1/kernel": "head/kernel"}


#: The small MLP of the remedy tests: 3 inputs, hidden layers of 6 and 5, 2
#: outputs (:func:`conftest.small_params` of these kernel shapes).
MLP_SHAPES = {"fc0": (3, 6), "fc1": (6, 5), "head": (5, 2)}


def _forward(params, x):
  h = jax.nn.relu(x @ params["fc0"]["kernel"] + params["fc0"]["bias"])
  g = jax.nn.relu(h @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  return g @ params["head"]["kernel"] + params["head"]["bias"], (h, g)


def _stats(params, x):
  _, (h, g) = _forward(params, x)
  return {"fc0": {"post_act": ss.batch_stats(h)},
          "fc1": {"post_act": ss.batch_stats(g)}}


def _dopamine_score(activation):
  """dopamine labs/redo ``estimate_neuron_score`` (sub_mean_score=False)."""
  reduce_axes = tuple(range(activation.ndim - 1))
  score = np.mean(np.abs(activation), axis=reduce_axes)
  return score / (np.mean(score) + 1e-9)


@pytest.mark.parametrize("tx", [
    pytest.param(optax.adam(1e-3), id="adam"),
    pytest.param(optax.chain(optax.clip_by_global_norm(1.0),
                             optax.sgd(0.1, momentum=0.9)),
                 id="chain_momentum", marks=pytest.mark.slow),
    pytest.param(ss.with_stripping(optax.adamw(1e-3), {
        "fc0": {"kernel": True, "bias": False},
        "fc1": {"kernel": True, "bias": False},
        "head": {"kernel": False, "bias": False}}), id="with_stripping_adamw"),
])
def test_redo_matches_dopamine_rule(tx):
  """Small case: fc0 neuron 1 is killed by a bias of -100 (dopamine's score
  0, tau 0.1). ReDo: its fc0 column is redrawn, its bias and its fc1 row are
  0, every params-shaped moment is 0 there, all else is unchanged, and a
  stripped weight stays 0.0."""
  params = small_params(MLP_SHAPES)
  params["fc0"]["bias"] = params["fc0"]["bias"].at[1].set(-100.0)
  x = normal((32, 3), 1)
  # The set-up as one program (eagerly every small op compiles on its own).
  grads = jax.jit(jax.grad(lambda p: jnp.sum(_forward(p, x)[0] ** 2)))(params)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(grads, state, params)
  stats = jax.jit(_stats)(params, x)
  _, (h, _) = _forward(params, x)
  dop = _dopamine_score(np.asarray(h))
  np.testing.assert_allclose(acts.dormancy_score(stats["fc0"]["post_act"]),
                             dop, rtol=1e-5, atol=1e-8)
  # Only fc0 is recycled (fc1 is not in ``outgoing``), so fc1 changes only
  # at its rows fed by fc0's dormant neurons.
  outgoing = {"fc0/kernel": "fc1/kernel"}
  new, new_state, dead = remedies.redo(params, state, stats, jax.random.key(2),
                                       outgoing=outgoing, tau=0.1)
  assert dead["fc1"]["kernel"] is None
  np.testing.assert_array_equal(dead["fc0"]["kernel"], dop <= 0.1)
  j = np.flatnonzero(dop <= 0.1)
  assert list(j) == [1]
  k0, k1 = np.asarray(params["fc0"]["kernel"]), np.asarray(new["fc0"]["kernel"])
  assert not np.any(k0[:, j] == k1[:, j])
  np.testing.assert_array_equal(np.delete(k0, j, 1), np.delete(k1, j, 1))
  assert float(new["fc0"]["bias"][1]) == 0.0
  np.testing.assert_array_equal(new["fc1"]["kernel"][1], 0.0)
  np.testing.assert_array_equal(np.delete(np.asarray(new["fc1"]["kernel"]), j, 0),
                                np.delete(np.asarray(params["fc1"]["kernel"]), j, 0))
  rec = ss_redo.recycled_mask(params, dead, outgoing=outgoing)
  p_def = jax.tree_util.tree_structure(params)
  for old_leaf, new_leaf in zip(jax.tree_util.tree_leaves(state),
                                jax.tree_util.tree_leaves(new_state)):
    if old_leaf.shape == () or old_leaf.dtype == jnp.bool_:
      np.testing.assert_array_equal(old_leaf, new_leaf)
  found = 0
  for sub_old, sub_new in _params_shaped(state, new_state, p_def):
    found += 1
    for o, n, m in zip(sub_old, sub_new, p_def.flatten_up_to(rec)):
      if m is None:
        np.testing.assert_array_equal(o, n)
      else:
        np.testing.assert_array_equal(np.asarray(n)[np.asarray(m)], 0.0)
        np.testing.assert_array_equal(np.asarray(n)[~np.asarray(m)],
                                      np.asarray(o)[~np.asarray(m)])
  assert found >= 1


def _params_shaped(a, b, p_def):
  """Pairs of params-shaped float subtrees (moments) of two optax states."""
  def is_params_shaped(x):
    try:
      leaves = p_def.flatten_up_to(x)
    except Exception:  # pylint: disable=broad-except
      return False
    return all(hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)
               for v in leaves)
  flat_a = jax.tree_util.tree_leaves(a, is_leaf=is_params_shaped)
  flat_b = jax.tree_util.tree_leaves(b, is_leaf=is_params_shaped)
  return [(p_def.flatten_up_to(x), p_def.flatten_up_to(y))
          for x, y in zip(flat_a, flat_b) if is_params_shaped(x)]


TARGETS = {"fc0": {"kernel": True, "bias": False},
           "fc1": {"kernel": True, "bias": False},
           "head": {"kernel": False, "bias": False}}


def _stripped_setup():
  """Params with fc0 neuron 1 and fc1 neuron 2 dead, stripped with factor
  0.5 under ``with_stripping(adam)``, one optimizer step taken."""
  params = small_params(MLP_SHAPES)
  params["fc0"]["bias"] = params["fc0"]["bias"].at[1].set(-100.0)
  params["fc1"]["bias"] = params["fc1"]["bias"].at[2].set(-100.0)
  x = normal((32, 3), 1)
  tx = ss.with_stripping(optax.adam(1e-2), TARGETS)
  state = tx.init(params)
  params, state, dead = remedies.strip(params, state, _stats(params, x),
                                       stripping_factor=0.5)
  grads = jax.grad(lambda p: jnp.sum(_forward(p, x)[0] ** 2))(params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, x, dead


def test_strip_is_strip_event():
  params = small_params(MLP_SHAPES)
  params["fc0"]["bias"] = params["fc0"]["bias"].at[1].set(-100.0)
  x = normal((32, 3), 1)
  state = ss.with_stripping(optax.adam(1e-2), TARGETS).init(params)
  stats = _stats(params, x)
  dead = ss.dead_tree(params, stats)
  assert bool(dead["fc0"]["kernel"][1])
  want = ss.strip_event(params, state, dead, stripping_factor=0.5)
  got = remedies.strip(params, state, stats, stripping_factor=0.5)
  for w, g in zip(jax.tree_util.tree_leaves(want),
                  jax.tree_util.tree_leaves(got[:2])):
    np.testing.assert_array_equal(w, g)
  assert not bool(ss.get_masks(got[1])["fc0"]["kernel"][:, 1].all())


@pytest.mark.parametrize("remedy", [
    "redo", pytest.param("cbp", marks=pytest.mark.slow), "shrink_perturb"])
def test_stripped_weights_stay_zero(remedy):
  params, state, x, _ = _stripped_setup()
  masks = ss.get_masks(state)
  key = jax.random.key(3)
  stats = _stats(params, x)
  if remedy == "redo":
    new, _, dead = remedies.redo(params, state, stats, key,
                                 outgoing=OUTGOING, tau=0.1)
    assert bool(dead["fc0"]["kernel"][1])
  elif remedy == "cbp":
    cstate = remedies.cbp_init(params, OUTGOING)
    cstate = cstate._replace(ages={k: v + 10 for k, v in cstate.ages.items()})
    new, _, _, dead = remedies.cbp(params, state, cstate, stats, key,
                                   outgoing=OUTGOING, replacement_rate=0.5,
                                   maturity_threshold=5, accumulate=True)
    assert int(np.sum(dead["fc0"]["kernel"])) == 3
  else:
    new, _ = remedies.shrink_perturb(params, state, stats, key, shrink=0.8,
                                     sigma=0.1)
  for path in ("fc0", "fc1"):
    m = np.asarray(masks[path]["kernel"])
    np.testing.assert_array_equal(np.asarray(new[path]["kernel"])[~m], 0.0)
    assert np.any(np.asarray(new[path]["kernel"])[m]
                  != np.asarray(params[path]["kernel"])[m])


@pytest.mark.parametrize("shrink, sigma", [(0.8, 0.0), (1.0, 0.01), (0.5, 0.1)])
def test_shrink_perturb_formula(shrink, sigma):
  """Ash & Adams (2020): ``p <- shrink * p + sigma * eps``, eps ~ N(0, 1)."""
  params = {"w": normal((200, 100)),
            "step": jnp.int32(4)}
  new, opt_state = remedies.shrink_perturb(params, (), None, jax.random.key(1),
                                           shrink=shrink, sigma=sigma)
  assert opt_state == () and int(new["step"]) == 4
  resid = np.asarray(new["w"], np.float64) - shrink * np.asarray(params["w"], np.float64)
  if sigma == 0:
    np.testing.assert_allclose(resid, 0.0, atol=1e-6)
  else:
    eps = resid / sigma  # 20000 draws: mean 0 and std 1 within 5 s.e.
    assert abs(eps.mean()) < 5 / np.sqrt(eps.size)
    assert abs(eps.std() - 1.0) < 5 / np.sqrt(2 * eps.size)


def _gnt_reference(feats, w_next, *, decay, rate, maturity):
  """loss-of-plasticity ``lop/algos/gnt.py`` GnT.test_features with
  ``util_type='contribution'``, ``accumulate=True``, and gen_new_features'
  zeroing of outgoing weights and ages, transcribed to numpy for one hidden
  layer. ``w_next`` is torch's ``[out, in]`` weight of the next layer."""
  w_next = np.array(w_next, np.float64)
  n = w_next.shape[1]
  util, mean_act, ages, acc = np.zeros(n), np.zeros(n), np.zeros(n), 0.0
  replaced = []
  for f in feats:
    ages += 1
    util *= decay
    bias_correction = 1 - decay ** ages
    mean_act *= decay
    mean_act -= -(1 - decay) * f.mean(0)
    new_util = np.abs(w_next).mean(0) * np.abs(f).mean(0)
    util += (1 - decay) * new_util
    corrected = util / bias_correction
    rep = []
    eligible = np.flatnonzero(ages > maturity)
    if eligible.size:
      acc += rate * eligible.size
      k = int(acc)
      acc -= k
      if k:
        idx = eligible[np.argsort(-(-corrected[eligible]), kind="stable")[:k]]
        util[idx] = 0
        mean_act[idx] = 0
        w_next[:, idx] = 0
        ages[idx] = 0
        rep = sorted(idx.tolist())
    replaced.append(rep)
  return util, mean_act, ages, replaced


def test_cbp_matches_gnt():
  """One hidden layer of 6 ReLU units feeding a 6 -> 2 layer; 12 steps of
  features (unit 4 always 0), decay 0.9, maturity 3, rate 0.2, accumulate:
  the same units are replaced at the same steps and the running utility,
  mean activation and ages agree with GnT's."""
  decay, rate, maturity = 0.9, 0.2, 3
  feats = [np.maximum(normal((16, 6), 100 + i), 0.0) for i in range(12)]
  for f in feats:
    f[:, 4] = 0.0
  params = {"fc0": {"kernel": normal((3, 6), 1),
                    "bias": jnp.ones(6)},
            "head": {"kernel": normal((6, 2), 2),
                     "bias": jnp.zeros(2)}}
  outgoing = {"fc0/kernel": "head/kernel"}
  ref = _gnt_reference(feats, np.asarray(params["head"]["kernel"]).T,
                       decay=decay, rate=rate, maturity=maturity)
  state = remedies.cbp_init(params, outgoing)
  opt_state = optax.adam(1e-3).init(params)
  step = jax.jit(functools.partial(
      remedies.cbp, outgoing=outgoing, replacement_rate=rate,
      maturity_threshold=maturity, decay_rate=decay, accumulate=True))
  replaced = []
  for i, f in enumerate(feats):
    stats = {"fc0": {"post_act": ss.batch_stats(jnp.asarray(f))}}
    params, opt_state, state, dead = step(params, opt_state, state, stats,
                                          jax.random.key(10 + i))
    replaced.append(np.flatnonzero(dead["fc0"]["kernel"]).tolist())
  assert replaced == ref[3]
  assert [4] in replaced  # the unit with zero output goes first
  for got, want in zip((state.util, state.mean_act, state.ages), ref[:3]):
    np.testing.assert_allclose(got["fc0/kernel"], want, rtol=1e-5, atol=1e-7)
  for j in sorted({j for r in replaced for j in r}):
    assert float(params["fc0"]["bias"][j]) == 0.0


@pytest.mark.slow
def test_docs_snippets_run():
  """Every ``python`` block of docs/remedies.md runs, in order, in one
  namespace."""
  import pathlib
  import re
  text = (pathlib.Path(__file__).parents[1] / "docs" / "remedies.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert len(blocks) == 6
  ns: dict = {}
  for block in blocks:
    exec(compile(block, "docs/remedies.md", "exec"), ns)  # pylint: disable=exec-used
  assert dict(ns["outgoing"]) == {"fc0/kernel": "fc1/kernel",
                                  "fc1/kernel": "head/kernel",
                                  "head/kernel": None}
  assert ns["cbp_state"].ages["fc0/kernel"].shape == (32,)
