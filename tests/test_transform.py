"""Tests of `synstrip_jax.transform`: the optax wrapper, its state and strip_event.

What is checked (see each test's docstring):
* ``init``: keep-masks exactly at the targeted kernels, clear errors for bad
  ``targets``; ``update`` without params is refused.
* stripped weights are exactly 0.0 after every update whatever the inner
  optimizer (momentum, Nesterov, decoupled weight decay, sign updates,
  factored second moments), kept weights follow a manual reference bit for
  bit, inner moments of weights stripped from the start stay exactly 0.
* composition with ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` and
  ``optax.contrib.schedule_free_adamw``; ``get_masks`` errors.
* ``strip_event``: jit-able, touches only stripped weights and the masks,
  never the inner state; argument validation; bit-exact replay of the
  original's fixtures through the optimizer path.
* orbax: the whole optimizer state (``None`` leaves in the masks included)
  round-trips and training continues identically.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from _shared import assert_bitwise_equal, load_fixtures
from conftest import SMALL_TARGETS as TARGETS
from conftest import small_dead as make_dead
from conftest import host_normal, host_rng
from conftest import small_params as make_params

from synstrip_jax import stripping
from synstrip_jax.transform import (StrippingState, get_masks, init_masks,
                                    masked_params, set_masks, strip_event,
                                    with_stripping)


# ----------------------------------------------------------------------------
# Shared set-up (conftest's small model): a conv kernel and a dense kernel are
# targets, the head is not.
# ----------------------------------------------------------------------------

FACTOR = 0.5  # strips about half of each dead neuron's incoming weights
NUM_STEPS = 100
WARMUP = 5  # steps before the strip, so momenta / moments are non-zero


TARGETED_PATHS = (("conv", "kernel"), ("fc1", "kernel"))


def targets_fn(params):
  """Callable targets: every rank >= 2 leaf except the head."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and path[0].key != "head", params)


@functools.lru_cache(maxsize=None)
def grad_sequence(n: int, seed: int = 1):
  """``n`` pseudo-gradient trees, independent of the params (deterministic)."""
  params = make_params()
  leaves, treedef = jax.tree_util.tree_flatten(params)
  out = []
  for t in range(n):
    rng = host_rng([seed, t])
    out.append(jax.tree_util.tree_unflatten(
        treedef, [host_normal(rng, x.shape) for x in leaves]))
  return out


def mask_where(tree, masks, fill=0.0):
  """``where(mask, x, fill)`` at masked leaves, ``x`` elsewhere."""
  return jax.tree_util.tree_map(
      lambda x, m: x if m is None else jnp.where(m, x, jnp.asarray(fill, x.dtype)),
      tree, masks, is_leaf=lambda v: v is None)


def np_mask_where(tree, masks):
  """Host-side (numpy) ``where(mask, x, 0)``: cheap checks in step loops."""
  tree = jax.device_get(tree)
  return jax.tree_util.tree_map(
      lambda x, m: x if m is None else np.where(np.asarray(m), x,
                                                np.zeros((), x.dtype)),
      tree, masks, is_leaf=lambda v: v is None)


def stripped_values(params, masks):
  """Concatenated values of all stripped (mask False) weights, as numpy."""
  vals = [np.asarray(p)[~np.asarray(m)]
          for p, m in zip(jax.tree_util.tree_leaves(params),
                          jax.tree_util.tree_leaves(
                              masks, is_leaf=lambda v: v is None))
          if m is not None]
  return np.concatenate(vals) if vals else np.zeros((0,), np.float32)


def kept_values(params, masks):
  """Concatenated values of all kept (mask True) weights of masked kernels."""
  inverted = jax.tree_util.tree_map(
      lambda m: None if m is None else ~m, masks, is_leaf=lambda v: v is None)
  return stripped_values(params, inverted)


