"""Layer selection and targets that cannot silently go wrong (Linen and NNX).

A module held under two attributes, ``select`` lists with an entry that
matches nothing, targets built from shapes only, and the NNX trees that
``dead_tree``/``dead_counts``/``strip_event`` take and give. Tiny models.
"""

import functools
import re
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import synstrip_jax as ss
from synstrip_jax import linen as ss_linen, probe
from synstrip_jax import nnx as ss_nnx
from _shared import REPO
from conftest import host_normal, init_key, linen_variables, nnx_model, normal

sys.path.insert(0, str(REPO / "docs" / "examples"))
from flax_mnist_linen import CNN as LinenCNN  # noqa: E402  pylint: disable=wrong-import-position
from nnx_mnist_tutorial import CNN as TutorialCNN  # noqa: E402  pylint: disable=wrong-import-position


class SharedNNX(nnx.Module):
  """``fc1`` is also reachable as ``alias``; the model calls both."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(4, 3, rngs=rngs)
    self.alias = self.fc1
    self.out = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x, y):
    return self.out(nnx.relu(self.fc1(x)) + nnx.relu(self.alias(y)))


def _shared_stats(model, batch):
  return ss_nnx.capture_stats(model, batch["x"], batch["y"], select="alias")[1]


@pytest.mark.slow
def test_nnx_shared_module_probe_matches_eager_capture():
  model = nnx_model(lambda: SharedNNX(nnx.Rngs(0)), 0)
  # x drives every neuron positive, y none: the neurons are alive only
  # through the fc1 calls.
  w = np.asarray(model.fc1.kernel[...])
  x = np.tile(np.linalg.pinv(w.T) @ np.ones(3, np.float32), (5, 1))
  y = -x
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}
  eager = probe.dead_tree(nnx.state(model, nnx.Param),
                          probe.reduce_stats_tree(_shared_stats(model, batch)))
  probed = probe.probe_dead(_shared_stats, model, [batch])
  expect = (np.maximum(x @ w + np.asarray(model.fc1.bias[...]), 0).sum(0)
            + np.maximum(y @ w + np.asarray(model.fc1.bias[...]), 0).sum(0)
            ) == 0
  assert not expect.any()
  np.testing.assert_array_equal(np.asarray(eager["alias"]["kernel"]), expect)
  np.testing.assert_array_equal(np.asarray(probed["alias"]["kernel"]), expect)


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(4, name="fc1")(x))
    x = nn.relu(nn.Dense(4, name="fc2")(x))
    return nn.Dense(2, name="head")(x)


class TwoLinear(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(3, 4, rngs=rngs)
    self.fc2 = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


@pytest.mark.parametrize("select", [["fc1", "fc_2"], ["fc*", "nope*"]])
def test_select_list_entry_matching_nothing_is_an_error(select):
  x = jnp.ones((2, 3))
  model = TwoDense()
  variables = linen_variables(model, 0, x)
  bad = re.escape(f"select entries {[select[1]]}")
  with pytest.raises(ValueError, match=bad):
    ss_linen.capture_stats(model, variables, x, select=select)
  with pytest.raises(ValueError, match=bad):
    ss_nnx.capture_stats(nnx_model(lambda: TwoLinear(nnx.Rngs(0)), 0), x, select=select)


class BNDropCNN(nnx.Module):
  """Conv -> BatchNorm -> ReLU -> Dropout -> Linear, as the NNX tutorial."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = self.dropout(nnx.relu(self.bn1(self.conv1(x))))
    return self.fc(x.mean(axis=(1, 2)))


