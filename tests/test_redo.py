"""Tests of `synstrip_jax.redo`: the ReDo baseline (recycling dormant neurons).

What is checked (see each test's docstring):
* ``recycle_params``: live neurons' incoming columns and outgoing rows are
  untouched bit for bit, dead columns are redrawn at the initializer's scale
  (dense and conv kernels), outgoing rows and biases of recycled neurons are
  exactly 0, keep-masks are honoured; jit and no-jit agree.
* the network function of the package's MLP (and of the ViT, recycling fc1
  neurons) is unchanged after recycling neurons found dead by a probe pass.
* ``reset_moments``/``recycle``: Adam's ``mu``/``nu`` (and momentum traces,
  ``MultiSteps`` accumulators) are zeroed at recycled entries only, inside
  ``inject_hyperparams``, ``chain``, ``masked`` and ``with_stripping``
  states; step counts, hyperparameters and stripping masks are untouched;
  stripped weights stay 0.0.
* ``outgoing_map`` for ``mlp`` and ``vit`` matches the paths of
  ``probe.dead_tree``.
* a short adamw training run after recycling is finite and revives the
  recycled neurons.
* hypothesis properties over random shapes and dead sets; bad input raises
  ``ValueError``/``TypeError`` naming the path.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _shared import assert_bitwise_equal
from conftest import examples, host_normal, host_rng, linen_variables, normal

from synstrip_jax import probe, redo, trees
from synstrip_jax import linen as ss_linen
from synstrip_vit import models
from synstrip_vit.models import create_model
from synstrip_jax.transform import (get_masks, masked_params, set_masks,
                                    with_stripping)

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# ----------------------------------------------------------------------------
# Shared set-up: conv -> (pooled) fc -> head, plus a non-kernel leaf.
# ----------------------------------------------------------------------------

OUTGOING = {"conv/kernel": "fc/kernel", "fc/kernel": "head/kernel"}
# Built once, so that the tests share their compilations.
RECYCLE = functools.partial(redo.recycle_params, outgoing=OUTGOING)
RECYCLE_JIT = jax.jit(RECYCLE)
RECYCLE_STATE_JIT = jax.jit(functools.partial(redo.recycle, outgoing=OUTGOING))
# ``outgoing`` as a static argument (the package's maps are hashable).
RECYCLE_STATIC_JIT = jax.jit(redo.recycle_params, static_argnames=("outgoing",))
# Chains a -> b -> c of the fresh-scale test and the chain property.
CHAIN_OUT = {"a/kernel": "b/kernel", "b/kernel": "c/kernel"}
RECYCLE_CHAIN_JIT = jax.jit(functools.partial(redo.recycle_params,
                                              outgoing=CHAIN_OUT))


def make_params(seed: int = 0):
  rng = host_rng(seed)
  draw = lambda *shape: host_normal(rng, shape)
  return {
      "conv": {"kernel": draw(3, 3, 2, 4), "bias": draw(4)},
      "fc": {"kernel": draw(4, 6), "bias": draw(6)},
      "head": {"kernel": draw(6, 3), "bias": draw(3)},
      "norm": {"scale": draw(4)},
  }


def make_dead():
  return {
      "conv": {"kernel": jnp.array([True, False, False, True]), "bias": None},
      "fc": {"kernel": jnp.array([False, True, False, False, True, False]),
             "bias": None},
      "head": {"kernel": None, "bias": None},
      "norm": {"scale": None},
  }


def mlp_setup(width: int = 16, depth: int = 2, in_dim: int = 6,
              num_classes: int = 4, seed: int = 0):
  model = create_model("mlp", num_classes=num_classes, width=width,
                       depth=depth)
  params = linen_variables(model, seed, np.zeros((1, in_dim), np.float32),
                           train=False)["params"]
  return model, params


def kill(params, layer: str, idx):
  """Make neurons ``idx`` of ``layer`` dead on any input: zero incoming
  weights, negative bias (ReLU output exactly 0). Host-side numpy."""
  params = jax.tree_util.tree_map(np.asarray, params)
  d = np.zeros(params[layer]["bias"].shape, bool)
  d[np.asarray(idx, int)] = True
  params[layer] = {"kernel": np.where(d, np.float32(0), params[layer]["kernel"]),
                   "bias": np.where(d, np.float32(-1), params[layer]["bias"])}
  return params


@functools.partial(jax.jit, static_argnums=0)
def probe_dead(model, params, x):
  """``(dead, stats)`` of a probe pass (exact rule); jit-compiled once per
  model configuration and shapes."""
  _, variables = model.apply({"params": params}, x, train=False,
                             mutable=[ss_linen.ACTIVATIONS])
  stats = probe.reduce_stats_tree(ss_linen.linen_stats(variables))
  return probe.dead_tree(params, stats), stats


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, x):
  return model.apply({"params": params}, x, train=False)


# One MLP and one ViT configuration for every test (shared compilations).
MLP_KW = dict(width=16, depth=2, in_dim=6, num_classes=4)
VIT_KW = dict(num_classes=3, patch_size=4, hidden_size=8, depth=2,
              num_heads=2, mlp_dim=16)


@functools.lru_cache(maxsize=None)
def vit_setup():
  model = create_model("vit", **VIT_KW)
  x = normal((4, 8, 8, 3), 2)
  params = linen_variables(model, 0, x, train=False)["params"]
  return model, params, x


# ----------------------------------------------------------------------------
# recycle_params
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_live_untouched_dead_reset(jit):
  """Live columns and rows bit for bit; dead columns redrawn; outgoing rows
  and recycled biases exactly 0; other leaves untouched."""
  params, dead = make_params(), make_dead()
  fn = RECYCLE_JIT if jit else RECYCLE
  new = fn(params, dead, jax.random.PRNGKey(7))
  dc = np.asarray(dead["conv"]["kernel"])
  df = np.asarray(dead["fc"]["kernel"])
  conv, fc, head = (np.asarray(new[k]["kernel"])
                    for k in ("conv", "fc", "head"))
  old_conv, old_fc, old_head = (np.asarray(params[k]["kernel"])
                                for k in ("conv", "fc", "head"))
  # incoming columns
  assert_bitwise_equal(conv[..., ~dc], old_conv[..., ~dc], "live conv columns")
  assert np.all(conv[..., dc] != old_conv[..., dc])
  # fc: rows of dead conv channels are 0 (also where they cross dead
  # columns), the other entries of dead columns are redrawn.
  np.testing.assert_array_equal(fc[dc, :], 0.0)
  assert_bitwise_equal(fc[~dc][:, ~df], old_fc[~dc][:, ~df], "live fc entries")
  assert np.all(fc[~dc][:, df] != old_fc[~dc][:, df])
  # head: rows of dead fc neurons are 0, the rest untouched
  np.testing.assert_array_equal(head[df, :], 0.0)
  assert_bitwise_equal(head[~df, :], old_head[~df, :], "live head rows")
  # biases
  for name, d in (("conv", dc), ("fc", df)):
    b, old_b = np.asarray(new[name]["bias"]), np.asarray(params[name]["bias"])
    np.testing.assert_array_equal(b[d], 0.0)
    assert_bitwise_equal(b[~d], old_b[~d], f"{name} live bias")
  assert_bitwise_equal(new["head"]["bias"], params["head"]["bias"])
  assert_bitwise_equal(new["norm"]["scale"], params["norm"]["scale"])
  chex.assert_trees_all_equal_shapes_and_dtypes(new, params)


def test_fresh_scale():
  """Redrawn columns follow lecun_normal of the whole kernel: std
  1/sqrt(fan_in) with the receptive field counted (dense and conv)."""
  rng = host_rng(1)
  params = {"a": {"kernel": host_normal(rng, (3, 3, 8, 32), scale=5.0)},
            "b": {"kernel": host_normal(rng, (32, 128), scale=5.0)},
            "c": {"kernel": jnp.zeros((128, 2))}}
  dead = {"a": {"kernel": np.arange(32) % 2 == 0},
          "b": {"kernel": np.arange(128) % 2 == 0}, "c": {"kernel": None}}
  new = RECYCLE_CHAIN_JIT(params, dead, jax.random.PRNGKey(3))
  a = np.asarray(new["a"]["kernel"])[..., ::2]
  b = np.asarray(new["b"]["kernel"])[1::2, ::2]  # rows of live a-neurons
  np.testing.assert_allclose(a.std(), 1 / np.sqrt(3 * 3 * 8), rtol=0.1)
  np.testing.assert_allclose(b.std(), 1 / np.sqrt(32), rtol=0.1)
  assert abs(a.mean()) < 0.15 / np.sqrt(72)


def test_jit_matches_eager():
  """jit and no-jit agree (the fresh draws up to float rounding, the rest
  bit for bit)."""
  params, dead = make_params(), make_dead()
  key = jax.random.PRNGKey(11)
  ref = redo.recycle_params(params, dead, key, outgoing=OUTGOING)
  chex.assert_trees_all_close(RECYCLE_JIT(params, dead, key), ref, rtol=1e-6,
                              atol=1e-7)


def test_key_per_path_and_typed_key():
  """A kernel's fresh weights depend on the key and its path only (not on
  which other kernels are recycled); typed keys work; other keys differ."""
  params, dead = make_params(), make_dead()
  key = jax.random.PRNGKey(11)
  ref = redo.recycle_params(params, dead, key, outgoing=OUTGOING)
  only_fc = dict(dead, conv={"kernel": None, "bias": None})
  got_fc = redo.recycle_params(params, only_fc, key, outgoing=OUTGOING)
  df = np.asarray(dead["fc"]["kernel"])
  dc = np.asarray(dead["conv"]["kernel"])
  assert_bitwise_equal(np.asarray(got_fc["fc"]["kernel"])[~dc][:, df],
                       np.asarray(ref["fc"]["kernel"])[~dc][:, df])
  typed = redo.recycle_params(params, dead, jax.random.key(11),
                              outgoing=OUTGOING)
  conv = np.asarray(typed["conv"]["kernel"])[..., dc]
  assert np.all(np.isfinite(conv)) and np.all(conv != 0)
  other = redo.recycle_params(params, dead, jax.random.PRNGKey(12),
                              outgoing=OUTGOING)
  assert np.all(np.asarray(other["conv"]["kernel"])[..., dc]
                != np.asarray(ref["conv"]["kernel"])[..., dc])


def test_nothing_dead_is_identity():
  params = make_params()
  dead = jax.tree_util.tree_map(lambda d: jnp.zeros_like(d), make_dead())
  new = RECYCLE_JIT(params, dead, jax.random.PRNGKey(0))
  assert_bitwise_equal(new, params)


def test_custom_initializer_and_mapping():
  """``init_fn`` is used for the fresh weights; a mapping gives one per
  kernel."""
  params, dead = make_params(), make_dead()
  dc = np.asarray(dead["conv"]["kernel"])
  df = np.asarray(dead["fc"]["kernel"])
  new = redo.recycle_params(params, dead, jax.random.PRNGKey(0),
                            outgoing=OUTGOING,
                            init_fn=nn.initializers.constant(0.5))
  np.testing.assert_array_equal(np.asarray(new["conv"]["kernel"])[..., dc], 0.5)
  new = redo.recycle_params(
      params, dead, jax.random.PRNGKey(0), outgoing=OUTGOING,
      init_fn={"conv/kernel": nn.initializers.constant(0.25),
               "fc/kernel": nn.initializers.constant(-2.0)})
  np.testing.assert_array_equal(
      np.asarray(new["conv"]["kernel"])[..., dc], 0.25)
  np.testing.assert_array_equal(
      np.asarray(new["fc"]["kernel"])[~dc][:, df], -2.0)


def test_masks_keep_stripped_weights_zero():
  """With keep-masks, recycled columns get fresh weights at kept entries
  only; every masked-out entry is 0.0."""
  params, dead = make_params(), make_dead()
  rng = np.random.default_rng(0)
  masks = {"conv": {"kernel": jnp.asarray(rng.random((3, 3, 2, 4)) > 0.5),
                    "bias": None},
           "fc": {"kernel": jnp.asarray(rng.random((4, 6)) > 0.5),
                  "bias": None},
           "head": {"kernel": None, "bias": None}, "norm": {"scale": None}}
  new = redo.recycle_params(params, dead, jax.random.PRNGKey(0),
                            outgoing=OUTGOING, masks=masks)
  ref = redo.recycle_params(params, dead, jax.random.PRNGKey(0),
                            outgoing=OUTGOING)
  for name in ("conv", "fc"):
    m = np.asarray(masks[name]["kernel"])
    k = np.asarray(new[name]["kernel"])
    np.testing.assert_array_equal(k[~m], 0.0)
    assert_bitwise_equal(k[m], np.asarray(ref[name]["kernel"])[m])


# ----------------------------------------------------------------------------
# Function preservation on the package's models
# ----------------------------------------------------------------------------

X = normal((64, 6), 5)


def test_mlp_output_unchanged():
  """Recycle neurons a probe finds dead in every hidden layer of the MLP:
  the logits do not change, and recycled neurons are alive again."""
  model, params = mlp_setup()
  params = kill(params, "fc0", [1, 5, 9])
  params = kill(params, "fc1", [0, 2, 15])
  dead, _ = probe_dead(model, params, X)
  for layer, idx in (("fc0", [1, 5, 9]), ("fc1", [0, 2, 15])):
    assert np.all(np.asarray(dead[layer]["kernel"])[idx]), layer
  outgoing = models.outgoing_map(params, "mlp")
  new = RECYCLE_STATIC_JIT(params, dead, jax.random.PRNGKey(1),
                           outgoing=outgoing)
  np.testing.assert_allclose(apply(model, new, X), apply(model, params, X),
                             rtol=1e-6, atol=1e-6)
  _, stats = probe_dead(model, new, X)
  for layer, idx in (("fc0", [1, 5, 9]), ("fc1", [0, 2, 15])):
    total = np.asarray(stats[layer]["post_act"].total)
    assert np.all(total[idx] > 0), layer


@pytest.mark.slow  # the MLP's case by default: test_mlp_output_unchanged
def test_vit_fc1_preserved_fc2_changes():
  """ViT: recycling fc1 neurons preserves the function (their outgoing
  rows in fc2 are zeroed); an fc2 neuron maps to None (residual stream),
  so recycling it changes the function, as documented."""
  model, params, x = vit_setup()
  blk = dict(params["encoder_block_0"])
  mlp = {k: dict(v) for k, v in blk["mlp"].items()}
  idx = jnp.array([2, 7])
  mlp["fc1"]["kernel"] = mlp["fc1"]["kernel"].at[:, idx].set(0.0)
  mlp["fc1"]["bias"] = mlp["fc1"]["bias"].at[idx].set(-1.0)
  mlp["fc2"]["kernel"] = mlp["fc2"]["kernel"].at[:, 3].set(0.0)
  mlp["fc2"]["bias"] = mlp["fc2"]["bias"].at[3].set(-1.0)
  blk["mlp"] = mlp
  params = dict(params, encoder_block_0=blk)
  dead, _ = probe_dead(model, params, x)
  fc1_dead = np.asarray(dead["encoder_block_0"]["mlp"]["fc1"]["kernel"])
  fc2_dead = np.asarray(dead["encoder_block_0"]["mlp"]["fc2"]["kernel"])
  assert fc1_dead[2] and fc1_dead[7] and fc2_dead[3]
  outgoing = models.outgoing_map(params, "vit")
  # fc2 columns drawn positive: fc1's outputs are >= 0, so the recycled
  # fc2 neuron certainly fires.
  init_fn = {p: (nn.initializers.constant(0.5) if "fc2" in p
                 else redo.DEFAULT_INIT) for p in outgoing}
  recycle = jax.jit(functools.partial(redo.recycle_params, outgoing=outgoing,
                                      init_fn=init_fn))
  before = apply(model, params, x)
  only_fc1 = jax.tree_util.tree_map(lambda d: d, dead,  # fresh containers
                                    is_leaf=trees.is_none)
  only_fc1["encoder_block_0"]["mlp"]["fc2"]["kernel"] = None
  only_fc1["encoder_block_1"]["mlp"]["fc2"]["kernel"] = None
  new = recycle(params, only_fc1, jax.random.PRNGKey(3))
  fc1 = lambda p: np.asarray(p["encoder_block_0"]["mlp"]["fc1"]["kernel"])
  assert not np.allclose(fc1(new), fc1(params))
  np.testing.assert_allclose(apply(model, new, x), before,
                             rtol=1e-5, atol=1e-5)
  new = recycle(params, dead, jax.random.PRNGKey(3))
  after = apply(model, new, x)
  assert float(jnp.max(jnp.abs(after - before))) > 1e-4


# ----------------------------------------------------------------------------
# Optimizer moments
# ----------------------------------------------------------------------------

def _targets(params):
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


OPTIMIZERS = {
    "adam": (lambda: optax.adam(1e-2), ("mu", "nu")),
    "adamw": (lambda: optax.adamw(1e-2, weight_decay=0.1), ("mu", "nu")),
    "inject_adamw": (lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-2, weight_decay=0.1), ("mu", "nu")),
    "stripping_adamw": (lambda: with_stripping(
        optax.adamw(1e-2, weight_decay=0.1), _targets), ("mu", "nu")),
    "stripping_inject_adamw": (lambda: with_stripping(
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2), _targets),
                               ("mu", "nu")),
    "chain_momentum": (lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.sgd(1e-2, momentum=0.9)),
                       ("trace",)),
    "multisteps_adam": (lambda: optax.MultiSteps(optax.adam(1e-2), 3),
                        ("mu", "nu", "acc_grads")),
    "masked_adam": (lambda: optax.masked(optax.adam(1e-2), _targets),
                    ("mu", "nu")),
}


def warm_state(tx, params, seed: int = 0):
  """``tx.init(params)`` with every floating leaf (moments, accumulators,
  float hyperparameters) replaced by random values in ``[0.5, 1.5)``: non-zero
  everywhere, so that resets are visible. Counts and masks are kept."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(rng.uniform(0.5, 1.5, size=np.shape(x)), x.dtype)
    return x

  return params, jax.tree_util.tree_map(fill, tx.init(params))