def maybe_jit(fn, jit: bool, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)`` when ``jit``, else ``fn`` itself."""
  return jax.jit(fn, **jit_kwargs) if jit else fn


def wrapped_step(opt, params, state, grads):
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state, updates


def reference_update(inner, params, inner_state, grads, masks):
  """The bare inner optimizer fed masked gradients (the manual reference)."""
  return inner.update(mask_where(grads, masks), inner_state, params)


OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9, nesterov=False),
    "sgd_nesterov": lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "rmsprop_momentum": lambda: optax.rmsprop(1e-2, momentum=0.9),
    # min_dim_size_to_factor=4: the second moments of the kernels are factored
    # (row / column statistics shared by stripped and kept weights).
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4,
                                         weight_decay_rate=0.01),
}


# Optimizers whose update of one weight depends on that weight's gradient,
# state and value only.
ELEMENTWISE = {"adamw", "sgd_momentum", "sgd_nesterov", "lion",
               "rmsprop_momentum"}


# ----------------------------------------------------------------------------
# init / update argument checks
# ----------------------------------------------------------------------------


def _check_masks(masks, params):
  flat_m = jax.tree_util.tree_flatten_with_path(
      masks, is_leaf=lambda v: v is None)[0]
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  assert [p for p, _ in flat_m] == [p for p, _ in flat_p]
  for (path, m), (_, p) in zip(flat_m, flat_p):
    names = tuple(k.key for k in path)
    if names in TARGETED_PATHS:
      assert m is not None, names
      assert m.dtype == jnp.bool_
      assert m.shape == p.shape
      assert bool(jnp.all(m)), names
    else:
      assert m is None, names


@pytest.mark.parametrize("targets", [TARGETS, targets_fn],
                         ids=["bool_tree", "callable"])


def test_init_masks_at_targets(targets):
  """All-True bool masks of the kernel's shape at targeted kernels only,
  None elsewhere; the inner state is the inner optimizer's own init."""
  params = make_params()
  inner = optax.adamw(1e-3, weight_decay=0.1)
  opt = with_stripping(inner, targets)
  state = opt.init(params)
  # init runs the same code under jit: same state, bit for bit.
  assert_bitwise_equal(jax.jit(opt.init)(params), state, "init under jit")
  assert isinstance(state, StrippingState)
  _check_masks(state.stripping_masks, params)
  _check_masks(get_masks(state), params)
  _check_masks(init_masks(params, targets), params)
  assert_bitwise_equal(state.inner_state, inner.init(params), "inner init")


def test_misaligned_targets_name_the_path():
  """Targets that do not have the params' structure: ValueError naming the
  missing / extra path."""
  params = make_params()
  missing = {k: v for k, v in TARGETS.items() if k != "conv"}
  with pytest.raises(ValueError, match="conv/kernel"):
    with_stripping(optax.sgd(0.1), missing).init(params)
  extra = dict(TARGETS, fc2={"kernel": True})
  with pytest.raises(ValueError, match="fc2/kernel"):
    with_stripping(optax.sgd(0.1), extra).init(params)
  with pytest.raises(ValueError, match="conv/kernel"):
    init_masks(params, lambda p: missing)


def test_true_target_on_bias_is_refused():
  """A rank-1 leaf (a bias) cannot be stripped: ValueError naming it."""
  params = make_params()
  bad = {k: dict(v) for k, v in TARGETS.items()}
  bad["fc1"]["bias"] = True
  with pytest.raises(ValueError, match="fc1/bias"):
    with_stripping(optax.sgd(0.1), bad).init(params)


def test_non_bool_target_is_refused():
  params = make_params()
  bad = {k: dict(v) for k, v in TARGETS.items()}
  bad["fc1"]["kernel"] = "yes"
  with pytest.raises(TypeError, match="fc1/kernel"):
    init_masks(params, bad)


def test_update_without_params_is_refused():
  params = make_params()
  opt = with_stripping(optax.sgd(0.1), TARGETS)
  state = opt.init(params)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state)
  with pytest.raises(ValueError, match="params"):
    jax.jit(opt.update)(params, state)


# ----------------------------------------------------------------------------
# Stripped weights stay at zero, kept weights follow the inner optimizer
# ----------------------------------------------------------------------------


