"""Tests of ``synstrip_vit.steps``: schedule, optimizer, state, steps, mesh.

The steps do not depend on the model: the module's steps run on the
package's MLP (two hidden layers of 16, on 16x16x3 images), every compiled
step built once per module. Under ``-m slow`` a train step of a 1-block ViT
with dropout and the 8-device comparison run on the ViT too.
The 8-device checks run this file as a script in a subprocess (``XLA_FLAGS``
must be set before JAX starts): ``python tests/test_steps.py --worker mlp``
(or ``vit``) prints one JSON line of results.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _shared import (assert_bitwise_equal, bitwise_equal, json_verdict,
                     start_python)

from synstrip_jax import linen as ss_linen, probe
from synstrip_vit import steps
from synstrip_vit.augment import random_crop_flip
from synstrip_vit.input_pipeline import normalize
from synstrip_vit.models.mlp import MLP
from synstrip_vit.models.vit import ViT
from synstrip_jax.transform import get_masks, strip_event

IMAGE_SHAPE = (16, 16, 3)
#: Hidden layers of the module's MLP (``fc0``, ``fc1``: both strippable).
DEPTH = 2
WIDTH = 16
BATCH = 8
MEAN = np.array([125.3, 123.0, 113.9], np.float32)
STD = np.array([63.0, 62.1, 66.7], np.float32)
NUM_DEVICES = 8
WORKER_TIMEOUT_S = 240


def tiny_mlp() -> MLP:
  return MLP(num_classes=10, width=WIDTH, depth=DEPTH)


def tiny_vit(dtype=jnp.float32, dropout=0.0) -> ViT:
  """A 1-block ViT of width 32 (16 patches of 4x4 and a class token)."""
  return ViT(num_classes=10, patch_size=4, hidden_size=32, depth=1,
             num_heads=4, mlp_dim=64, dropout=dropout, dtype=dtype)


def tiny_model(name: str) -> nn.Module:
  return {"mlp": tiny_mlp, "vit": tiny_vit}[name]()


def schedule():
  return steps.make_schedule(learning_rate=3e-3, min_learning_rate=1e-5,
                                warmup_steps=2, total_steps=40)


def tx_factory(strip=True):
  return lambda targets: steps.make_optimizer(
      schedule(), weight_decay=0.05, targets=targets, strip=strip)


def preprocess(images):
  return normalize(images, MEAN, STD)


def no_augment(key, images):
  del key
  return preprocess(images)


def crop_flip_augment(key, images):
  return preprocess(random_crop_flip(key, images))


def make_batch(n=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = rng.integers(0, 10, (n,)).astype(np.int32)
  return images, labels


def copy_tree(tree):
  """A fresh copy (jit_train_step donates its state)."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


@pytest.fixture(scope="module")
def setup():
  """A fresh tiny-MLP state (strip on), its optimizer and the targets seen."""
  model = tiny_mlp()
  seen = {}

  def factory(targets):
    seen["targets"] = targets
    return tx_factory(True)(targets)

  state, tx = steps.create_train_state(model, factory, IMAGE_SHAPE, seed=0)
  return model, state, tx, seen["targets"]


@pytest.fixture(scope="module")
def train_fn(setup):
  """``train_step`` jitted without shardings (donates nothing)."""
  model, _, tx, _ = setup
  return jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   augment=no_augment))


# ------------------------------------------------------------------ schedule

def test_make_schedule_warmup_then_cosine_to_minimum():
  peak, low, warmup, total = 1e-3, 1e-5, 10, 110
  s = steps.make_schedule(learning_rate=peak, min_learning_rate=low,
                             warmup_steps=warmup, total_steps=total)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(float(s(warmup)), peak, rtol=1e-6)
  # Half way through the cosine: the mean of the peak and the minimum.
  np.testing.assert_allclose(float(s(60)), (peak + low) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(s(total)), low, rtol=1e-5)
  np.testing.assert_allclose(float(s(total + 50)), low, rtol=1e-5)
  values = np.asarray([float(s(i)) for i in range(total + 1)])
  assert np.all(np.diff(values[:warmup + 1]) > 0)
  assert np.all(np.diff(values[warmup:]) <= 0)
  assert values.max() == pytest.approx(peak, rel=1e-6)


def test_make_schedule_without_warmup_starts_at_peak():
  s = steps.make_schedule(learning_rate=0.1, min_learning_rate=0.0,
                             warmup_steps=0, total_steps=4)
  np.testing.assert_allclose([float(s(i)) for i in range(5)],
                             [0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05,
                              0.1 * (1 - np.cos(np.pi / 4)) / 2, 0.0],
                             rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------- optimizer

def _params():
  return {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))}}


_TARGETS = {"fc": {"kernel": True, "bias": False},
            "head": {"kernel": False, "bias": False}}


@pytest.mark.parametrize("targets", [_TARGETS, lambda p: _TARGETS],
                         ids=["tree", "callable"])
def test_make_optimizer_strip_on_holds_masks(targets):
  tx = steps.make_optimizer(schedule(), weight_decay=0.1, targets=targets,
                               strip=True)
  masks = get_masks(tx.init(_params()))
  assert masks["fc"]["kernel"].shape == (3, 4)
  assert masks["fc"]["kernel"].dtype == jnp.bool_
  assert bool(jnp.all(masks["fc"]["kernel"]))
  assert masks["head"]["kernel"] is None and masks["fc"]["bias"] is None


@pytest.mark.parametrize("targets", [_TARGETS, lambda p: _TARGETS],
                         ids=["tree", "callable"])
def test_make_optimizer_strip_off_holds_no_mask(targets):
  tx = steps.make_optimizer(schedule(), weight_decay=0.1, targets=targets,
                               strip=False)
  params = _params()
  opt_state = tx.init(params)
  assert jax.tree.leaves(get_masks(opt_state)) == []
  dead = {"fc": {"kernel": jnp.ones((4,), bool), "bias": None},
          "head": {"kernel": None, "bias": None}}
  with pytest.raises(ValueError, match="not a target"):
    strip_event(params, opt_state, dead)


def test_make_optimizer_is_adamw_with_scheduled_learning_rate():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  sched = steps.make_schedule(learning_rate=1e-2, min_learning_rate=0.0,
                                 warmup_steps=0, total_steps=10)
  for strip in (True, False):
    tx = steps.make_optimizer(sched, weight_decay=0.1, targets=_TARGETS,
                                 strip=strip)
    ref = optax.adamw(sched, weight_decay=0.1)
    u, _ = tx.update(grads, tx.init(params), params)
    r, _ = ref.update(grads, ref.init(params), params)
    assert_trees_close(u, r, rtol=1e-4, atol=0)  # bias-correction rounding
    state = tx.init(params)
    lr = state.inner_state.hyperparams["learning_rate"]
    np.testing.assert_allclose(float(lr), 1e-2, rtol=1e-6)


# ---------------------------------------------------------------- train state

def test_create_train_state(setup):
  model, state, tx, targets = setup
  flat = {"/".join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(targets)[0]}
  expected = {f"fc{i}/kernel" for i in range(DEPTH)}
  assert {k for k, v in flat.items() if v} == expected
  assert all(isinstance(v, bool) for v in flat.values())
  assert len(flat) == len(jax.tree.leaves(state.params))

  assert state.step.shape == () and state.step.dtype == jnp.int32
  assert int(state.step) == 0
  assert state.rng.shape == (2,) and state.rng.dtype == jnp.uint32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  assert "activations" not in state.params
  masks = get_masks(state.opt_state)
  for i in range(DEPTH):
    kernel = state.params[f"fc{i}"]["kernel"]
    mask = masks[f"fc{i}"]["kernel"]
    assert mask.shape == kernel.shape and bool(jnp.all(mask))
  assert masks["head"]["kernel"] is None
  assert len(jax.tree.leaves(masks)) == DEPTH
  assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.slow