def _field_of(path: str, fields) -> bool:
  return any(part in fields for part in path.split("/"))


def check_reset(old_state, new_state, params, rec, fields):
  """Moment fields: ``where(rec, 0, old)`` exactly; all other leaves equal."""
  n_checked = 0
  for field in fields:
    olds = optax.tree_utils.tree_get_all_with_path(old_state, field)
    news = optax.tree_utils.tree_get_all_with_path(new_state, field)
    assert len(olds) == len(news), field
    p_def = jax.tree_util.tree_structure(params)
    paths = [p for p, _ in trees.leaves_with_path(params)]
    for (_, o), (_, n) in zip(olds, news):
      o_l, n_l, r_l = (p_def.flatten_up_to(t) for t in (o, n, rec))
      for path, ol, nl, r in zip(paths, o_l, n_l, r_l):
        if isinstance(ol, optax.MaskedNode):
          assert isinstance(nl, optax.MaskedNode), f"{field}/{path}"
          continue
        want = ol if r is None else jnp.where(r, 0.0, ol)
        assert_bitwise_equal(nl, want, f"{field}/{path}")
        if r is not None:
          assert np.all(np.asarray(ol)[np.asarray(r)] != 0), f"{field}/{path}"
          n_checked += 1
  assert n_checked > 0
  old_l = trees.leaves_with_path(old_state)
  new_l = trees.leaves_with_path(new_state)
  assert [p for p, _ in old_l] == [p for p, _ in new_l]
  for (path, o), (_, n) in zip(old_l, new_l):
    if not _field_of(path, fields):
      np.testing.assert_array_equal(np.asarray(n), np.asarray(o), err_msg=path)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_recycle_resets_moments_only(name):
  """``recycle`` zeroes the moments at recycled entries (incoming columns,
  biases, outgoing rows) and changes nothing else in the state. (Eager:
  one compilation per state structure would cost more than the sweep;
  the jitted path is checked with ``with_stripping`` below.)"""
  make_tx, fields = OPTIMIZERS[name]
  tx = make_tx()
  params, state = warm_state(tx, make_params())
  dead = make_dead()
  new_params, new_state = redo.recycle(params, state, dead,
                                       jax.random.PRNGKey(0),
                                       outgoing=OUTGOING)
  rec = redo.recycled_mask(params, dead, outgoing=OUTGOING)
  check_reset(state, new_state, params, rec, fields)
  chex.assert_trees_all_equal_structs(new_state, state)
  ref = redo.recycle_params(params, dead, jax.random.PRNGKey(0),
                            outgoing=OUTGOING)
  chex.assert_trees_all_close(new_params, ref, rtol=1e-6, atol=1e-7)