def _run_against_reference(name, jit):
  """Strip after WARMUP steps (so momenta of the stripped weights are
  non-zero), then for 100 steps:
  * every stripped weight is exactly 0.0 after every update, and its
    update is exactly -p (so 0 once stripped);
  * the kept weights' updates and the inner state equal, bit for bit, a
    manual reference: the bare inner optimizer fed the masked gradients and
    the same params;
  * for element-wise optimizers, the kept weights' updates also equal bit
    for bit those of a bare inner optimizer with no constraint at all, whose
    own stripped weights drift away from zero (momentum, weight decay): the
    wrapper matters, and it does not disturb the kept weights.

  Updates, not params, are compared bit for bit: inside a jitted step XLA
  may contract ``p + (-lr * x)`` into a fused multiply-add, so two
  differently shaped programs can round the *sum* differently by one ulp.
  """
  inner = OPTIMIZERS[name]()
  opt = with_stripping(inner, TARGETS)
  grads = grad_sequence(WARMUP + NUM_STEPS)
  params = make_params()
  state = opt.init(params)
  step = maybe_jit(functools.partial(wrapped_step, opt), jit)
  for t in range(WARMUP):
    params, state, _ = step(params, state, grads[t])

  params, state = strip_event(params, state, make_dead(),
                              stripping_factor=FACTOR)
  masks = get_masks(state)
  n_stripped = stripped_values(params, masks).size
  assert n_stripped > 10
  np.testing.assert_array_equal(stripped_values(params, masks), 0.0)

  ref_update = maybe_jit(functools.partial(reference_update, inner), jit)
  ref_state = state.inner_state
  masks_np = jax.device_get(masks)
  bare_params, bare_state = params, state.inner_state
  for t in range(WARMUP, WARMUP + NUM_STEPS):
    prev = params
    ref_u, ref_state = ref_update(prev, ref_state, grads[t], masks)
    if name in ELEMENTWISE:
      # Kept weights as in the wrapped run, stripped ones left to drift.
      bare_params = jax.tree_util.tree_map(
          lambda m, p, b: p if m is None else np.where(m, p, b),
          masks_np, jax.device_get(prev), jax.device_get(bare_params),
          is_leaf=lambda v: v is None)
      bare_u, bare_state = ref_update(bare_params, bare_state, grads[t],
                                      masks)
      bare_params = jax.device_get(optax.apply_updates(bare_params, bare_u))

    params, state, updates = step(prev, state, grads[t])
    vals = stripped_values(params, masks)
    assert np.all(vals == 0.0), (
        f"step {t}: stripped weights {vals[vals != 0][:5]}")
    np.testing.assert_array_equal(stripped_values(updates, masks), 0.0)
    kept_u = np_mask_where(updates, masks_np)
    assert_bitwise_equal(kept_u, np_mask_where(ref_u, masks_np),
                         f"{name} step {t}: updates vs reference")
    assert_bitwise_equal(state.inner_state, ref_state,
                         f"{name} step {t}: inner state vs reference")
    chex.assert_trees_all_close(
        jax.device_get(params),
        np_mask_where(jax.tree_util.tree_map(
            np.add, jax.device_get(prev), jax.device_get(ref_u)), masks_np),
        rtol=1e-6, atol=1e-7)
    if name in ELEMENTWISE:
      assert_bitwise_equal(kept_u, np_mask_where(bare_u, masks_np),
                           f"{name} step {t}: kept updates vs bare inner")
  assert_bitwise_equal(state.stripping_masks, masks, "masks unchanged")
  if name in ELEMENTWISE:
    assert np.all(stripped_values(bare_params, masks) != 0.0)


# Jitted steps for every inner optimizer (adamw and the factored adafactor
# by default, the elementwise rest under -m slow); eager steps (no FMA
# contraction, so different rounding) for a few representative ones,
# adamw's by default (eager adafactor / rmsprop are slow and add nothing the
# jitted run does not).
DEFAULT_JIT = ("adamw", "adafactor")


@pytest.mark.parametrize("name,jit", (
    [pytest.param(n, True, id=f"{n}-jit",
                  marks=() if n in DEFAULT_JIT else pytest.mark.slow)
     for n in OPTIMIZERS]
    + [pytest.param("adamw", False, id="adamw-eager")]
    + [pytest.param(n, False, id=f"{n}-eager", marks=pytest.mark.slow)
       for n in ("sgd_nesterov", "lion")]))


def test_stripped_stay_zero_and_kept_follow_reference(name, jit):
  _run_against_reference(name, jit)


@pytest.mark.parametrize("name,fields", [
    ("adamw", ("mu", "nu")), ("sgd_nesterov", ("trace",)), ("lion", ("mu",)),
    ("rmsprop_momentum", ("nu", "trace"))], ids=lambda v: v
    if isinstance(v, str) else "-".join(v))


def test_moments_of_weights_stripped_from_start_stay_zero(name, fields):
  """Weights stripped before the first step get a zero gradient, so their
  inner moments stay exactly 0 for 100 steps (and the kept ones do not)."""
  opt = with_stripping(OPTIMIZERS[name](), TARGETS)
  params = make_params()
  params, state = strip_event(params, opt.init(params), make_dead(),
                              stripping_factor=FACTOR)
  masks = get_masks(state)
  step = jax.jit(functools.partial(wrapped_step, opt))
  for g in grad_sequence(NUM_STEPS):
    params, state, _ = step(params, state, g)
  np.testing.assert_array_equal(stripped_values(params, masks), 0.0)
  for field in fields:
    found = optax.tree_utils.tree_get_all_with_path(state.inner_state, field)
    assert len(found) == 1, field
    moment = found[0][1]
    np.testing.assert_array_equal(stripped_values(moment, masks), 0.0,
                                  err_msg=field)
    assert np.all(kept_values(moment, masks) != 0), field


