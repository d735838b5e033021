"""Outgoing kernels found from the model's jaxpr (``remedies.find_outgoing``)
equal the hand-written maps, and recycling exactly dead neurons with the
found map leaves the outputs bit-identical."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synstrip_jax import redo, remedies, trees
from synstrip_vit import models
from _shared import assert_bitwise_equal
from conftest import linen_variables, nnx_model, normal


class LinenCNN(nn.Module):
  """The Flax examples' MNIST CNN."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(features=64, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=256)(x))
    return nn.Dense(features=10)(x)


class NNXCNN(nnx.Module):
  """The Flax NNX MNIST tutorial's CNN (narrower)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.avg_pool = lambda x: nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(7 * 7 * 16, 32, rngs=rngs)
    self.linear2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.conv1(x)))
    x = self.avg_pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    return self.linear2(nnx.relu(self.linear1(x)))


class ResNetBlock(nn.Module):
  """A stem and one residual block (conv-BN-ReLU-conv-BN + shortcut)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    y = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(y))
    y = nn.Conv(8, (3, 3), use_bias=False, name="conv2")(y)
    y = nn.BatchNorm(use_running_average=True, name="bn2")(y)
    x = nn.relu(x + y)
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


def _linen_case(name):
  if name == "mlp":
    model = models.create_model("mlp", width=16, depth=2,
                                num_classes=4)
    x = normal((8, 6), 0)
    kw = {"train": False}
  elif name == "vit":
    model = models.create_model("vit", num_classes=3, patch_size=4,
                                hidden_size=8, depth=2, num_heads=2, mlp_dim=16)
    x = normal((4, 8, 8, 3), 0)
    kw = {"train": False}
  elif name == "cnn":
    model, kw = LinenCNN(), {}
    x = normal((2, 28, 28, 1), 0)
  else:
    model, kw = ResNetBlock(), {}
    x = normal((2, 8, 8, 3), 0)
  variables = linen_variables(model, 0, x, **kw)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  apply = lambda p, x: model.apply({"params": p, **rest}, x, **kw)
  return apply, params, x


HAND = {
    "cnn": {"Conv_0/kernel": "Conv_1/kernel", "Conv_1/kernel": None,
            "Dense_0/kernel": "Dense_1/kernel", "Dense_1/kernel": None},
    "resnet": {"stem/kernel": None, "conv1/kernel": "conv2/kernel",
               "conv2/kernel": None, "head/kernel": None},
}


@pytest.mark.parametrize("name", [
    "mlp", pytest.param("vit", marks=pytest.mark.slow), "cnn",
    pytest.param("resnet", marks=pytest.mark.slow)])
def test_linen_found_equals_hand_written(name):
  apply, params, x = _linen_case(name)
  found = remedies.find_outgoing(apply, params, x)
  if name in ("mlp", "vit"):
    hand = dict(models.outgoing_map(params, name))
    assert {k: found.outgoing[k] for k in hand} == hand
    # Every other kernel found writes to the residual stream or the output.
    assert all(found.outgoing[k] is None for k in found.outgoing if k not in hand)
  else:
    assert dict(found.outgoing) == HAND[name]
  for k, v in found.outgoing.items():
    assert (v is None) == (k in found.reasons)
  if name == "resnet":
    assert "residual" in found.reasons["conv2/kernel"]
    assert "residual" in found.reasons["stem/kernel"]
  if name == "cnn":
    assert "flattened" in found.reasons["Conv_1/kernel"]


def _nnx_case():
  model = nnx_model(lambda: NNXCNN(rngs=nnx.Rngs(0)), 0)
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(state)

  def apply(p, x):
    s = jax.tree_util.tree_map(lambda a: a, state)
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s, rest)(x)
  x = normal((2, 28, 28, 1), 0)
  return apply, params, x


@pytest.mark.slow
def test_nnx_found_equals_hand_written():
  apply, params, x = _nnx_case()
  found = remedies.find_outgoing(apply, params, x)
  assert dict(found.outgoing) == {
      "conv1/kernel": "conv2/kernel", "conv2/kernel": None,
      "linear1/kernel": "linear2/kernel", "linear2/kernel": None}


@pytest.mark.parametrize("name, layer, bias_of", [
    ("mlp", "fc0", "fc0"),
    pytest.param("vit", "encoder_block_0/mlp/fc1", None,
                 marks=pytest.mark.slow),
    pytest.param("cnn", "Conv_0", "Conv_0", marks=pytest.mark.slow),
    ("resnet", "conv1", "bn1"),
    pytest.param("nnx", "conv1", "conv1", marks=pytest.mark.slow)])
def test_recycling_dead_neurons_is_bit_identical(name, layer, bias_of):
  apply, params, x = _nnx_case() if name == "nnx" else _linen_case(name)
  found = remedies.find_outgoing(apply, params, x)
  params = jax.tree_util.tree_map(lambda a: a, params)
  node = params
  for part in (bias_of or layer).split("/"):
    node = node[part]
  node["bias"] = node["bias"].at[np.asarray([0, 2])].set(-100.0)
  kernel_path = f"{layer}/kernel"
  n = np.shape(_get(params, kernel_path))[-1]
  dead_vec = jnp.zeros((n,), bool).at[np.asarray([0, 2])].set(True)
  dead = jax.tree_util.tree_map_with_path(
      lambda p, _: dead_vec if trees.path_str(p) == kernel_path else None, params)
  assert found.outgoing[kernel_path] is not None
  new = redo.recycle_params(params, dead, jax.random.key(5),
                            outgoing={kernel_path: found.outgoing[kernel_path]})
  assert not np.array_equal(_get(new, kernel_path), _get(params, kernel_path))
  assert_bitwise_equal(jax.jit(apply)(new, x), jax.jit(apply)(params, x))


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree
