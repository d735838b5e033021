"""Tests of synstrip_vit.models.

Tiny configs; the default ViT is only checked abstractly (jax.eval_shape).
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import init_key, linen_variables, normal

from synstrip_jax import linen as ss_linen, probe
from synstrip_vit import models
from synstrip_vit.models import (MLP, ViT, create_model, gelu_exact,
                                 get_activation)

TINY = dict(num_classes=10, patch_size=4, hidden_size=32, depth=2,
            num_heads=4, mlp_dim=64)


def _images(b=4, h=8, w=8, c=3, seed=0):
  return normal((b, h, w, c), seed)


def _init(model, x):
  """``model``'s params from its own initializers."""
  return model.init(init_key(1), x, train=False)["params"]


def _params(model, x):
  """Arbitrary params of ``model``'s shapes (``conftest.linen_variables``)."""
  return linen_variables(model, 1, x, train=False)["params"]


@pytest.fixture(scope="module")
def tiny():
  """(images [4, 8, 8, 3], arbitrary params of ViT(**TINY)), made once."""
  x = _images()
  return x, _params(ViT(**TINY), x)


def _flat(tree):
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def _dead(model, params, x):
  _, state = model.apply({"params": params}, x, train=False,
                         mutable=[ss_linen.ACTIVATIONS])
  stats = probe.reduce_stats_tree(ss_linen.linen_stats(state))
  return probe.dead_tree(params, stats), state


def _set(params, path, fn):
  flat = _flat(params)
  flat[path] = fn(flat[path])
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------- ViT

def test_vit_output_shape_and_dtype(tiny):
  model = ViT(**TINY)
  x, params = tiny
  y = model.apply({"params": params}, x, train=False)
  assert y.shape == (4, 10) and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))
  # non-square images: grid 2x3 -> 7 tokens (checked abstractly)
  x2 = jax.ShapeDtypeStruct((2, 8, 12, 1), jnp.float32)
  v2 = jax.eval_shape(lambda k, x: model.init(k, x, train=False),
                      jax.random.key(0), x2)
  assert v2["params"]["pos_embedding"].shape == (1, 7, 32)
  assert v2["params"]["patch_embed"]["kernel"].shape == (4, 4, 1, 32)
  y2 = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                      {"params": v2["params"]}, x2)
  assert y2.shape == (2, 10) and y2.dtype == jnp.float32


def test_vit_param_tree_of_a_block(tiny):
  _, params = tiny
  flat = {k: v.shape for k, v in _flat(params).items()}
  assert flat["patch_embed/kernel"] == (4, 4, 3, 32)
  assert flat["cls_token"] == (1, 1, 32)
  assert flat["pos_embedding"] == (1, 5, 32)
  blk = {k[len("encoder_block_0/"):]: v for k, v in flat.items()
         if k.startswith("encoder_block_0/")}
  assert blk == {
      "ln1/scale": (32,), "ln1/bias": (32,),
      "attn/query/kernel": (32, 4, 8), "attn/query/bias": (4, 8),
      "attn/key/kernel": (32, 4, 8), "attn/key/bias": (4, 8),
      "attn/value/kernel": (32, 4, 8), "attn/value/bias": (4, 8),
      "attn/out/kernel": (4, 8, 32), "attn/out/bias": (32,),
      "ln2/scale": (32,), "ln2/bias": (32,),
      "mlp/fc1/kernel": (32, 64), "mlp/fc1/bias": (64,),
      "mlp/fc2/kernel": (64, 32), "mlp/fc2/bias": (32,),
  }
  assert flat["head_norm/scale"] == (32,)
  assert flat["head/kernel"] == (32, 10)
  assert {k.split("/")[0] for k in flat} == {
      "patch_embed", "cls_token", "pos_embedding", "encoder_block_0",
      "encoder_block_1", "head_norm", "head"}
  for v in jax.tree_util.tree_leaves(params):
    assert v.dtype == jnp.float32