def test_masked_nonzero_weight_is_sent_to_exactly_zero():
  """The update of a masked weight is exactly -p: a masked weight that is
  not yet zero (masks set by hand) is 0.0 after one update, and stays so."""
  opt = with_stripping(optax.sgd(0.1, momentum=0.9), TARGETS)
  params = make_params()
  state = opt.init(params)
  masks = get_masks(state)
  masks["fc1"]["kernel"] = masks["fc1"]["kernel"].at[:, 2].set(False)
  state = set_masks(state, masks)
  assert not np.any(stripped_values(params, masks) == 0.0)
  step = jax.jit(functools.partial(wrapped_step, opt))
  for g in grad_sequence(3):
    params, state, updates = step(params, state, g)
    np.testing.assert_array_equal(stripped_values(params, masks), 0.0)
  np.testing.assert_array_equal(stripped_values(updates, masks), 0.0)


# ----------------------------------------------------------------------------
# Composition with other optax wrappers
# ----------------------------------------------------------------------------


def _one_step_then_strip(opt, num_grads):
  """From ``make_params()``: one jitted step of ``opt``, then ``strip_event``
  with ``make_dead()``. Returns ``(params, state, masks, step, grads)``:
  ``step`` the jitted step, ``grads`` the ``num_grads`` gradient trees (the
  first one used)."""
  params = make_params()
  state = opt.init(params)
  grads = grad_sequence(num_grads)
  step = jax.jit(functools.partial(wrapped_step, opt))
  params, state, _ = step(params, state, grads[0])
  params, state = strip_event(params, state, make_dead(),
                              stripping_factor=FACTOR)
  return params, state, get_masks(state), step, grads


# The composition tests run jitted steps: the wrapper's update is the same
# code eagerly (covered eagerly by the reference test above).
def test_chain_with_clip_by_global_norm():
  """chain(clip, with_stripping(adamw)): masks found in the chain state,
  stripped weights stay 0.0, updates = with_stripping on clipped grads."""
  inner_ws = with_stripping(optax.adamw(1e-2, weight_decay=0.1), TARGETS)
  opt = optax.chain(optax.clip_by_global_norm(1.0), inner_ws)
  params, state, masks, step, grads = _one_step_then_strip(opt, 15)
  assert masks is state[1].stripping_masks
  ws_state = state[1]
  ws_params = params
  ws_step = jax.jit(functools.partial(wrapped_step, inner_ws))
  clip = optax.clip_by_global_norm(1.0)
  for g in grads[1:]:
    params, state, _ = step(params, state, g)
    np.testing.assert_array_equal(stripped_values(params, masks), 0.0)
    clipped, _ = clip.update(g, clip.init(ws_params))
    ws_params, ws_state, _ = ws_step(ws_params, ws_state, clipped)
    chex.assert_trees_all_close(params, ws_params, rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_inner_learning_rate_can_change():
  """inject_hyperparams(adamw) as the inner: the learning rate lives in the
  state, can be changed there, and scales the kept weights' updates while
  stripped weights keep a zero update."""
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2,
                                                weight_decay=0.1)
  opt = with_stripping(inner, TARGETS)
  params = make_params()
  state = opt.init(params)
  grads = grad_sequence(12)
  step = jax.jit(functools.partial(wrapped_step, opt))
  for g in grads[:5]:
    params, state, _ = step(params, state, g)
  params, state = strip_event(params, state, make_dead(),
                              stripping_factor=FACTOR)
  masks = get_masks(state)
  np.testing.assert_allclose(
      optax.tree_utils.tree_get(state, "learning_rate"), 1e-2)

  _, _, u1 = step(params, state, grads[5])
  state2 = optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(2e-2))
  np.testing.assert_allclose(
      optax.tree_utils.tree_get(state2, "learning_rate"), 2e-2)
  assert get_masks(state2) is not None
  _, new_state2, u2 = step(params, state2, grads[5])
  np.testing.assert_allclose(
      optax.tree_utils.tree_get(new_state2, "learning_rate"), 2e-2)
  # -lr * x: doubling lr doubles the update exactly (a power-of-2 scale).
  assert_bitwise_equal(jax.tree_util.tree_map(lambda x: 2 * x, u1), u2,
                       "updates at lr 2e-2 vs 2 * updates at lr 1e-2")
  np.testing.assert_array_equal(stripped_values(u2, masks), 0.0)

  state0 = optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(0.0))
  p0, _, _ = step(params, state0, grads[5])
  assert_bitwise_equal(p0, params, "lr 0: params unchanged")

  for g in grads[5:]:
    params, state2, _ = step(params, state2, g)
    np.testing.assert_array_equal(stripped_values(params, masks), 0.0)