def test_recycled_mask_entries():
  """``recycled_mask``: incoming columns, bias entries, outgoing rows."""
  rec = redo.recycled_mask(make_params(), make_dead(), outgoing=OUTGOING)
  dc = np.asarray(make_dead()["conv"]["kernel"])
  df = np.asarray(make_dead()["fc"]["kernel"])
  np.testing.assert_array_equal(rec["conv"]["kernel"],
                                np.broadcast_to(dc, (3, 3, 2, 4)))
  np.testing.assert_array_equal(rec["conv"]["bias"], dc)
  np.testing.assert_array_equal(rec["fc"]["kernel"],
                                dc[:, None] | df[None, :])
  np.testing.assert_array_equal(rec["fc"]["bias"], df)
  np.testing.assert_array_equal(rec["head"]["kernel"],
                                np.broadcast_to(df[:, None], (6, 3)))
  assert rec["head"]["bias"] is None
  assert rec["norm"]["scale"] is None


def test_with_stripping_masks_honoured():
  """With a ``with_stripping`` state holding masks, ``recycle`` keeps the
  stripped weights at 0.0 (fresh weights only at kept entries), leaves the
  masks as they are, and the next update keeps them at 0.0."""
  tx = with_stripping(optax.adamw(1e-2, weight_decay=0.1), _targets)
  params, state = warm_state(tx, make_params())
  rng = np.random.default_rng(3)
  masks = jax.tree_util.tree_map(
      lambda m: None if m is None else jnp.asarray(rng.random(m.shape) > 0.4),
      get_masks(state), is_leaf=trees.is_none)
  state = set_masks(state, masks)
  params = masked_params(params, state)
  dead = make_dead()
  new_params, new_state = RECYCLE_STATE_JIT(params, state, dead,
                                            jax.random.PRNGKey(4))
  chex.assert_trees_all_equal(get_masks(new_state), masks)
  check_reset(state, new_state, params,
              redo.recycled_mask(params, dead, outgoing=OUTGOING),
              ("mu", "nu"))
  ref = redo.recycle_params(params, dead, jax.random.PRNGKey(4),
                            outgoing=OUTGOING)
  for name in ("conv", "fc", "head"):
    m = np.asarray(masks[name]["kernel"])
    k = np.asarray(new_params[name]["kernel"])
    np.testing.assert_array_equal(k[~m], 0.0)
    np.testing.assert_allclose(k[m], np.asarray(ref[name]["kernel"])[m],
                               rtol=1e-6)
  dc = np.asarray(dead["conv"]["kernel"])
  kept = np.asarray(masks["conv"]["kernel"])[..., dc]
  assert np.all(np.asarray(new_params["conv"]["kernel"])[..., dc][kept]
                != np.asarray(params["conv"]["kernel"])[..., dc][kept])
  g = jax.tree_util.tree_map(jnp.ones_like, new_params)
  u, _ = jax.jit(tx.update)(g, new_state, new_params)
  stepped = optax.apply_updates(new_params, u)
  for name in ("conv", "fc", "head"):
    m = np.asarray(masks[name]["kernel"])
    np.testing.assert_array_equal(np.asarray(stepped[name]["kernel"])[~m], 0.0)