def test_default_vit_shapes_via_eval_shape():
  model = ViT(num_classes=10)
  assert (model.patch_size, model.hidden_size, model.depth, model.num_heads,
          model.mlp_dim, model.activation, model.dropout) == (
              4, 384, 7, 8, 1536, "relu", 0.0)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
  flat = {k: v.shape for k, v in _flat(variables["params"]).items()}
  blocks = sorted({k.split("/")[0] for k in flat
                   if k.startswith("encoder_block_")})
  assert blocks == [f"encoder_block_{i}" for i in range(7)]
  for b in blocks:
    assert flat[f"{b}/mlp/fc1/kernel"] == (384, 1536)
    assert flat[f"{b}/mlp/fc2/kernel"] == (1536, 384)
    assert flat[f"{b}/attn/query/kernel"] == (384, 8, 48)
  assert flat["pos_embedding"] == (1, 65, 384)  # 8x8 patches + cls
  assert flat["patch_embed/kernel"] == (4, 4, 3, 384)
  d, m = 384, 1536
  per_block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
  expected = ((4 * 4 * 3 * d + d) + d + 65 * d + 7 * per_block
              + 2 * d + (d * 10 + 10))
  n = sum(math.prod(s) for s in flat.values())
  assert n == expected == 12_470_026
  # the abstract apply sows exactly the 14 MLP layers
  out, state = jax.eval_shape(
      lambda v, x: model.apply({"params": v["params"]}, x, train=False,
                               mutable=["activations"]), variables, x)
  assert out.shape == (2, 10)
  layers = probe.stats_by_layer(state["activations"])
  assert sorted(layers) == sorted(
      f"encoder_block_{i}/mlp/fc{j}" for i in range(7) for j in (1, 2))


def test_vit_sows_exactly_both_mlp_layers_and_dead_tree_aligns(tiny):
  model = ViT(**TINY)
  x, params = tiny
  dead, state = _dead(model, params, x)
  assert set(state) == {"activations"}
  layers = probe.stats_by_layer(ss_linen.linen_stats(state))
  expected = {f"encoder_block_{i}/mlp/fc{j}" for i in range(2) for j in (1, 2)}
  assert set(layers) == expected
  for name, s in layers.items():
    n = 64 if name.endswith("fc1") else 32
    assert s.total.shape == (4, n)  # per example
  flat_dead = traverse_util.flatten_dict(dead, sep="/")
  assert set(flat_dead) == set(_flat(params))
  for path, leaf in flat_dead.items():
    if path.endswith("/kernel") and path[: -len("/kernel")] in expected:
      n = 64 if "fc1" in path else 32
      assert leaf.dtype == jnp.bool_ and leaf.shape == (n,), path
    else:
      assert leaf is None, path
  targets = traverse_util.flatten_dict(
      probe.target_tree(params, ss_linen.linen_stats(state)), sep="/")
  assert {p for p, t in targets.items() if t} == {
      e + "/kernel" for e in expected}


def test_vit_forced_dead_neurons_are_detected(tiny):
  model = ViT(**TINY)
  x, params = tiny
  dead0, _ = _dead(model, params, x)
  j1, j2 = 5, 7
  assert not bool(dead0["encoder_block_0"]["mlp"]["fc1"]["kernel"][j1])
  assert not bool(dead0["encoder_block_1"]["mlp"]["fc2"]["kernel"][j2])
  p = _set(params, "encoder_block_0/mlp/fc1/bias", lambda b: b.at[j1].set(-1e4))
  p = _set(p, "encoder_block_0/mlp/fc1/kernel", lambda k: k.at[:, j1].set(0.0))
  p = _set(p, "encoder_block_1/mlp/fc2/bias", lambda b: b.at[j2].set(-1e4))
  p = _set(p, "encoder_block_1/mlp/fc2/kernel", lambda k: k.at[:, j2].set(0.0))
  dead, _ = _dead(model, p, x)
  d1 = np.asarray(dead["encoder_block_0"]["mlp"]["fc1"]["kernel"])
  d2 = np.asarray(dead["encoder_block_1"]["mlp"]["fc2"]["kernel"])
  assert d1[j1] and d2[j2]
  base1 = np.asarray(dead0["encoder_block_0"]["mlp"]["fc1"]["kernel"])
  base2 = np.asarray(dead0["encoder_block_1"]["mlp"]["fc2"]["kernel"])
  assert np.array_equal(np.flatnonzero(d1 & ~base1), [j1])
  assert np.array_equal(np.flatnonzero(d2 & ~base2), [j2])