def test_inject_hyperparams_around_with_stripping():
  """with_stripping inside inject_hyperparams: masks still found."""
  opt = optax.inject_hyperparams(
      lambda learning_rate: with_stripping(optax.adamw(learning_rate),
                                           TARGETS))(learning_rate=1e-2)
  params = make_params()
  state = opt.init(params)
  params, state = strip_event(params, state, make_dead(),
                              stripping_factor=FACTOR)
  masks = get_masks(state)
  for g in grad_sequence(5):
    params, state, _ = wrapped_step(opt, params, state, g)
    np.testing.assert_array_equal(stripped_values(params, masks), 0.0)


# Jit only: MultiSteps' lax.cond is re-traced at every eager call (slow).
def test_inside_multisteps():
  """MultiSteps(with_stripping(adamw), every_k_schedule=3): get_masks and
  strip_event reach the masks inside the MultiSteps state without touching
  its counters or accumulators; params move only every 3rd step and
  stripped weights stay 0.0; an emitted update equals with_stripping's
  update on the mean of the 3 gradients."""
  inner_ws = with_stripping(optax.adamw(1e-2, weight_decay=0.1), TARGETS)
  opt = optax.MultiSteps(inner_ws, every_k_schedule=3)
  params = make_params()
  state = opt.init(params)
  grads = grad_sequence(31)
  step = jax.jit(functools.partial(wrapped_step, opt))
  params, state, _ = step(params, state, grads[0])  # mid accumulation
  assert int(state.mini_step) == 1
  new_params, new_state = strip_event(params, state, make_dead(),
                                      stripping_factor=FACTOR)
  masks = get_masks(new_state)
  assert masks is new_state.inner_opt_state.stripping_masks
  assert stripped_values(new_params, masks).size > 10
  np.testing.assert_array_equal(stripped_values(new_params, masks), 0.0)
  assert_bitwise_equal(new_state._replace(inner_opt_state=None),
                       state._replace(inner_opt_state=None),
                       "MultiSteps counters / accumulators")
  assert_bitwise_equal(new_state.inner_opt_state.inner_state,
                       state.inner_opt_state.inner_state, "inner state")
  params, state = new_params, new_state

  ws_params, ws_state = params, state.inner_opt_state
  for t, g in enumerate(grads[1:], start=1):
    before = params
    params, state, _ = step(params, state, g)
    np.testing.assert_array_equal(stripped_values(params, masks), 0.0)
    if t % 3 != 2:
      assert_bitwise_equal(params, before, f"step {t}: no emission")
    else:
      mean_g = jax.tree_util.tree_map(lambda *gs: sum(gs) / 3,
                                      *grads[t - 2:t + 1])
      ws_params, ws_state, _ = wrapped_step(inner_ws, ws_params, ws_state,
                                            mean_g)
      chex.assert_trees_all_close(params, ws_params, rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == 10


def test_schedule_free_adamw_inner_training_params():
  """optax.contrib.schedule_free_adamw as the inner: the training params
  (schedule-free's y) keep stripped weights at exactly 0.0 (the evaluation
  params are a separate matter, see the test below)."""
  opt = with_stripping(optax.contrib.schedule_free_adamw(1e-2,
                                                         weight_decay=0.1),
                       TARGETS)
  params, state, masks, step, grads = _one_step_then_strip(opt, 20)
  for g in grads[1:]:
    params, state, _ = step(params, state, g)
    np.testing.assert_array_equal(stripped_values(params, masks), 0.0)
  eval_params = optax.contrib.schedule_free_eval_params(state.inner_state,
                                                        params)
  np.testing.assert_array_equal(
      stripped_values(mask_where(eval_params, masks), masks), 0.0)


def test_schedule_free_eval_params_are_stripped():
  opt = with_stripping(optax.contrib.schedule_free_adamw(1e-2), TARGETS)
  params = make_params()
  params, state = strip_event(params, opt.init(params), make_dead(),
                              stripping_factor=FACTOR)
  masks = get_masks(state)
  for g in grad_sequence(3):
    params, state, _ = wrapped_step(opt, params, state, g)
  eval_params = optax.contrib.schedule_free_eval_params(state.inner_state,
                                                        params)
  # The raw evaluation params come from schedule-free's own iterate z,
  # which the wrapper never sees: stripped weights are non-zero there...
  assert np.count_nonzero(stripped_values(eval_params, masks)) > 0
  # ...and masked_params restores the guarantee.
  eval_params = masked_params(eval_params, state)
  np.testing.assert_array_equal(stripped_values(eval_params, masks), 0.0)


def test_get_masks_and_set_masks_need_exactly_one_state():
  params = make_params()
  plain = optax.adamw(1e-2).init(params)
  with pytest.raises(ValueError, match="found 0"):
    get_masks(plain)
  with pytest.raises(ValueError, match="found 0"):
    set_masks(plain, init_masks(params, TARGETS))
  with pytest.raises(ValueError, match="found 0"):
    strip_event(params, plain, make_dead(), stripping_factor=FACTOR)
  two = optax.chain(with_stripping(optax.sgd(0.1), TARGETS),
                    with_stripping(optax.adamw(1e-2), TARGETS)).init(params)
  with pytest.raises(ValueError, match="found 2"):
    get_masks(two)
  with pytest.raises(ValueError, match="found 2"):
    set_masks(two, init_masks(params, TARGETS))


def test_set_masks_replaces_only_the_masks():
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    with_stripping(optax.adamw(1e-2), TARGETS))
  params = make_params()
  state = opt.init(params)
  masks = init_masks(params, TARGETS)
  masks["conv"]["kernel"] = jnp.zeros_like(masks["conv"]["kernel"])
  new = set_masks(state, masks)
  assert_bitwise_equal(get_masks(new), masks, "masks")
  assert_bitwise_equal(new[0], state[0], "clip state")
  assert_bitwise_equal(new[1].inner_state, state[1].inner_state, "inner")