def test_vit_state_and_train_step_with_dropout():
  """The ViT's targets are its blocks' MLP layers; its train step draws the
  dropout key from the state's ``rng`` (the same params and batch under
  another ``rng`` give another loss) and keeps the params float32."""
  model = tiny_vit(dropout=0.5)
  state, tx = steps.create_train_state(model, tx_factory(), IMAGE_SHAPE,
                                       seed=0)
  assert {jax.tree_util.keystr(path) for path, _ in
          jax.tree_util.tree_flatten_with_path(get_masks(state.opt_state))[0]
          } == {"['encoder_block_0']['mlp']['fc1']['kernel']",
                "['encoder_block_0']['mlp']['fc2']['kernel']"}
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   augment=no_augment))
  images, labels = make_batch(seed=13)
  new, metrics = step(copy_tree(state), images, labels)
  other = state.replace(rng=jax.random.PRNGKey(7))
  _, other_metrics = step(other, images, labels)
  assert np.isfinite(float(metrics["loss_sum"]))
  assert float(metrics["loss_sum"]) != float(other_metrics["loss_sum"])
  assert int(new.step) == 1
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(new.params))


@pytest.mark.slow
def test_create_train_state_is_seeded():
  model = tiny_mlp()
  a, _ = steps.create_train_state(model, tx_factory(), (8, 8, 1), seed=3)
  b, _ = steps.create_train_state(model, tx_factory(), (8, 8, 1), seed=3)
  c, _ = steps.create_train_state(model, tx_factory(), (8, 8, 1), seed=4)
  assert_bitwise_equal(a, b)
  assert not np.array_equal(a.params["fc0"]["kernel"], c.params["fc0"]["kernel"])
  assert not np.array_equal(a.rng, c.rng)
  assert set(get_masks(a.opt_state)) == {"fc0", "fc1", "head"}
  assert get_masks(a.opt_state)["head"]["kernel"] is None


# ------------------------------------------------------------------- training

def test_train_step_reduces_loss_and_sums_metrics(setup, train_fn):
  model, state, _, _ = setup
  images, labels = make_batch()
  x = preprocess(images)
  apply = jax.jit(functools.partial(model.apply, train=False))
  losses = []
  for i in range(20):
    logits = apply({"params": state.params}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    state, metrics = train_fn(state, images, labels)
    # The metrics are over the params before the step (no dropout here).
    np.testing.assert_allclose(float(metrics["loss_sum"]), float(ce.sum()),
                               rtol=1e-5)
    assert int(metrics["correct"]) == int(
        np.sum(np.argmax(logits, -1) == labels))
    assert metrics["correct"].dtype == jnp.int32
    assert float(metrics["count"]) == BATCH
    assert int(state.step) == i + 1
    losses.append(float(metrics["loss_sum"]) / BATCH)
  assert losses[-1] < 0.5 * losses[0], losses
  np.testing.assert_array_equal(state.rng, setup[1].rng)


def test_train_step_is_deterministic(setup, train_fn):
  _, state0, _, _ = setup
  images, labels = make_batch(seed=1)
  runs = []
  for _ in range(2):
    state = copy_tree(state0)
    for _ in range(3):
      state, metrics = train_fn(state, images, labels)
    runs.append((state, metrics))
  assert_bitwise_equal(runs[0], runs[1])


def test_train_step_keeps_stripped_weights_at_zero(setup, train_fn):
  _, state, _, _ = setup
  dead = jax.tree.map(lambda _: None, state.params)
  dead["fc1"]["kernel"] = jnp.arange(WIDTH) % 2 == 0
  params, opt_state = strip_event(state.params, state.opt_state, dead,
                                  stripping_factor=0.5)
  kept = get_masks(opt_state)["fc1"]["kernel"]
  assert not bool(jnp.all(kept))
  state = state.replace(params=params, opt_state=opt_state)
  images, labels = make_batch(seed=2)
  for _ in range(3):
    state, _ = train_fn(state, images, labels)
  kernel = state.params["fc1"]["kernel"]
  assert bool(jnp.all(jnp.where(kept, True, kernel == 0.0)))
  assert bool(jnp.any(kernel != params["fc1"]["kernel"]))


@pytest.mark.slow
def test_train_step_draws_new_augmentation_each_step():
  """The augmentation key is a pure function of ``(rng, step)``."""
  model = MLP(num_classes=10, width=8, depth=1)
  state, tx = steps.create_train_state(model, tx_factory(), IMAGE_SHAPE,
                                          seed=0)
  seen = []

  def augment(key, images):
    jax.debug.callback(lambda k: seen.append(np.asarray(k)), key)
    return preprocess(images)

  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   augment=augment))
  images, labels = make_batch(seed=3)
  s1, _ = step(state, images, labels)
  jax.block_until_ready(step(s1, images, labels))
  jax.block_until_ready(step(state, images, labels))
  jax.effects_barrier()
  assert len(seen) == 3
  assert not np.array_equal(seen[0], seen[1])
  np.testing.assert_array_equal(seen[0], seen[2])