def test_vit_gelu_variant_and_exact_gelu(tiny):
  model = ViT(**TINY, activation="gelu")
  x, params = tiny
  y, state = model.apply({"params": params}, x, train=False,
                         mutable=["activations"])
  assert y.shape == (4, 10) and bool(jnp.all(jnp.isfinite(y)))
  assert len(probe.stats_by_layer(state["activations"])) == 4
  # differs from the relu model with the same params
  y_relu = ViT(**TINY).apply({"params": params}, x, train=False)
  assert not np.allclose(np.asarray(y), np.asarray(y_relu))
  # 'gelu' is the exact erf GELU (torch's nn.GELU() default), not tanh.
  assert get_activation("gelu") is gelu_exact
  assert get_activation("GELU") is gelu_exact
  t = np.linspace(-6.0, 6.0, 1001)
  ref = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in t])
  got = np.asarray(jax.jit(gelu_exact)(jnp.asarray(t, jnp.float32)),
                   np.float64)
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  tanh = np.asarray(jax.nn.gelu(jnp.asarray(t, jnp.float32), approximate=True))
  assert np.max(np.abs(tanh - ref)) > 1e-4  # the two are distinguishable


@pytest.mark.slow
def test_vit_dropout_only_in_training(tiny):
  model = ViT(**TINY, dropout=0.5)
  x, params = tiny
  v = {"params": params}
  e1 = model.apply(v, x, train=False)
  e2 = model.apply(v, x, train=False)
  np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
  t1 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
  t1b = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
  t2 = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(t1), np.asarray(t1b))
  assert not np.allclose(np.asarray(t1), np.asarray(t2))
  assert not np.allclose(np.asarray(t1), np.asarray(e1))
  with pytest.raises(flax.errors.InvalidRngError):
    model.apply(v, x, train=True)
  # dropout=0 needs no rng even when training, and equals eval mode
  m0 = ViT(**TINY)
  np.testing.assert_array_equal(
      np.asarray(m0.apply(v, x, train=True)),
      np.asarray(m0.apply(v, x, train=False)))


@pytest.mark.slow
def test_vit_bf16_computes_with_float32_params(tiny):
  model = ViT(**TINY, dtype=jnp.bfloat16)
  x, params32 = tiny
  params = _init(model, x)
  assert jax.tree_util.tree_structure(params) == (
      jax.tree_util.tree_structure(params32))
  for leaf in jax.tree_util.tree_leaves(params):
    assert leaf.dtype == jnp.float32
  y, state = model.apply({"params": params}, x, train=False,
                         capture_intermediates=True,
                         mutable=["intermediates", "activations"])
  assert y.dtype == jnp.float32
  inter = state["intermediates"]
  assert inter["encoder_block_0"]["__call__"][0].dtype == jnp.bfloat16
  assert inter["encoder_block_0"]["mlp"]["fc1"]["__call__"][0].dtype == (
      jnp.bfloat16)
  y32 = ViT(**TINY).apply({"params": params32}, x, train=False)
  y = model.apply({"params": params32}, x, train=False)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y32), atol=0.1,
                             rtol=0.1)
  stats = probe.reduce_stats_tree(state["activations"])
  dead = probe.dead_tree(params, stats)
  assert dead["encoder_block_1"]["mlp"]["fc2"]["kernel"].shape == (32,)


def test_vit_attn_scale(tiny):
  x, params = tiny
  v = {"params": params}
  y = ViT(**TINY).apply(v, x, train=False)
  y_std = ViT(**TINY, attn_scale=1 / math.sqrt(8)).apply(v, x, train=False)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_std), rtol=1e-5,
                             atol=1e-5)
  y_other = ViT(**TINY, attn_scale=1 / math.sqrt(32)).apply(v, x, train=False)
  assert not np.allclose(np.asarray(y), np.asarray(y_other))