# ----------------------------------------------------------------------------
# strip_event
# ----------------------------------------------------------------------------


def _trained_state(opt, steps=5):
  params = make_params()
  state = opt.init(params)
  for g in grad_sequence(steps):
    params, state, _ = wrapped_step(opt, params, state, g)
  return params, state


# Eager strip_event runs one compiled program per kernel shape, under jit the
# kernels are stacked and mapped: both are checked.
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_changes_only_stripped_weights_and_masks(jit):
  """After some training: strip_event zeroes exactly the newly pruned
  weights (all other params bit-identical: biases, the head, live and
  untouched columns), writes the masks of strip_params into the state and
  leaves the inner optimizer state (step counts, moments) bit-identical."""
  opt = with_stripping(optax.adamw(1e-2, weight_decay=0.1), TARGETS)
  params, state = _trained_state(opt)
  dead = make_dead()
  event = maybe_jit(strip_event, jit, static_argnames="stripping_factor")
  new_params, new_state = event(params, state, dead,
                                stripping_factor=FACTOR)

  exp_params, exp_masks = stripping.strip_params(
      params, dead, get_masks(state), stripping_factor=FACTOR)
  assert_bitwise_equal(new_params, exp_params, "params vs strip_params")
  assert_bitwise_equal(get_masks(new_state), exp_masks, "masks")
  assert_bitwise_equal(new_state.inner_state, state.inner_state,
                       "inner state (no optimizer step)")
  assert (int(optax.tree_utils.tree_get(new_state, "count"))
          == int(optax.tree_utils.tree_get(state, "count")))

  masks = get_masks(new_state)
  for key in ("conv", "fc1", "head"):
    assert_bitwise_equal(new_params[key]["bias"], params[key]["bias"], key)
  assert_bitwise_equal(new_params["head"], params["head"], "head")
  for key in ("conv", "fc1"):
    m = np.asarray(masks[key]["kernel"])
    d = np.asarray(dead[key]["kernel"])
    old = np.asarray(params[key]["kernel"])
    new = np.asarray(new_params[key]["kernel"])
    assert np.all(m[..., ~d]), f"{key}: a live column was cut"
    assert not np.all(m[..., d]), f"{key}: nothing was stripped"
    np.testing.assert_array_equal(new[m], old[m])
    np.testing.assert_array_equal(new[~m], 0.0)
    assert np.all(old[~m] != 0.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_repeated_events_only_shrink_masks(jit):
  opt = with_stripping(optax.sgd(1e-2, momentum=0.9), TARGETS)
  params, state = _trained_state(opt)
  event = maybe_jit(strip_event, jit, static_argnames="stripping_factor")
  masks = get_masks(state)
  for _ in range(3):
    params, state = event(params, state, make_dead(), stripping_factor=0.2)
    new_masks = get_masks(state)
    for a, b in zip(jax.tree_util.tree_leaves(masks),
                    jax.tree_util.tree_leaves(new_masks)):
      assert not np.any(np.asarray(b) & ~np.asarray(a))
      assert int(np.sum(b)) < int(np.sum(a))
    masks = new_masks


def test_dead_at_non_targeted_kernel_is_refused():
  opt = with_stripping(optax.sgd(0.1), TARGETS)
  params = make_params()
  state = opt.init(params)
  dead = make_dead()
  dead["head"]["kernel"] = jnp.array([True, False, False])
  with pytest.raises(ValueError, match="head/kernel"):
    strip_event(params, state, dead, stripping_factor=FACTOR)
  with pytest.raises(ValueError, match="head/kernel"):
    jax.jit(strip_event, static_argnames="stripping_factor")(
        params, state, dead, stripping_factor=FACTOR)


@pytest.mark.parametrize("factor", [-0.1, 1.5, float("nan"), True, "0.1"],
                         ids=["negative", "above_one", "nan", "bool",
                              "string"])


def test_bad_stripping_factor_is_refused(factor):
  opt = with_stripping(optax.sgd(0.1), TARGETS)
  params = make_params()
  state = opt.init(params)
  with pytest.raises((ValueError, TypeError),
                     match=repr(factor) if factor == factor else "nan"):
    strip_event(params, state, make_dead(), stripping_factor=factor)
  with pytest.raises((ValueError, TypeError)):
    jax.jit(strip_event, static_argnames="stripping_factor")(
        params, state, make_dead(), stripping_factor=factor)


def test_traced_stripping_factor_is_refused():
  opt = with_stripping(optax.sgd(0.1), TARGETS)
  params = make_params()
  state = opt.init(params)
  with pytest.raises(TypeError, match="static"):
    jax.jit(strip_event)(params, state, make_dead(), stripping_factor=0.1)


@pytest.mark.parametrize("factor", [0.0, 1.0], ids=["zero", "one"])
def test_boundary_factors(factor):
  """q = 0 prunes nothing (nothing is below the minimum); q = 1 prunes all
  but the maximum (and its ties) of every dead neuron."""
  opt = with_stripping(optax.sgd(0.1), TARGETS)
  params = make_params()
  new_params, state = strip_event(params, opt.init(params), make_dead(),
                                  stripping_factor=factor)
  masks = get_masks(state)
  dead = make_dead()
  for key in ("conv", "fc1"):
    m = np.asarray(masks[key]["kernel"])
    d = np.asarray(dead[key]["kernel"])
    kept_per_neuron = m.reshape(-1, m.shape[-1]).sum(0)
    fan_in = math.prod(m.shape[:-1])
    if factor == 0.0:
      np.testing.assert_array_equal(kept_per_neuron, fan_in)
    else:
      np.testing.assert_array_equal(kept_per_neuron[d], 1)
      np.testing.assert_array_equal(kept_per_neuron[~d], fan_in)
  assert_bitwise_equal(mask_where(params, masks), new_params, "params")


# ----------------------------------------------------------------------------
# Equivalence with the original, through the optimizer path
# ----------------------------------------------------------------------------


# The case the brief names, plus the perturbed f02 case (the one where a rank
# computed in float32 instead of float64 changes masks). Every case is
# replayed through strip_params by the stripping tests; through the optimizer
# path two suffice (each new factor or shape compiles anew).
FIXTURE_CASES = ("lin64x32_f005", "lin64x32_pert_f02")


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_replay_through_strip_event(case):
  """Replay a case of the original's outputs (PyTorch [out, in] layout,
  transposed to Flax [in, out]) through with_stripping + jitted
  strip_event: masks in the optimizer state and effective weights equal the
  original's bit for bit after every stripping; bias and head untouched."""
  fx = load_fixtures()
  if f"{case}__weight0" not in fx:
    pytest.skip(f"case {case} not in the fixtures")
  w0 = fx[f"{case}__weight0"]
  out_dim, in_dim = w0.shape
  params = {
      "fc1": {"kernel": jnp.asarray(w0.T),
              "bias": jnp.linspace(-1, 1, out_dim, dtype=jnp.float32)},
      "head": {"kernel": jnp.ones((out_dim, 2), jnp.float32),
               "bias": jnp.zeros((2,), jnp.float32)},
  }
  targets = {"fc1": {"kernel": True, "bias": False},
             "head": {"kernel": False, "bias": False}}
  opt = with_stripping(optax.adamw(1e-3, weight_decay=5e-5), targets)
  state = opt.init(params)
  inner0 = state.inner_state
  dead = {"fc1": {"kernel": jnp.asarray(fx[f"{case}__dead"]), "bias": None},
          "head": {"kernel": None, "bias": None}}
  factor = float(fx[f"{case}__factor"])
  event = jax.jit(strip_event, static_argnames="stripping_factor")
  for k in range(1, int(fx[f"{case}__iterations"]) + 1):
    if f"{case}__noise_{k}" in fx:
      mask = get_masks(state)["fc1"]["kernel"]
      noise = jnp.asarray(fx[f"{case}__noise_{k}"].T)
      params["fc1"]["kernel"] = params["fc1"]["kernel"] + noise * mask
    bias, head = params["fc1"]["bias"], params["head"]
    params, state = event(params, state, dead, stripping_factor=factor)
    np.testing.assert_array_equal(
        np.asarray(get_masks(state)["fc1"]["kernel"]),
        fx[f"{case}__mask_{k}"].T, err_msg=f"{case} mask after strip {k}")
    # Equal values (the original's pruned entries are weight * 0, which
    # can be -0.0; ours are +0.0).
    np.testing.assert_array_equal(np.asarray(params["fc1"]["kernel"]),
                                  fx[f"{case}__weight_{k}"].T,
                                  err_msg=f"{case} weights after strip {k}")
    assert_bitwise_equal(params["fc1"]["bias"], bias, "bias")
    assert_bitwise_equal(params["head"], head, "head")
    assert get_masks(state)["head"]["kernel"] is None
  assert_bitwise_equal(state.inner_state, inner0, "inner state")


# ----------------------------------------------------------------------------
# orbax checkpointing of the whole optimizer state
# ----------------------------------------------------------------------------


def _stripped_training(opt):
  params = make_params()
  state = opt.init(params)
  step = jax.jit(functools.partial(wrapped_step, opt))
  grads = grad_sequence(12)
  for g in grads[:4]:
    params, state, _ = step(params, state, g)
  params, state = strip_event(params, state, make_dead(),
                              stripping_factor=FACTOR)
  for g in grads[4:8]:
    params, state, _ = step(params, state, g)
  return params, state, step, grads[8:]


def _check_restored(saved, restored, step, grads):
  assert jax.tree_util.tree_structure(restored) == \
      jax.tree_util.tree_structure(saved)
  assert_bitwise_equal(restored, saved, "restored tree")
  masks = get_masks(restored["opt_state"])
  assert_bitwise_equal(masks, get_masks(saved["opt_state"]), "masks")
  assert masks["head"]["kernel"] is None and masks["fc1"]["bias"] is None
  assert masks["fc1"]["kernel"].dtype == jnp.bool_
  a = (saved["params"], saved["opt_state"])
  b = (restored["params"], restored["opt_state"])
  for g in grads:
    pa, sa, ua = step(*a, g)
    pb, sb, ub = step(*b, g)
    assert_bitwise_equal(ub, ua, "next update after restore")
    assert_bitwise_equal((pb, sb), (pa, sa), "training after restore")
    a, b = (pa, sa), (pb, sb)
  np.testing.assert_array_equal(stripped_values(a[0], masks), 0.0)


def test_orbax_standard_checkpointer_roundtrip(tmp_path):
  """StandardCheckpointer: params + full state (StrippingState with None
  leaves, adamw moments and count) restore against the abstract target of
  jax.eval_shape; masks equal and training continues bit-identically."""
  opt = with_stripping(optax.adamw(1e-2, weight_decay=0.1), TARGETS)
  params, state, step, grads = _stripped_training(opt)
  tree = {"params": params, "opt_state": state}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", tree)
  ckpt.wait_until_finished()
  abstract = jax.eval_shape(lambda: tree)
  restored = ckpt.restore(tmp_path / "ckpt", abstract)
  ckpt.close()
  assert isinstance(restored["opt_state"], StrippingState)
  _check_restored(tree, restored, step, grads)


def test_orbax_checkpoint_manager_roundtrip(tmp_path):
  """CheckpointManager with StandardSave / StandardRestore, for a nested state
  (chain(clip, with_stripping(inject_hyperparams(adamw))))."""
  opt = optax.chain(
      optax.clip_by_global_norm(1.0),
      with_stripping(optax.inject_hyperparams(optax.adamw)(
          learning_rate=1e-2, weight_decay=0.1), TARGETS))
  params, state, step, grads = _stripped_training(opt)
  tree = {"params": params, "opt_state": state}
  with ocp.CheckpointManager(tmp_path / "mgr") as mngr:
    mngr.save(8, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "mgr") as mngr:
    assert mngr.latest_step() == 8
    restored = mngr.restore(
        8, args=ocp.args.StandardRestore(jax.eval_shape(lambda: tree)))
  assert isinstance(restored["opt_state"][1], StrippingState)
  _check_restored(tree, restored, step, grads)