# ---------------------------------------------------------------------- eval

@pytest.fixture(scope="module")
def eval_fns(setup):
  model = setup[0]
  return {flag: jax.jit(functools.partial(
      steps.eval_step, model=model, preprocess=preprocess,
      collect_stats=flag)) for flag in (True, False)}


@pytest.mark.slow
def test_eval_step_padding_rows_are_ignored(setup, eval_fns):
  _, state, _, _ = setup
  images, labels = make_batch(6, seed=4)
  pad_images, pad_labels = make_batch(2, seed=5)
  padded_images = np.concatenate([images, pad_images])
  padded_labels = np.concatenate([labels, pad_labels])
  valid = np.arange(8) < 6
  full = eval_fns[True](state.params, images, labels, np.ones(6, bool))
  padded = eval_fns[True](state.params, padded_images, padded_labels, valid)
  assert float(full["count"]) == float(padded["count"]) == 6.0
  assert int(full["correct"]) == int(padded["correct"])
  np.testing.assert_allclose(float(padded["loss_sum"]),
                             float(full["loss_sum"]), rtol=1e-6)
  assert_trees_close(padded["stats"], full["stats"], rtol=1e-6, atol=0)
  # Padding rows would change everything if they counted.
  everything = eval_fns[True](state.params, padded_images, padded_labels,
                              np.ones(8, bool))
  assert float(everything["count"]) == 8.0
  assert not np.allclose(
      everything["stats"]["fc1"]["post_act"].total,
      full["stats"]["fc1"]["post_act"].total)
  plain = eval_fns[False](state.params, padded_images, padded_labels, valid)
  assert "stats" not in plain
  for key in ("loss_sum", "correct", "count"):
    np.testing.assert_allclose(np.asarray(plain[key]),
                               np.asarray(padded[key]), rtol=1e-6)


def test_eval_step_stats_equal_direct_apply(setup, eval_fns):
  model, state, _, _ = setup
  images, labels = make_batch(seed=6)
  out = eval_fns[True](state.params, images, labels, np.ones(BATCH, bool))
  logits, variables = model.apply({"params": state.params},
                                  preprocess(images), train=False,
                                  mutable=["activations"])
  expected = probe.reduce_stats_tree(ss_linen.linen_stats(variables))
  assert_trees_close(out["stats"], expected, rtol=1e-6, atol=0)
  s = out["stats"][f"fc{DEPTH - 1}"]["post_act"]
  assert s.total.shape == (WIDTH,) and s.total.dtype == jnp.float32
  assert float(s.count) == BATCH
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(float(out["loss_sum"]), float(ce.sum()),
                             rtol=1e-5)
  assert int(out["correct"]) == int(np.sum(np.argmax(logits, -1) == labels))


def test_eval_step_rejects_misshaped_valid(setup):
  model, state, _, _ = setup
  images, labels = make_batch(4)
  with pytest.raises(ValueError, match="valid has shape"):
    steps.eval_step(state.params, images, labels, np.ones(3, bool),
                       model=model, preprocess=preprocess,
                       collect_stats=False)


def test_accumulate_sums_trees(setup, eval_fns):
  _, state, _, _ = setup
  a = eval_fns[True](state.params, *make_batch(4, seed=7), np.ones(4, bool))
  b = eval_fns[True](state.params, *make_batch(4, seed=8), np.ones(4, bool))
  total = steps.accumulate(steps.accumulate(None, a), b)
  assert float(total["count"]) == 8.0
  assert_trees_close(total["stats"],
                     jax.tree.map(jnp.add, a["stats"], b["stats"]))


# ---------------------------------------------------------------------- mesh