@pytest.mark.slow
def test_vit_jit_and_grad(tiny):
  model = ViT(**TINY)
  x, params = tiny

  @jax.jit
  def loss(p):
    return jnp.mean(model.apply({"params": p}, x, train=False) ** 2)

  g = jax.grad(loss)(params)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(params)
  assert float(jnp.abs(g["encoder_block_0"]["mlp"]["fc1"]["kernel"]).sum()) > 0


def test_vit_errors(tiny):
  x, _ = tiny
  with pytest.raises(ValueError, match="patch_size"):
    ViT(**{**TINY, "patch_size": 3}).init(init_key(0), x, train=False)
  with pytest.raises(ValueError, match="divisible"):
    ViT(**TINY).init(init_key(0), _images(1, 8, 10), train=False)
  with pytest.raises(ValueError, match="num_heads"):
    ViT(**{**TINY, "num_heads": 5})
  with pytest.raises(ValueError, match="activation"):
    ViT(**TINY, activation="swish")
  with pytest.raises(ValueError, match="dropout"):
    ViT(**TINY, dropout=1.0)
  with pytest.raises(ValueError, match="depth"):
    ViT(**{**TINY, "depth": 0})
  with pytest.raises(ValueError, match="B, H, W, C"):
    ViT(**TINY).init(init_key(0), jnp.ones((2, 8, 8)), train=False)


# ----------------------------------------------------------------------- MLP

@pytest.mark.parametrize("depth,width", [
    (1, 16), pytest.param(3, 8, marks=pytest.mark.slow)])
def test_mlp_shapes_and_sown_layers(depth, width):
  model = MLP(num_classes=5, width=width, depth=depth)
  x = _images(3, 4, 4, 2)
  params = _params(model, x)
  flat = {k: v.shape for k, v in _flat(params).items()}
  assert flat["fc0/kernel"] == (32, width)
  for i in range(1, depth):
    assert flat[f"fc{i}/kernel"] == (width, width)
  assert flat["head/kernel"] == (width, 5)
  y, state = model.apply({"params": params}, x, train=True,
                         mutable=["activations"])
  assert y.shape == (3, 5) and y.dtype == jnp.float32
  layers = probe.stats_by_layer(state["activations"])
  assert sorted(layers) == [f"fc{i}" for i in range(depth)]
  dead = traverse_util.flatten_dict(
      probe.dead_tree(
          params, probe.reduce_stats_tree(state["activations"])),
      sep="/")
  for path, leaf in dead.items():
    if path in {f"fc{i}/kernel" for i in range(depth)}:
      assert leaf.shape == (width,) and leaf.dtype == jnp.bool_
    else:
      assert leaf is None, path