def test_count_and_hyperparams_untouched():
  tx = optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3)
  params, state = warm_state(tx, make_params())
  _, new_state = redo.recycle(params, state, make_dead(),
                              jax.random.PRNGKey(0), outgoing=OUTGOING)
  assert int(new_state.count) == int(state.count)
  assert (int(new_state.inner_state[0].count)
          == int(state.inner_state[0].count))
  chex.assert_trees_all_equal(new_state.hyperparams, state.hyperparams)


# ----------------------------------------------------------------------------
# outgoing maps
# ----------------------------------------------------------------------------


def test_outgoing_map_mlp():
  model, params = mlp_setup()
  assert (models.outgoing_map(params, "MLP")
          == {"fc0/kernel": "fc1/kernel", "fc1/kernel": "head/kernel"})
  dead, _ = probe_dead(model, params, X)
  set_paths = {p for p, d in trees.leaves_with_path(dead, keep_none=True)
               if d is not None}
  assert set_paths == set(models.outgoing_map(params, "mlp"))
  _, deeper = mlp_setup(depth=4)
  assert models.mlp_outgoing(deeper) == {
      "fc0/kernel": "fc1/kernel", "fc1/kernel": "fc2/kernel",
      "fc2/kernel": "fc3/kernel", "fc3/kernel": "head/kernel"}