def test_check_batch_size_messages():
  mesh = steps.make_mesh(jax.devices()[:1])
  steps.check_batch_size(5, mesh)
  for bad in (0, -4):
    with pytest.raises(ValueError, match=rf"batch_size={bad} .*device count 1"):
      steps.check_batch_size(bad, mesh)
  with pytest.raises(ValueError, match=r"eval_batch_size=0 "):
    steps.check_batch_size(0, mesh, what="eval_batch_size")


@pytest.mark.slow
def test_jitted_steps_on_one_device_mesh_match_plain_jit(setup, train_fn,
                                                       eval_fns):
  """The sharded, donating jit_* steps = ``jax.jit`` of the plain functions."""
  model, state0, tx, _ = setup
  mesh = steps.make_mesh(jax.devices()[:1])
  images, labels = make_batch(seed=9)
  ref_state, ref_metrics = train_fn(state0, images, labels)
  step = steps.jit_train_step(model, tx, no_augment, mesh)
  fresh = steps.replicate(copy_tree(state0), mesh)
  state, metrics = step(fresh, *steps.global_batch((images, labels), mesh))
  assert jax.tree.leaves(fresh.params)[0].is_deleted()  # donated in place
  assert_trees_close(state, ref_state, rtol=1e-5, atol=1e-7)
  assert_trees_close(metrics, ref_metrics, rtol=1e-6)
  assert int(state.step) == 1

  valid = np.arange(BATCH) < 5
  for flag in (True, False):
    ev = steps.jit_eval_step(model, preprocess, mesh, collect_stats=flag)
    out = ev(state.params, *steps.global_batch((images, labels, valid),
                                                  mesh))
    ref = eval_fns[flag](ref_state.params, images, labels, valid)
    assert_trees_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_jitted_steps_match_eager_mlp():
  """jit_train_step / jit_eval_step = the un-jitted (eager) functions.

  On an MLP: eager dispatch of a ViT step costs ~20 s of per-op compiles.
  """
  model = MLP(num_classes=10, width=16, depth=1)
  state0, tx = steps.create_train_state(model, tx_factory(), IMAGE_SHAPE,
                                           seed=2)
  mesh = steps.make_mesh(jax.devices()[:1])
  images, labels = make_batch(seed=12)
  eager_state, eager_metrics = steps.train_step(
      state0, images, labels, model=model, tx=tx, augment=crop_flip_augment)
  step = steps.jit_train_step(model, tx, crop_flip_augment, mesh)
  state, metrics = step(copy_tree(state0),
                        *steps.global_batch((images, labels), mesh))
  assert_trees_close(state, eager_state, rtol=1e-5, atol=1e-7)
  assert_trees_close(metrics, eager_metrics, rtol=1e-6)
  valid = np.arange(BATCH) < 5
  ev = steps.jit_eval_step(model, preprocess, mesh, collect_stats=True)
  out = ev(state.params, images, labels, valid)
  ref = steps.eval_step(eager_state.params, images, labels, valid,
                           model=model, preprocess=preprocess,
                           collect_stats=True)
  assert_trees_close(out, ref, rtol=1e-5, atol=1e-6)
  assert float(out["count"]) == 5.0


@pytest.mark.slow
def test_mixed_precision_bfloat16_model():
  model = tiny_vit(jnp.bfloat16)
  state, tx = steps.create_train_state(model, tx_factory(), IMAGE_SHAPE,
                                          seed=1)
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   augment=crop_flip_augment))
  images, labels = make_batch(seed=10)
  losses = []
  for _ in range(3):
    state, metrics = step(state, images, labels)
    losses.append(float(metrics["loss_sum"]))
  assert np.all(np.isfinite(losses)), losses
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
  mu = state.opt_state.inner_state.inner_state[0].mu
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(mu))
  out = steps.jit_eval_step(model, preprocess, steps.make_mesh(
      jax.devices()[:1]), collect_stats=True)(
          state.params, images, labels, np.ones(BATCH, bool))
  assert np.isfinite(float(out["loss_sum"]))
  for leaf in jax.tree.leaves(out["stats"]):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  s = out["stats"]["encoder_block_0"]["mlp"]["fc1"]["post_act"]
  assert s.total.dtype == jnp.float32 and int(s.nonfinite.sum()) == 0