def test_mlp_dead_neuron_and_bf16():
  model = MLP(num_classes=3, width=16, depth=2, dtype=jnp.bfloat16)
  x = _images(8, 4, 4, 1)
  params = _params(model, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
  p = _set(params, "fc0/bias", lambda b: b.at[3].set(-1e4))
  p = _set(p, "fc0/kernel", lambda k: k.at[:, 3].set(0.0))
  dead, _ = _dead(model, p, x)
  assert bool(dead["fc0"]["kernel"][3])
  assert MLP(3, width=16, depth=2, activation="gelu").apply(
      {"params": params}, x, train=False).shape == (8, 3)
  # Leaky ReLU never outputs an exact 0 sum: the same forced neuron is alive.
  leaky = MLP(num_classes=3, width=16, depth=2, activation="leaky_relu")
  dead, _ = _dead(leaky, p, x)
  assert not bool(dead["fc0"]["kernel"][3])
  assert get_activation("leaky_relu") is jax.nn.leaky_relu


# --------------------------------------------------------------- factories

def test_create_model_and_get_activation():
  vit = create_model("vit", **TINY)
  assert isinstance(vit, ViT) and vit.depth == 2
  mlp = create_model("MLP", num_classes=4, width=8)
  assert isinstance(mlp, MLP) and mlp.width == 8
  with pytest.raises(ValueError, match=r"resnet.*\['mlp', 'vit'\]"):
    create_model("resnet", num_classes=10)
  assert get_activation("relu") is jax.nn.relu
  fn = lambda a: a
  assert get_activation(fn) is fn
  with pytest.raises(ValueError, match="tanhh"):
    get_activation("tanhh")


@pytest.mark.parametrize("name", [
    "mlp", pytest.param("vit", marks=pytest.mark.slow)])
def test_registry_builds_the_model_and_its_outgoing_map(name):
  """One registry: a name's class is what create_model builds, and its
  outgoing builder is what outgoing_map applies to that model's params."""
  kwargs = TINY if name == "vit" else {"num_classes": 4, "width": 8}
  model = create_model(name.upper(), **kwargs)
  spec = models.model_spec(name)
  assert type(model) is spec.cls  # pylint: disable=unidiomatic-typecheck
  params = _params(model, jnp.zeros((1, 8, 8, 3)))
  outgoing = models.outgoing_map(params, name)
  assert outgoing and outgoing == spec.outgoing(params)


def test_registry_names_the_known_models():
  assert sorted(models.MODELS) == ["mlp", "vit"]
  with pytest.raises(ValueError, match=r"resnet.*\['mlp', 'vit'\]"):
    models.model_spec("resnet")


# --------------------------------------------------------------- bias init

@pytest.mark.slow
def test_bias_init_sets_only_the_strippable_layers(tiny):
  x, _ = tiny
  params = _init(ViT(**TINY), x)
  vit = _flat(_init(ViT(**TINY, bias_init=-0.25), x))
  for path, leaf in vit.items():
    if "/mlp/fc" in path and path.endswith("/bias"):
      np.testing.assert_array_equal(leaf, np.full(leaf.shape, -0.25))
    elif path.endswith("/bias"):  # attention, norms, head: unchanged
      np.testing.assert_array_equal(leaf, _flat(params)[path])
  mlp = MLP(num_classes=3, width=8, depth=2, bias_init=-1.0)
  flat = _flat(_init(mlp, _images(2, 4, 4, 1)))
  assert (flat["fc0/bias"] == -1.0).all() and (flat["fc1/bias"] == -1.0).all()
  assert (flat["head/bias"] == 0.0).all()
  # 0 (the default) is flax's zeros initializer: the default tree unchanged.
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: bool((a == b).all()), _init(ViT(**TINY, bias_init=0.0), x),
      params))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.1", True])
def test_bias_init_rejects_non_numbers(value):
  with pytest.raises(ValueError, match="bias_init"):
    MLP(num_classes=3, bias_init=value)
  with pytest.raises(ValueError, match="bias_init"):
    ViT(**TINY, bias_init=value)


def test_negative_bias_init_kills_neurons():
  x = _images(8, 4, 4, 1)  # the shapes of test_mlp_dead_neuron_and_bf16
  model = MLP(num_classes=3, width=16, depth=2, bias_init=-100.0)
  dead, _ = _dead(model, _init(model, x), x)
  assert bool(dead["fc0"]["kernel"].all())
  model = MLP(num_classes=3, width=16, depth=2)
  dead, _ = _dead(model, _init(model, x), x)
  assert not bool(dead["fc0"]["kernel"].any())


def test_vit_jax_attention_matches_flax_attention(tiny):
  """attention='jax' (jax.nn.dot_product_attention) computes what Flax's
  attention computes, with the same parameters, also with attn_scale."""
  x, params = tiny
  for scale in (None, 0.3):
    want = ViT(**TINY, attn_scale=scale).apply({"params": params}, x,
                                               train=False)
    got = ViT(**TINY, attn_scale=scale, attention="jax").apply(
        {"params": params}, x, train=False)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="attention.*'torch'"):
    ViT(**TINY, attention="torch")