def test_outgoing_map_vit():
  model, params, x = vit_setup()
  out = models.outgoing_map(params, "vit")
  want = {}
  for i in range(VIT_KW["depth"]):
    b = f"encoder_block_{i}/mlp"
    want[f"{b}/fc1/kernel"] = f"{b}/fc2/kernel"
    want[f"{b}/fc2/kernel"] = None
  assert out == want
  dead, _ = probe_dead(model, params, x)
  set_paths = {p for p, d in trees.leaves_with_path(dead, keep_none=True)
               if d is not None}
  assert set_paths == set(out)


def test_outgoing_map_static_argument():
  """The built maps are hashable: ``outgoing`` can be a static argument."""
  model, params = mlp_setup()
  outgoing = models.outgoing_map(params, "mlp")
  params = kill(params, "fc0", [4])
  dead, _ = probe_dead(model, params, X)
  new = RECYCLE_STATIC_JIT(params, dead, jax.random.PRNGKey(0),
                           outgoing=outgoing)
  np.testing.assert_array_equal(np.asarray(new["fc1"]["kernel"])[4], 0.0)


def test_sequential_outgoing():
  assert (redo.sequential_outgoing(["a/kernel", "b/kernel", "c"])
          == {"a/kernel": "b/kernel", "b/kernel": "c"})
  assert redo.sequential_outgoing(["a"]) == {}