# ------------------------------------------------------------ 8 fake devices

def _is_key_bias(path) -> bool:
  names = [str(getattr(k, "key", k)) for k in path]
  return names[-3:] == ["attn", "key", "bias"]


def _max_diffs(a, b, rel_floor=1e-6):
  """``(max abs, max rel)`` differences between two trees of arrays."""
  abs_d, rel_d = 0.0, 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size:
      abs_d = max(abs_d, float(np.max(np.abs(x - y))))
      rel_d = max(rel_d, float(np.max(np.abs(x - y) / (np.abs(x) + rel_floor))))
  return abs_d, rel_d


def _worker(model_name: str) -> dict:
  """Runs on 8 fake CPU devices (see the module docstring)."""
  import synstrip_jax  # pylint: disable=import-outside-toplevel
  is_stats = lambda x: isinstance(x, synstrip_jax.ActivationStats)
  results = {"devices": jax.device_count()}
  model = tiny_model(model_name)
  state0, tx = steps.create_train_state(model, tx_factory(), IMAGE_SHAPE,
                                           seed=0)
  batch, num_steps = 16, 3
  rng = np.random.default_rng(11)
  images = rng.integers(0, 256, (num_steps, batch) + IMAGE_SHAPE, dtype=np.uint8)
  labels = rng.integers(0, 10, (num_steps, batch)).astype(np.int32)
  valid = np.arange(batch) < 13

  runs = {}
  for n in (1, NUM_DEVICES):
    mesh = steps.make_mesh(jax.devices()[:n])
    step = steps.jit_train_step(model, tx, crop_flip_augment, mesh)
    # 8 devices: the host-built (uncommitted) state goes in as it is.
    state = (steps.replicate(copy_tree(state0), mesh) if n == 1
             else copy_tree(state0))
    metrics = []
    for i in range(num_steps):
      state, m = step(state, *steps.global_batch((images[i], labels[i]),
                                                    mesh))
      metrics.append(m)
    shardings_ok = all(
        leaf.sharding.is_equivalent_to(steps.replicated(mesh), leaf.ndim)
        for leaf in jax.tree.leaves((state, metrics)))
    evals = {}
    for flag in (True, False):
      ev = steps.jit_eval_step(model, preprocess, mesh, collect_stats=flag)
      evals[flag] = ev(state.params, *steps.global_batch(
          (images[0], labels[0], valid), mesh))
    runs[n] = dict(state=jax.device_get(state), metrics=jax.device_get(metrics),
                   evals=jax.device_get(evals), shardings_ok=shardings_ok)

  one, many = runs[1], runs[NUM_DEVICES]
  flat1 = jax.tree_util.tree_flatten_with_path(one["state"].params)[0]
  flat8 = jax.tree.leaves(many["state"].params)
  key_bias = [(a, b) for (p, a), b in zip(flat1, flat8) if _is_key_bias(p)]
  others = [(a, b) for (p, a), b in zip(flat1, flat8) if not _is_key_bias(p)]
  results["params_bit_identical"] = bitwise_equal(one["state"].params,
                                                   many["state"].params)
  results["params_max_abs_diff"], results["params_max_rel_diff"] = _max_diffs(
      [a for a, _ in others], [b for _, b in others])
  results["key_bias_max_abs_diff"] = _max_diffs(
      [a for a, _ in key_bias], [b for _, b in key_bias])[0]
  results["lr_sum"] = float(sum(schedule()(i) for i in range(num_steps)))
  results["opt_state_bit_identical"] = bitwise_equal(one["state"].opt_state,
                                                      many["state"].opt_state)
  results["opt_state_max_abs_diff"] = _max_diffs(one["state"].opt_state,
                                                 many["state"].opt_state)[0]
  results["step_equal"] = int(one["state"].step) == int(many["state"].step) == num_steps
  results["rng_equal"] = bool(np.array_equal(one["state"].rng,
                                             many["state"].rng))
  results["metrics_max_rel_diff"] = _max_diffs(one["metrics"],
                                               many["metrics"], 1.0)[1]
  results["counts_equal"] = all(
      float(a["count"]) == float(b["count"]) == batch and
      int(a["correct"]) == int(b["correct"])
      for a, b in zip(one["metrics"], many["metrics"]))
  results["shardings_replicated"] = one["shardings_ok"] and many["shardings_ok"]

  s1, s8 = one["evals"][True]["stats"], many["evals"][True]["stats"]
  results["eval_stats_bit_identical"] = bitwise_equal(s1, s8)
  results["eval_stats_max_rel_diff"] = _max_diffs(s1, s8)[1]
  results["eval_dead_masks_equal"] = bitwise_equal(
      jax.tree.map(synstrip_jax.dead_mask, s1, is_leaf=is_stats),
      jax.tree.map(synstrip_jax.dead_mask, s8, is_leaf=is_stats))
  results["eval_count"] = [float(r["evals"][f]["count"])
                           for r in (one, many) for f in (True, False)]
  results["eval_metrics_max_rel_diff"] = max(
      _max_diffs({k: one["evals"][f][k] for k in ("loss_sum", "correct",
                                                  "count")},
                 {k: many["evals"][f][k] for k in ("loss_sum", "correct",
                                                   "count")}, 1.0)[1]
      for f in (True, False))

  mesh8 = steps.make_mesh()
  try:
    steps.check_batch_size(12, mesh8)
    results["check_batch_size_message"] = None
  except ValueError as e:
    results["check_batch_size_message"] = str(e)
  steps.check_batch_size(16, mesh8)
  return results