def _snapshot(model):
  """Every array of the model's state (RNG keys as their data) in numpy."""
  def leaf(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    return np.asarray(a)
  return jax.tree.map(leaf, nnx.as_pure(nnx.state(model)))


def test_nnx_targets_from_shapes_update_nothing():
  model = BNDropCNN(nnx.Rngs(init_key(0)))
  before = _snapshot(model)
  x = jax.ShapeDtypeStruct((2, 6, 6, 1), jnp.float32)
  targets = ss_nnx.targets(model, x, select={"bn1": "conv1"})
  flat = {k: v for k, v in nnx.as_pure(targets).flat_state()}
  assert [k for k, v in flat.items() if v] == [("conv1", "kernel")]
  after = _snapshot(model)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  nnx.Optimizer(model, ss.with_stripping(optax.sgd(0.1), targets),
                wrt=nnx.Param)


class BNCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(2, name="fc")(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("train", [False, True])
def test_linen_targets_from_shapes(train):
  model = BNCNN()
  x = jnp.ones((2, 6, 6, 1))
  variables = jax.eval_shape(
      lambda: model.init(init_key(0), x, train=False))
  kwargs = {"rngs": {"dropout": jax.random.PRNGKey(1)}} if train else {}
  targets = ss_linen.targets(model, variables, x, train=train,
                             select={"bn1": "conv1"}, **kwargs)
  assert jax.tree.structure(targets) == jax.tree.structure(variables["params"])
  assert targets["conv1"]["kernel"] is True
  assert targets["fc"]["kernel"] is False and targets["bn1"]["scale"] is False


def test_linen_variables_as_params_error_names_params_argument():
  model = BNCNN()
  x = jnp.ones((2, 6, 6, 1))
  variables = linen_variables(model, 0, x, train=False)
  fn = lambda v, b: ss_linen.capture_stats(model, v, b, train=False,
                                           select={"bn1": "conv1"})[1]
  with pytest.raises(ValueError, match=r"params=variables\['params'\]"):
    probe.probe_dead(fn, variables, [x])
  dead = probe.probe_dead(fn, variables, [x], params=variables["params"])
  assert dead["conv1"]["kernel"].shape == (4,)


def test_nnx_dead_plain_arrays_and_same_counts_keys_as_linen():
  x = normal((8, 3), 0)
  model = nnx_model(lambda: TwoLinear(nnx.Rngs(0)), 0)
  stats = probe.reduce_stats_tree(
      ss_nnx.capture_stats(model, x, select="fc*")[1])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dead = probe.dead_tree(nnx.state(model, nnx.Param), stats)
    leaves = jax.tree.leaves(dead)
    assert all(isinstance(l, jax.Array) for l in leaves) and len(leaves) == 2
    counts = ss.dead_counts(dead)
  assert sorted(counts) == ["fc1/kernel", "fc2/kernel"]
  lin = TwoDense()
  variables = linen_variables(lin, 0, x)
  lstats = probe.reduce_stats_tree(
      ss_linen.capture_stats(lin, variables, x, select="fc*")[1])
  assert sorted(ss.dead_counts(probe.dead_tree(variables["params"], lstats))
                ) == sorted(counts)
  # a dead tree with Param leaves gives the same keys too
  param_dead = jax.tree.map(lambda p, d: p.replace(d),
                            nnx.state(model, nnx.Param), dead,
                            is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert sorted(ss.dead_counts(param_dead)) == sorted(counts)


def test_strip_event_on_nnx_state_points_at_nnx_strip():
  model = nnx_model(lambda: TwoLinear(nnx.Rngs(0)), 0)
  targets = ss_nnx.targets(model, jnp.ones((2, 3)), select="fc*")
  opt = nnx.Optimizer(model, ss.with_stripping(optax.sgd(0.1), targets),
                      wrt=nnx.Param)
  dead = jax.tree.map(lambda t: None, targets)
  with pytest.raises(TypeError, match="synstrip_jax.nnx.strip"):
    ss.strip_event(nnx.state(model, nnx.Param), opt.opt_state, dead)


@pytest.mark.parametrize("inner", [optax.sgd(0.1, momentum=0.9),
                                   optax.adamw(1e-2)])
def test_with_stripping_is_bit_identical_to_inner_while_masks_are_true(inner):
  rng = np.random.default_rng(0)
  p = {"d": {"kernel": host_normal(rng, (8, 16)),
             "bias": jnp.zeros(16)},
       "o": {"kernel": host_normal(rng, (16, 3))}}
  x = host_normal(rng, (32, 8))
  loss = lambda q: jnp.mean(
      (jax.nn.relu(x @ q["d"]["kernel"] + q["d"]["bias"]) @ q["o"]["kernel"])
      ** 2)
  targets = {"d": {"kernel": True, "bias": False}, "o": {"kernel": True}}

  def run(tx):
    q, s = p, tx.init(p)
    for _ in range(5):
      u, s = tx.update(jax.grad(loss)(q), s, q)
      q = optax.apply_updates(q, u)
    return q

  a, b = run(inner), run(ss.with_stripping(inner, targets))
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ------------------------------------------- selections checked on the jaxpr

class ResNetBlock(nn.Module):
  """ResNet block (after flax/examples/imagenet/models.py)."""
  filters: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    residual = x
    y = nn.Conv(self.filters, (3, 3), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = nn.Conv(self.filters, (3, 3), name="conv2")(y)
    y = norm(name="bn2")(y)
    return nn.relu(residual + y)


def _linen_keys(model, x, select, **kwargs):
  variables = linen_variables(model, 0, x, **kwargs)
  _, stats = ss_linen.capture_stats(model, variables, x, select=select,
                                    **kwargs)
  return variables, stats


@pytest.mark.parametrize("on_problem", ["warn", "error", "ignore"])
def test_logits_layer_taken_by_a_glob_is_reported(on_problem):
  x = jnp.ones((2, 3))
  model = TwoDense()
  variables = linen_variables(model, 0, x)
  nmodel = nnx_model(lambda: TwoLinear(nnx.Rngs(0)), 0)
  calls = [lambda: ss_linen.capture_stats(model, variables, x, select="*",
                                          check_relu=on_problem),
           lambda: ss_nnx.capture_stats(nmodel, x, select="*",
                                        check_relu=on_problem)]
  msg = "the output of 'head' does not reach a ReLU"
  for call in calls:
    if on_problem == "warn":
      with pytest.warns(UserWarning, match=msg):
        call()
    elif on_problem == "error":
      with pytest.raises(ValueError, match=msg):
        call()
    else:
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()
  with warnings.catch_warnings():  # the right selection is silent
    warnings.simplefilter("error")
    ss_linen.capture_stats(model, variables, x, select="fc*")
    ss_nnx.capture_stats(nmodel, x, select="fc*")


def test_conv_batchnorm_relu_without_mapping_is_reported():
  x = jnp.ones((2, 6, 6, 1))
  model = BNCNN()
  variables = linen_variables(model, 0, x, train=False)
  msg = "'conv1' reaches a ReLU only through BatchNorm 'bn1'.*\\{'bn1': 'conv1'\\}"
  with pytest.warns(UserWarning, match=msg):
    ss_linen.capture_stats(model, variables, x, train=False, select="conv*")
  nmodel = BNDropCNN(nnx.Rngs(init_key(0)))
  nmodel.eval()
  with pytest.warns(UserWarning, match=msg):
    ss_nnx.capture_stats(nmodel, x, select="conv*")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ss_linen.capture_stats(model, variables, x, train=False,
                           select={"bn1": "conv1"})
    ss_nnx.capture_stats(nmodel, x, select={"bn1": "conv1"})


def _same_stats(a, b):
  """Equal statistics trees (same keys, bit-equal leaves)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u),
                                                          np.asarray(v)), a, b)


@pytest.mark.parametrize("case", [
    "linen_cnn", pytest.param("resnet_block", marks=pytest.mark.slow)])
def test_auto_matches_explicit_selection_linen(case):
  rng = np.random.default_rng(1)
  if case == "linen_cnn":
    model, kwargs = LinenCNN(), {}
    x = host_normal(rng, (2, 28, 28, 1))
    explicit = ["Conv_0", "Conv_1", "Dense_0"]
  else:
    model, kwargs = ResNetBlock(4), {"train": False}
    x = host_normal(rng, (2, 6, 6, 4))
    explicit = {"bn1": "conv1"}
  variables = linen_variables(model, 0, x, **kwargs)

  def stats(select):  # jitted: the selection runs as the program is traced
    return jax.jit(lambda v, x: ss_linen.capture_stats(
        model, v, x, select=select, **kwargs)[1])(variables, x)

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    auto, expl = stats("auto"), stats(explicit)
  _same_stats(auto, expl)


@pytest.mark.slow
def test_auto_matches_explicit_selection_nnx_tutorial_cnn():
  model = TutorialCNN(rngs=nnx.Rngs(init_key(0)))  # keeps RNG state
  model.eval()
  x = normal((2, 28, 28, 1), 2)
  explicit = {"batch_norm1": "conv1", "batch_norm2": "conv2",
              "linear1": "linear1"}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, auto = ss_nnx.capture_stats(model, x, select="auto")
    _, expl = ss_nnx.capture_stats(model, x, select=explicit)
  _same_stats(auto, expl)
  assert sorted(auto) == ["conv1", "conv2", "linear1"]


def test_auto_on_the_application_vit_takes_every_mlp_layer():
  from synstrip_vit.models import create_model
  model = create_model("vit", num_classes=3, patch_size=4, hidden_size=8,
                       depth=2, num_heads=2, mlp_dim=16)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda: model.init(init_key(0), jnp.ones(x.shape), train=False))
  auto = ss_linen.targets(model, variables, x, train=False, select="auto")
  explicit = ss_linen.targets(model, variables, x, train=False,
                              select="*/mlp/fc*")
  assert auto == explicit
  flat = [k for k, v in jax.tree_util.tree_leaves_with_path(auto) if v]
  assert len(flat) == 4


def test_auto_needs_the_relu():
  x = jnp.ones((2, 3))
  model = TwoDense()
  variables = linen_variables(model, 0, x)
  nmodel = nnx_model(lambda: TwoLinear(nnx.Rngs(0)), 0)
  with pytest.raises(ValueError, match="select='auto'.*activation=jax.nn.relu"):
    ss_linen.capture_stats(model, variables, x, select="auto",
                           activation=jax.nn.gelu)
  with pytest.raises(ValueError, match="select='auto'.*activation=jax.nn.relu"):
    ss_nnx.capture_stats(nmodel, x, select="auto", activation=jax.nn.gelu)