def test_outgoing_map_errors():
  _, params = mlp_setup()
  with pytest.raises(ValueError, match="unknown model 'resnet'"):
    models.outgoing_map(params, "resnet")
  with pytest.raises(ValueError, match="fc1/kernel"):
    models.outgoing_map(params, "vit")
  with pytest.raises(ValueError, match="models.MLP"):
    models.outgoing_map(make_params(), "mlp")
  no_head = {k: v for k, v in params.items() if k != "head"}
  with pytest.raises(ValueError, match="head/kernel"):
    models.mlp_outgoing(no_head)


# ----------------------------------------------------------------------------
# Training after recycling
# ----------------------------------------------------------------------------


def test_training_after_recycling_is_finite_and_revives():
  """20 adamw steps after recycling: finite loss that goes down, recycled
  neurons' outgoing rows learn (they start at 0), and they are alive."""
  model, params = mlp_setup()
  params = kill(params, "fc0", [0, 3, 7])
  params = kill(params, "fc1", [1, 2])
  y = jnp.asarray(np.random.default_rng(9).integers(
      0, MLP_KW["num_classes"], X.shape[0]), jnp.int32)
  tx = optax.adamw(3e-3, weight_decay=1e-4)
  state = tx.init(params)
  dead, _ = probe_dead(model, params, X)
  outgoing = models.outgoing_map(params, "mlp")
  params, state = jax.jit(functools.partial(redo.recycle, outgoing=outgoing))(
      params, state, dead, jax.random.PRNGKey(0))

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits = model.apply({"params": p}, X, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  losses = []
  for _ in range(20):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]
  assert all(np.all(np.isfinite(np.asarray(l)))
             for l in jax.tree_util.tree_leaves((params, state)))
  fc1 = np.asarray(params["fc1"]["kernel"])
  head = np.asarray(params["head"]["kernel"])
  assert np.all(np.abs(fc1[[0, 3, 7]]).sum(-1) > 0)
  assert np.all(np.abs(head[[1, 2]]).sum(-1) > 0)
  new_dead, _ = probe_dead(model, params, X)
  assert not np.any(np.asarray(new_dead["fc0"]["kernel"])[[0, 3, 7]])
  assert not np.any(np.asarray(new_dead["fc1"]["kernel"])[[1, 2]])