def _eight_device_models(session) -> list[str]:
  """The models of the selected ``test_eight_devices_match_one_device``."""
  return [item.callspec.params["model_name"] for item in session.items
          if item.path == Path(__file__)
          and item.originalname == "test_eight_devices_match_one_device"]


@pytest.fixture(scope="module", autouse=True)
def eight_device_workers(request):
  """Starts the 8-device workers (one per selected model) as the module
  starts, so that they overlap with the single-device tests."""
  procs = {name: start_python([__file__, "--worker", name], NUM_DEVICES)
           for name in _eight_device_models(request.session)}
  yield procs
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


@pytest.mark.parametrize("model_name", [
    "mlp", pytest.param("vit", marks=pytest.mark.slow)])
def test_eight_devices_match_one_device(eight_device_workers, model_name):
  """jit_train_step / jit_eval_step over 8 devices = over 1 device.

  Not bit-identical: the gradient all-reduce sums the per-device partial
  gradients in another order. Every param agrees to float tolerance except
  the ViT's attention key biases: their gradient is mathematically zero (a
  key bias adds the same ``q . b`` to every logit of a query, which the
  softmax ignores), so both runs hold rounding noise there, which Adam
  normalises to steps of about ``lr``; those are only bounded by the sum of
  the rates.
  """
  out = json_verdict(eight_device_workers[model_name], WORKER_TIMEOUT_S,
                     "the 8-device worker")
  del out["stderr"]
  print(json.dumps(out, indent=1))  # shown with -s: bit-identical or not
  assert out["devices"] == NUM_DEVICES, out
  assert out["params_max_abs_diff"] < 1e-5, out
  assert out["key_bias_max_abs_diff"] <= 1.01 * out["lr_sum"], out
  assert out["opt_state_max_abs_diff"] < 1e-5, out
  assert out["metrics_max_rel_diff"] < 1e-5, out
  assert out["counts_equal"] and out["step_equal"] and out["rng_equal"], out
  assert out["shardings_replicated"], out
  # Per-neuron sums whose small entries carry the params' rounding
  # difference: measured 5e-7 at XLA's default optimization, 2e-5 with
  # jax_disable_most_optimizations; a lost or doubled shard is off by O(1).
  assert out["eval_stats_max_rel_diff"] < 1e-4, out
  assert out["eval_dead_masks_equal"], out
  assert out["eval_count"] == [13.0] * 4, out
  assert out["eval_metrics_max_rel_diff"] < 1e-5, out
  msg = out["check_batch_size_message"]
  assert msg is not None and "batch_size=12" in msg and "device count 8" in msg


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  print(json.dumps(_worker(sys.argv[2])))