# ----------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------

# Chains a [lead + (f, n)] -> b [lead + (n, m)] -> c [(m, p)]: a dense one
# with a single neuron and input, a conv-like one; few shapes so that few
# programs are compiled.
CHAIN_SHAPES = [((), 1, 1, 3, 2), ((3, 3), 2, 5, 4, 3)]


@jax.jit
def _chain_run(params, dead, key):
  new = redo.recycle_params(params, dead, key, outgoing=CHAIN_OUT)
  rec = redo.recycled_mask(params, dead, outgoing=CHAIN_OUT)
  fresh = redo.recycle_params(params, dead, key, outgoing={
      "a/kernel": None, "b/kernel": None})
  moments = jax.tree_util.tree_map(lambda x: x + 1.0, params)
  state = optax.ScaleByAdamState(count=jnp.int32(3), mu=moments, nu=moments)
  return new, rec, fresh, moments, redo.reset_moments(state, params, rec)


@st.composite
def chain_case(draw):
  """Random chain a -> b -> c with dead vectors at a and b."""
  lead, f, n, m, p = draw(st.sampled_from(CHAIN_SHAPES))
  da = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
  db = np.array(draw(st.lists(st.booleans(), min_size=m, max_size=m)))
  seed = draw(st.integers(0, 2**16))
  return lead, f, n, m, p, da, db, seed


@settings(max_examples=examples(25), **SETTINGS)
@given(case=chain_case())
def test_property_chain_invariants(case):
  """Over random shapes and dead sets: entries outside ``recycled_mask`` are
  untouched bit for bit; inside it, consumer rows and biases are 0 and the
  rest of the dead columns is the fresh draw; ``reset_moments`` is
  ``where(recycled, 0, moments)``."""
  lead, f, n, m, p, da, db, seed = case
  rng = np.random.default_rng(seed)
  params = {"a": {"kernel": rng.normal(size=lead + (f, n)).astype(np.float32),
                  "bias": rng.normal(size=(n,)).astype(np.float32)},
            "b": {"kernel": rng.normal(size=lead + (n, m)).astype(np.float32),
                  "bias": rng.normal(size=(m,)).astype(np.float32)},
            "c": {"kernel": rng.normal(size=(m, p)).astype(np.float32)}}
  dead = {"a": {"kernel": da, "bias": None}, "b": {"kernel": db, "bias": None},
          "c": {"kernel": None}}
  new, rec, fresh, moments, state = jax.tree_util.tree_map(
      lambda x: None if x is None else np.asarray(x),
      _chain_run(params, dead, jax.random.PRNGKey(seed)),
      is_leaf=trees.is_none)
  _, paths, olds, (news, recs, moms, mus, nus) = trees.aligned_leaves(
      params, new, rec, moments, state.mu, state.nu)
  for path, o, nw, r, mo, mu, nu in zip(paths, olds, news, recs, moms, mus, nus):
    r = np.zeros(o.shape, bool) if r is None else r
    assert_bitwise_equal(nw[~r], o[~r], path)
    assert_bitwise_equal(mu, np.where(r, 0.0, mo), path)
    assert_bitwise_equal(nu, np.where(r, 0.0, mo), path)
  assert np.all(new["b"]["kernel"][..., da, :] == 0)
  assert np.all(new["c"]["kernel"][db, :] == 0)
  assert np.all(new["a"]["bias"][da] == 0)
  assert np.all(new["b"]["bias"][db] == 0)
  assert_bitwise_equal(new["a"]["kernel"][..., da], fresh["a"]["kernel"][..., da])
  assert_bitwise_equal(new["b"]["kernel"][..., ~da, :][..., db],
                       fresh["b"]["kernel"][..., ~da, :][..., db])
  assert int(state.count) == 3


_PROP_MODEL, _PROP_PARAMS = mlp_setup()
_PROP_OUT = models.outgoing_map(_PROP_PARAMS, "mlp")


@jax.jit
def _prop_recycle(params, dead, key):
  return redo.recycle_params(params, dead, key, outgoing=_PROP_OUT)


@settings(max_examples=examples(25), **SETTINGS)
@given(d0=st.lists(st.booleans(), min_size=16, max_size=16),
       d1=st.lists(st.booleans(), min_size=16, max_size=16),
       seed=st.integers(0, 2**16))
def test_property_mlp_function_preserved(d0, d1, seed):
  """Any set of truly dead neurons of the MLP: recycling them leaves the
  logits unchanged."""
  params = _PROP_PARAMS
  for layer, d in (("fc0", d0), ("fc1", d1)):
    if any(d):
      params = kill(params, layer, np.flatnonzero(d))
  dead = jax.tree_util.tree_map(lambda _: None, params)
  dead["fc0"]["kernel"] = np.asarray(d0)
  dead["fc1"]["kernel"] = np.asarray(d1)
  new = _prop_recycle(params, dead, jax.random.PRNGKey(seed))
  np.testing.assert_allclose(apply(_PROP_MODEL, new, X),
                             apply(_PROP_MODEL, params, X),
                             rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


def call_recycle(params=None, dead=None, outgoing=None, **kw):
  """``recycle_params`` of the shared set-up with the given parts replaced."""
  params = make_params() if params is None else params
  dead = make_dead() if dead is None else dead
  outgoing = OUTGOING if outgoing is None else outgoing
  return redo.recycle_params(params, dead, jax.random.PRNGKey(0),
                             outgoing=outgoing, **kw)


def test_dead_structure():
  dead = make_dead()
  del dead["norm"]
  with pytest.raises(ValueError, match=r"norm/scale"):
    call_recycle(dead=dead)
  with pytest.raises(TypeError, match="dead must be a tree"):
    redo.recycle_params(make_params(), None, jax.random.PRNGKey(0),
                        outgoing=OUTGOING)


def test_dead_length_and_dtype():
  dead = make_dead()
  dead["fc"]["kernel"] = jnp.zeros((5,), bool)
  with pytest.raises(ValueError,
                     match=r"dead\[fc/kernel\] has shape \(5,\)"):
    call_recycle(dead=dead)
  dead["fc"]["kernel"] = jnp.zeros((6,), jnp.int32)
  with pytest.raises(TypeError, match=r"dead\[fc/kernel\].*bool"):
    call_recycle(dead=dead)


def test_outgoing_paths():
  with pytest.raises(ValueError, match="'fc/kernal' is not a path"):
    call_recycle(outgoing={**OUTGOING, "fc/kernal": None})
  with pytest.raises(ValueError,
                     match=r"outgoing\['fc/kernel'\] = 'hed/kernel'"):
    call_recycle(outgoing={**OUTGOING, "fc/kernel": "hed/kernel"})
  with pytest.raises(ValueError, match=r"params\[fc/bias\] has shape"):
    call_recycle(outgoing={**OUTGOING, "fc/bias": None})
  with pytest.raises(TypeError, match="outgoing must be a mapping"):
    call_recycle(outgoing=[("fc/kernel", "head/kernel")])
  with pytest.raises(TypeError, match=r"outgoing\['fc/kernel'\]"):
    call_recycle(outgoing={**OUTGOING, "fc/kernel": 3})


def test_outgoing_axis_mismatch():
  with pytest.raises(
      ValueError, match=r"outgoing\['conv/kernel'\] = 'head/kernel'.*\(6, 3\)"
      ".*4 neurons of conv/kernel"):
    call_recycle(outgoing={**OUTGOING, "conv/kernel": "head/kernel"})


def test_dead_without_outgoing_entry():
  with pytest.raises(ValueError, match=r"dead\[fc/kernel\] is set but "
                     "outgoing has no entry"):
    call_recycle(outgoing={"conv/kernel": "fc/kernel"})


def test_bias_shape():
  params = make_params()
  params["fc"]["bias"] = jnp.zeros((5,))
  with pytest.raises(ValueError, match=r"params\[fc/bias\] has shape"):
    call_recycle(params=params)


def test_init_fn_and_key():
  with pytest.raises(ValueError, match="no initializer.*'fc/kernel'"):
    call_recycle(init_fn={"conv/kernel": nn.initializers.zeros})
  with pytest.raises(TypeError, match="must be callable"):
    call_recycle(init_fn=3.0)
  with pytest.raises(TypeError, match="PRNG key"):
    redo.recycle_params(make_params(), make_dead(), None, outgoing=OUTGOING)


def test_masks_and_recycled():
  masks = jax.tree_util.tree_map(lambda _: None, make_params())
  masks["fc"]["kernel"] = jnp.ones((4, 5), bool)
  with pytest.raises(ValueError, match=r"masks\[fc/kernel\] has shape"):
    call_recycle(masks=masks)
  params = make_params()
  state = optax.adam(1e-3).init(params)
  rec = redo.recycled_mask(params, make_dead(), outgoing=OUTGOING)
  bad = dict(rec, head={"kernel": jnp.ones((3, 3), bool), "bias": None})
  with pytest.raises(ValueError, match=r"recycled\[head/kernel\] has shape"):
    redo.reset_moments(state, params, bad)
  bad = dict(rec, head={"kernel": jnp.ones((6, 3)), "bias": None})
  with pytest.raises(TypeError, match=r"recycled\[head/kernel\].*bool"):
    redo.reset_moments(state, params, bad)
  bad = {k: v for k, v in rec.items() if k != "norm"}
  with pytest.raises(ValueError, match="recycled"):
    redo.reset_moments(state, params, bad)
