"""Strip models as their authors write them: unmodified Linen and NNX layers.

Real architectures (the Flax examples' MNIST CNN, a ViT MLP block, an NNX MLP
trained with ``nnx.Optimizer``, a ResNet block Conv -> BatchNorm -> ReLU) are
probed through ``capture_stats`` + ``probe_dead``; the dead neurons found are
checked against a direct computation from the activations (Linen's
``capture_intermediates`` or a hand-written forward), and strip events
interleaved with optimizer steps keep every invariant. The sown route
(``ActDense``/``ActLinear``/``ActConv``) and the unmodified route are
bit-identical through several strip events. Tiny shapes: the whole file runs
in well under a minute on 2 CPU cores.
"""

import functools
import re
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import synstrip_jax as ss
from synstrip_jax import linen as ss_linen, probe
from synstrip_jax import nnx as ss_nnx
from _shared import REPO
from conftest import linen_variables, normal, nnx_model

sys.path.insert(0, str(REPO / "docs" / "examples"))
# the Flax examples' MNIST CNN (examples/mnist/train.py), as written there
from flax_mnist_linen import CNN  # noqa: E402  pylint: disable=wrong-import-position

FACTOR = 0.2
_strip = jax.jit(ss.strip_event, static_argnames=("stripping_factor",))


def _flat(tree):
  """``{path: leaf}`` of a params-like tree (pure dicts or NNX State)."""
  if isinstance(tree, nnx.State):
    tree = nnx.as_pure(tree).to_pure_dict()
  return traverse_util.flatten_dict(tree, sep="/")


def _kill(bias, idx):
  """A copy of ``bias`` at -1e3 at ``idx``: those neurons output 0 for any
  input of these tests (forced dead neurons)."""
  bias = np.array(bias)
  bias[idx] = -1e3
  return bias


def _batches(x, batch_size, pad_value=1e3):
  """Batches ``{"x", "valid"}`` of ``x``, the last one padded with garbage."""
  out = []
  for i in range(0, len(x), batch_size):
    xb = x[i:i + batch_size]
    n = len(xb)
    if n < batch_size:
      pad = np.full((batch_size - n,) + xb.shape[1:], pad_value, xb.dtype)
      xb = np.concatenate([xb, pad])
    out.append({"x": xb, "valid": np.arange(batch_size) < n})
  return out


def _where(batch):
  return batch["valid"]


def _direct_dead(pre_acts):
  """Dead neurons from whole pre-activations ``[..., n]`` (float64 numpy)."""
  total = sum(np.maximum(np.asarray(a, np.float64), 0).reshape(
      -1, a.shape[-1]).sum(0) for a in pre_acts)
  return total == 0


@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def _intermediates(model, variables, x, train=None):
  """Every module's output (Linen ``capture_intermediates``), jitted."""
  kw = {} if train is None else {"train": train}
  out, state = model.apply(variables, x, capture_intermediates=True,
                           mutable=["intermediates"], **kw)
  return out, state["intermediates"]


def _check_strip(before, after, dead, masks_before, masks_after):
  """Invariants of one strip event (flat dicts by path)."""
  for path, p0 in before.items():
    p1 = after[path]
    d = dead.get(path)
    if d is None:
      np.testing.assert_array_equal(p1, p0, err_msg=path)  # untouched
      continue
    d = np.asarray(d)
    m0, m1 = np.asarray(masks_before[path]), np.asarray(masks_after[path])
    assert not np.any(m1 & ~m0), f"{path}: a mask grew"
    assert np.all(np.asarray(p1)[~m1] == 0), f"{path}: stripped weight != 0"
    # live neurons: column and mask unchanged
    np.testing.assert_array_equal(np.asarray(p1)[..., ~d],
                                  np.asarray(p0)[..., ~d], err_msg=path)
    np.testing.assert_array_equal(m1[..., ~d], m0[..., ~d], err_msg=path)


def _check_zero(params, masks):
  for path, m in masks.items():
    if m is not None:
      assert np.all(np.asarray(params[path])[~np.asarray(m)] == 0), path


def _linen_cycle(params, stats_fn, batches, train_step, opt_state, events=3,
                 state=None, steps=2):
  """Probe, strip, train ``steps``; repeated. Returns the history."""
  history = []
  for _ in range(events):
    st = params if state is None else state(params)
    stats = probe.probe_stats(stats_fn, st, batches, where_fn=_where)
    dead = probe.dead_tree(params, stats)
    m0 = ss.get_masks(opt_state)
    new_params, opt_state = _strip(params, opt_state, dead,
                                   stripping_factor=FACTOR)
    m1 = ss.get_masks(opt_state)
    _check_strip(_flat(params), _flat(new_params),
                 {k: v for k, v in _flat(dead).items()},
                 _flat(m0), _flat(m1))
    params = new_params
    for b in batches[:steps]:
      params, opt_state = train_step(params, opt_state, b["x"])
    _check_zero(_flat(params), _flat(ss.get_masks(opt_state)))
    history.append((stats, dead, params, ss.get_masks(opt_state)))
  return history


def _tx(targets):
  return ss.with_stripping(optax.adamw(1e-2, weight_decay=1e-2), targets)


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------- Flax examples' MNIST CNN

_CNN = CNN()
_CNN_SELECT = ["Conv_*", "Dense_0"]


def _cnn_stats(params, batch):
  return ss_linen.capture_stats(_CNN, {"params": params}, batch["x"],
                                select=_CNN_SELECT)[1]


@jax.jit
def _cnn_train(params, opt_state, x):
  def loss(p):
    return jnp.mean(_CNN.apply({"params": p}, x) ** 2)
  grads = jax.grad(loss)(params)
  updates, opt_state = _cnn_tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


_cnn_tx = None


def test_mnist_cnn_dead_channels_and_strip_events():
  global _cnn_tx
  x = normal((10, 8, 8, 1), 0)
  params = linen_variables(_CNN, 1, x[:1])["params"]
  layers = ss_linen.candidate_layers(_CNN, {"params": params}, x[:2])
  assert [(l.path, l.kind, l.kernel_shape) for l in layers] == [
      ("Conv_0", "Conv", (3, 3, 1, 32)), ("Conv_1", "Conv", (3, 3, 32, 64)),
      ("Dense_0", "Dense", (256, 256)), ("Dense_1", "Dense", (256, 10))]
  assert layers[0].output_shape == (2, 8, 8, 32)
  # force dead channels / neurons
  params["Conv_0"]["bias"] = _kill(params["Conv_0"]["bias"], [3, 17])
  params["Conv_1"]["bias"] = _kill(params["Conv_1"]["bias"], 5)
  params["Dense_0"]["bias"] = _kill(params["Dense_0"]["bias"], [7, 8, 9])
  batches = _batches(x, 4)  # 4 + 4 + 2 valid (+ 2 padding rows of 1e3)

  # direct: pre-activations of the valid examples from capture_intermediates
  _, inter = _intermediates(_CNN, {"params": params}, x)
  dead = probe.probe_dead(_cnn_stats, params, batches, where_fn=_where)
  counts = {}
  for name in ("Conv_0", "Conv_1", "Dense_0"):
    expect = _direct_dead([inter[name]["__call__"][0]])
    np.testing.assert_array_equal(np.asarray(dead[name]["kernel"]), expect,
                                  err_msg=name)
    counts[name] = int(expect.sum())
  assert dead["Dense_1"]["kernel"] is None and dead["Conv_0"]["bias"] is None
  assert counts["Conv_0"] >= 2 and counts["Conv_1"] >= 1 and counts["Dense_0"] >= 3
  # the 2 padding rows are left out: 10 examples x 8 x 8 positions
  stats = probe.probe_stats(_cnn_stats, params, batches, where_fn=_where)
  assert float(stats["Conv_0"]["post_act"].count) == 10 * 64
  print("mnist cnn dead:", counts)

  targets = probe.target_tree(params, stats)
  assert {p for p, t in _flat(targets).items() if t} == {
      "Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"}
  _cnn_tx = _tx(targets)
  hist = _linen_cycle(params, _cnn_stats, batches, _cnn_train,
                      jax.jit(_cnn_tx.init)(params))
  masks = hist[-1][3]
  # dead channels are stripped per output channel (all kh, kw, in)
  assert not np.all(np.asarray(masks["Conv_0"]["kernel"])[..., 3])
  assert np.all(np.asarray(masks["Conv_0"]["kernel"])[..., ~np.asarray(
      hist[-1][1]["Conv_0"]["kernel"])])


# ------------------------------------------------------ ViT MLP block

class MlpBlock(nn.Module):
  """The original ViT's MLP: Dense(4d) -> relu -> Dense(d) -> relu."""
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, name="fc1")(x)
    y = nn.relu(y)
    y = nn.Dense(x.shape[-1], name="fc2")(y)
    return nn.relu(y)


class SownMlpBlock(nn.Module):
  """The same block on the sown route."""
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = ss_linen.ActDense(self.mlp_dim, name="fc1")(x)
    return ss_linen.ActDense(x.shape[-1], name="fc2")(y)


_MLP, _SOWN_MLP = MlpBlock(32), SownMlpBlock(32)


def _mlp_stats(params, batch):
  return ss_linen.capture_stats(_MLP, {"params": params}, batch["x"],
                                select="fc*")[1]


def _sown_mlp_stats(params, batch):
  _, state = _SOWN_MLP.apply({"params": params}, batch["x"],
                             mutable=[ss_linen.ACTIVATIONS])
  return ss_linen.linen_stats(state)


def _mlp_train_fn(model):
  @jax.jit
  def step(params, opt_state, x):
    grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - 1) ** 2))(params)
    updates, opt_state = _mlp_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


_mlp_tx = None


@pytest.fixture(scope="module")
def vit_mlp():
  """(params with forced dead neurons, batches of tokens [4, 5, 8])."""
  x = normal((10, 5, 8), 2)
  params = linen_variables(_MLP, 3, x[:1])["params"]
  params["fc1"]["bias"] = _kill(params["fc1"]["bias"], [1, 4])
  params["fc2"]["bias"] = _kill(params["fc2"]["bias"], 6)
  return params, x, _batches(x, 4)


@pytest.mark.slow
def test_vit_mlp_block_dead_neurons_and_strip_events(vit_mlp):
  global _mlp_tx
  params, x, batches = vit_mlp
  _, inter = _intermediates(_MLP, {"params": params}, x)
  dead = probe.probe_dead(_mlp_stats, params, batches, where_fn=_where)
  counts = {}
  for name in ("fc1", "fc2"):
    expect = _direct_dead([inter[name]["__call__"][0]])
    np.testing.assert_array_equal(np.asarray(dead[name]["kernel"]), expect)
    counts[name] = int(expect.sum())
  assert counts["fc1"] >= 2 and counts["fc2"] >= 1
  print("vit mlp dead:", counts)
  _mlp_tx = _tx(probe.target_tree(params, _mlp_stats(params, batches[0])))
  _linen_cycle(params, _mlp_stats, batches, _mlp_train_fn(_MLP),
               jax.jit(_mlp_tx.init)(params))


def test_linen_sown_and_unmodified_are_bit_identical(vit_mlp):
  global _mlp_tx
  params, _, batches = vit_mlp
  sown_params = jax.eval_shape(_SOWN_MLP.init, jax.random.key(3),
                               batches[0]["x"][:1])["params"]
  assert jax.tree_util.tree_structure(sown_params) == jax.tree_util.tree_structure(params)
  s1 = probe.probe_stats(_mlp_stats, params, batches, where_fn=_where)
  s2 = probe.probe_stats(_sown_mlp_stats, params, batches, where_fn=_where)
  _assert_trees_equal(s1, s2)
  _mlp_tx = _tx(probe.target_tree(params, s1))
  assert probe.target_tree(params, s1) == probe.target_tree(params, s2)
  h1 = _linen_cycle(params, _mlp_stats, batches, _mlp_train_fn(_MLP),
                    jax.jit(_mlp_tx.init)(params))
  h2 = _linen_cycle(params, _sown_mlp_stats, batches,
                    _mlp_train_fn(_SOWN_MLP), jax.jit(_mlp_tx.init)(params))
  for a, b in zip(h1, h2):  # stats, dead, params, masks at every event
    _assert_trees_equal(a, b)
  assert sum(int(np.sum(~np.asarray(m))) for m in jax.tree_util.tree_leaves(
      h1[-1][3])) > 0  # something was stripped


# ------------------------------------------------- ResNet block with BN

class ResNetBlock(nn.Module):
  """ResNet block (after flax/examples/imagenet/models.py)."""
  filters: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5)
    residual = x
    y = nn.Conv(self.filters, (3, 3), name="conv1")(x)
    y = norm(name="bn1")(y)
    y = nn.relu(y)
    y = nn.Conv(self.filters, (3, 3), name="conv2")(y)
    y = norm(scale_init=nn.initializers.zeros_init(), name="bn2")(y)
    if residual.shape != y.shape:
      residual = nn.Conv(self.filters, (1, 1), name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


_RES = ResNetBlock(8)
_RES_SELECT = {"bn1": "conv1"}  # the ReLU sees bn1's output; strip conv1


def _res_stats(variables, batch):
  return ss_linen.capture_stats(_RES, variables, batch["x"], train=False,
                                select=_RES_SELECT)[1]


@jax.jit
def _res_train(variables, opt_state, x):
  def loss(p):
    y, upd = _RES.apply({"params": p, "batch_stats": variables["batch_stats"]},
                        x, train=True, mutable=["batch_stats"])
    return jnp.mean((y - 1) ** 2), upd
  grads, upd = jax.grad(loss, has_aux=True)(variables["params"])
  updates, opt_state = _res_tx.update(grads, opt_state, variables["params"])
  return {"params": optax.apply_updates(variables["params"], updates),
          "batch_stats": upd["batch_stats"]}, opt_state


_res_tx = None


def test_resnet_block_batchnorm_pairing():
  global _res_tx
  x = normal((10, 6, 6, 4), 4)
  variables = linen_variables(_RES, 5, x[:2], train=False)
  params = variables["params"]
  # bn1's shift kills channels 2 and 5 after normalisation; conv1 itself is
  # untouched, so its raw output is positive somewhere in every channel.
  params["bn1"]["bias"] = _kill(params["bn1"]["bias"], [2, 5])
  variables = {"params": params, "batch_stats": variables["batch_stats"]}
  batches = _batches(x, 4)
  _, inter = _intermediates(_RES, variables, x, train=False)
  stats = probe.probe_stats(_res_stats, variables, batches, where_fn=_where)
  assert list(stats) == ["conv1"]  # keyed by the kernel layer
  dead = probe.dead_tree(params, stats)
  expect = _direct_dead([inter["bn1"]["__call__"][0]])
  np.testing.assert_array_equal(np.asarray(dead["conv1"]["kernel"]), expect)
  assert int(expect.sum()) >= 2 and expect[2] and expect[5]
  print("resnet block dead (bn1 -> conv1):", int(expect.sum()))
  # selecting conv1 itself would look at the wrong tensor: nothing dead
  assert not _direct_dead([inter["conv1"]["__call__"][0]]).any()
  assert all(d is None for p, d in _flat(dead).items() if p != "conv1/kernel")

  _res_tx = _tx(probe.target_tree(params, stats))
  opt_state = jax.jit(_res_tx.init)(params)
  for _ in range(3):
    stats = probe.probe_stats(_res_stats, variables, batches, where_fn=_where)
    dead = probe.dead_tree(variables["params"], stats)
    m0 = ss.get_masks(opt_state)
    new_params, opt_state = _strip(variables["params"], opt_state, dead,
                                   stripping_factor=FACTOR)
    _check_strip(_flat(variables["params"]), _flat(new_params), _flat(dead),
                 _flat(m0), _flat(ss.get_masks(opt_state)))
    variables = dict(variables, params=new_params)
    for b in batches[:2]:
      variables, opt_state = _res_train(variables, opt_state, b["x"])
    _check_zero(_flat(variables["params"]), _flat(ss.get_masks(opt_state)))
  assert not np.all(np.asarray(ss.get_masks(opt_state)["conv1"]["kernel"])[..., 2])


# ---------------------------------------------- NNX MLP with nnx.Optimizer

class NNXMLP(nnx.Module):

  def __init__(self, din, dhid, dout, *, rngs, linear=nnx.Linear):
    self.fc1 = linear(din, dhid, rngs=rngs)
    self.fc2 = linear(dhid, dhid, rngs=rngs)
    self.out = nnx.Linear(dhid, dout, rngs=rngs)
    self.sown = linear is not nnx.Linear

  def __call__(self, x):
    if self.sown:  # ActLinear applies the relu itself
      return self.out(self.fc2(self.fc1(x)))
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.out(x)


def _nnx_stats(model, batch):
  return ss_nnx.capture_stats(model, batch["x"], select="fc*")[1]


def _nnx_sown_stats(model, batch):
  return nnx.capture(model, nnx.Intermediate)(batch["x"])[1]


@nnx.jit
def _nnx_train(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _nnx_model(linear=nnx.Linear):
  model = nnx_model(lambda: NNXMLP(6, 16, 3, rngs=nnx.Rngs(0), linear=linear), 0)
  model.fc1.bias.set_value(_kill(model.fc1.bias.get_value(), [0, 9]))
  model.fc2.bias.set_value(_kill(model.fc2.bias.get_value(), 3))
  return model


def _nnx_run(model, stats_fn, x, y, batches, events=3):
  """Train with nnx.Optimizer, probe and strip; returns the history."""
  params = nnx.state(model, nnx.Param)
  stats = probe.probe_stats(stats_fn, model, batches, where_fn=_where)
  targets = probe.target_tree(params, stats)  # State-shaped, for nnx.Optimizer
  optimizer = nnx.Optimizer(model, _tx(targets), wrt=nnx.Param)
  history = []
  for _ in range(events):
    stats = probe.probe_stats(stats_fn, model, batches, where_fn=_where)
    dead = probe.dead_tree(nnx.state(model, nnx.Param), stats)
    before = _flat(nnx.state(model, nnx.Param))
    m0 = _flat(ss.get_masks(optimizer))
    ss_nnx.strip(model, optimizer, dead, stripping_factor=FACTOR)
    _check_strip(before, _flat(nnx.state(model, nnx.Param)), _flat(dead), m0,
                 _flat(ss.get_masks(optimizer)))
    for i in range(2):
      _nnx_train(model, optimizer, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
    _check_zero(_flat(nnx.state(model, nnx.Param)),
                _flat(ss.get_masks(optimizer)))
    history.append((stats, _flat(dead), _flat(nnx.state(model, nnx.Param)),
                    _flat(ss.get_masks(optimizer))))
  return history


@pytest.fixture(scope="module")
def nnx_data():
  x = normal((10, 6), 6)
  y = np.random.default_rng(7).integers(0, 3, (10,)).astype(np.int32)
  return x, y, _batches(x, 4)


def test_nnx_mlp_with_optimizer(nnx_data):
  x, y, batches = nnx_data
  model = _nnx_model()
  assert [(l.path, l.kernel_shape) for l in ss_nnx.candidate_layers(model)] == [
      ("fc1", (6, 16)), ("fc2", (16, 16)), ("out", (16, 3))]
  # direct computation by hand
  h1 = model.fc1(x)
  h2 = model.fc2(nnx.relu(h1))
  dead = probe.probe_dead(_nnx_stats, model, batches, where_fn=_where)
  assert isinstance(dead, nnx.State) and dead["out"]["kernel"] is None
  counts = {}
  for name, pre in (("fc1", h1), ("fc2", h2)):
    expect = _direct_dead([pre])
    np.testing.assert_array_equal(np.asarray(dead[name]["kernel"]), expect)
    counts[name] = int(expect.sum())
  assert counts["fc1"] >= 2 and counts["fc2"] >= 1
  print("nnx mlp dead:", counts)
  assert type(model.fc1) is nnx.Linear  # class restored
  hist = _nnx_run(model, _nnx_stats, x, y, batches)
  assert int(np.sum(~hist[-1][3]["fc1/kernel"])) > 0
  assert hist[-1][3]["out/kernel"] is None


def test_nnx_sown_and_unmodified_are_bit_identical(nnx_data):
  x, y, batches = nnx_data
  plain, sown = _nnx_model(), _nnx_model(ss_nnx.ActLinear)
  _assert_trees_equal(nnx.as_pure(nnx.state(plain, nnx.Param)),
                      nnx.as_pure(nnx.state(sown, nnx.Param)))
  h1 = _nnx_run(plain, _nnx_stats, x, y, batches)
  h2 = _nnx_run(sown, _nnx_sown_stats, x, y, batches)
  for a, b in zip(h1, h2):
    _assert_trees_equal(a, b)


# --------------------------------------------------------- Conv, sown

class _SownCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = ss_linen.ActConv(4, (3, 3), name="c")(x)
    return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


class _PlainCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="c")(x))
    return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


class _NNXCNN(nnx.Module):
  def __init__(self, conv, rngs):
    self.c = conv(2, 4, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.c(x)


def test_act_conv_linen_and_nnx_match_unmodified():
  x = normal((3, 5, 5, 2), 8)
  params = linen_variables(_PlainCNN(), 9, x)["params"]
  params["c"]["bias"] = _kill(params["c"]["bias"], 1)

  @jax.jit
  def both(params, x):
    _, st = _SownCNN().apply({"params": params}, x, mutable=["activations"])
    _, cap = ss_linen.capture_stats(_PlainCNN(), {"params": params}, x,
                                    select="c")
    return st["activations"], cap

  sown, cap = both(params, x)
  _assert_trees_equal(sown, cap)
  dead = probe.dead_tree(params, probe.reduce_stats_tree(cap))
  np.testing.assert_array_equal(dead["c"]["kernel"], [False, True, False, False])
  sown = nnx_model(lambda: _NNXCNN(ss_nnx.ActConv, nnx.Rngs(0)), 1)
  plain = nnx_model(lambda: _NNXCNN(nnx.Conv, nnx.Rngs(0)), 1)
  _, inter = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x))(sown, x)
  _, cap = nnx.jit(lambda m, x: ss_nnx.capture_stats(m, x, select="c"))(plain, x)
  _assert_trees_equal(probe.reduce_stats_tree(inter),
                      probe.reduce_stats_tree(cap))
  assert cap["c"]["post_act"].total.shape == (3, 4)


def test_nnx_conv_batchnorm_pairing():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
      self.bn1 = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.bn1(self.conv1(x)))

  model = nnx_model(lambda: Block(nnx.Rngs(0)), 2)
  model.bn1.bias.set_value(_kill(model.bn1.bias.get_value(), 3))
  x = normal((3, 5, 5, 2), 10)
  _, stats = nnx.jit(lambda m, x: ss_nnx.capture_stats(
      m, x, select={"bn1": "conv1"}))(model, x)
  dead = probe.dead_tree(nnx.state(model, nnx.Param),
                         probe.reduce_stats_tree(stats))
  expect = _direct_dead([nnx.jit(lambda m, x: m.bn1(m.conv1(x)))(model, x)])
  np.testing.assert_array_equal(dead["conv1"]["kernel"], expect)
  assert expect[3]


# ------------------------------------------- shared weights, transforms

def test_shared_weights_add_up_linen_and_nnx():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(3, name="shared")
      return d(nn.relu(d(x)))

  x = normal((4, 3), 11)
  v = linen_variables(Twice(), 0, x)
  _, st = jax.jit(lambda v, x: ss_linen.capture_stats(
      Twice(), v, x, select="shared"))(v, x)
  w, c = v["params"]["shared"]["kernel"], v["params"]["shared"]["bias"]
  a = x @ w + c
  b = nn.relu(a) @ w + c
  s = st["shared"]["post_act"]
  np.testing.assert_allclose(s.total, nn.relu(a) + nn.relu(b), rtol=1e-6)
  np.testing.assert_array_equal(s.count, [2.0] * 4)

  class NTwice(nnx.Module):
    def __init__(self, rngs):
      self.shared = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
      return self.shared(nnx.relu(self.shared(x)))

  m = nnx_model(lambda: NTwice(nnx.Rngs(0)), 3)
  _, st = nnx.jit(lambda m, x: ss_nnx.capture_stats(m, x, select="shared"))(m, x)
  w, c = m.shared.kernel.get_value(), m.shared.bias.get_value()
  a = x @ w + c
  b = nnx.relu(a) @ w + c
  np.testing.assert_allclose(st["shared"]["post_act"].total,
                             nnx.relu(a) + nnx.relu(b), rtol=1e-6)


def test_remat_supported_scan_rejected_dense_general():
  class Blk(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.relu(nn.Dense(4, name="fc")(x))

  class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat(Blk)(name="b")(x)

  x = jnp.ones((2, 4))
  v = jax.eval_shape(Remat().init, jax.random.key(0), x)
  _, st = jax.eval_shape(lambda v, x: ss_linen.capture_stats(
      Remat(), v, x, select="b/fc"), v, x)
  assert st["b"]["fc"]["post_act"].total.shape == (2, 4)

  class Body(nn.Module):
    @nn.compact
    def __call__(self, c, _):
      return nn.relu(nn.Dense(4, name="fc")(c)), None

  class Scan(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Body, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=2)(name="s")(x, None)[0]

  v = jax.eval_shape(Scan().init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"\['s/fc'\].*lifted transform"):
    jax.eval_shape(lambda v: ss_linen.capture_stats(Scan(), v, x, select="s/fc"), v)

  class DG(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.relu(nn.DenseGeneral(6, axis=(-2, -1), name="dg")(x))
      return nn.DenseGeneral((2, 3), name="heads")(y)

  x3 = normal((2, 3, 4), 1)
  v = jax.eval_shape(DG().init, jax.random.key(0), x3)
  _, st = jax.eval_shape(lambda v: ss_linen.capture_stats(DG(), v, x3, select="dg"), v)
  dead = jax.eval_shape(lambda v, st: probe.dead_tree(
      v["params"], probe.reduce_stats_tree(st)), v, st)
  assert v["params"]["dg"]["kernel"].shape == (3, 4, 6)
  assert dead["dg"]["kernel"].shape == (6,)
  with pytest.raises(ValueError, match=r"DenseGeneral 'heads'.*one output axis"):
    jax.eval_shape(lambda v: ss_linen.capture_stats(DG(), v, x3, select="heads"), v)


# ---------------------------------------------------------------- errors

def test_bad_selections_name_the_module_path(vit_mlp):
  params, x, _ = vit_mlp
  v = {"params": params}

  def cap(model, variables, x, select, **kw):  # abstract: errors at trace time
    return jax.eval_shape(lambda v, x: ss_linen.capture_stats(
        model, v, x, select=select, **kw), variables, x)

  with pytest.raises(ValueError, match=r"matches no Dense/Conv.*\['fc1', 'fc2'\]"):
    cap(_MLP, v, x, "mlp/*")
  with pytest.raises(ValueError, match=r"'fc3' -> 'fc1'.*no module 'fc3'"):
    cap(_MLP, v, x, {"fc3": "fc1"})
  with pytest.raises(ValueError, match="fc1.*neurons.*fc2"):
    cap(_MLP, v, x, {"fc1": "fc2"})  # 32 vs 8
  with pytest.raises(TypeError, match="select must be"):
    cap(_MLP, v, x, 3)
  with pytest.raises(ValueError, match=r"module 'fc1' returned shape \(32,\)"):
    cap(_MLP, v, x[0, 0], "fc1")  # no example axis
  # a regex and a predicate select the same layers as the glob
  _, a = cap(_MLP, v, x, re.compile(r"fc\d"))
  _, b = cap(_MLP, v, x, lambda path, m: isinstance(m, nn.Dense))
  assert sorted(a) == sorted(b) == ["fc1", "fc2"]
  # a non-Dense module named exactly, or as the kernel side of a pairing
  xr = jnp.ones((2, 6, 6, 4))
  variables = jax.eval_shape(functools.partial(_RES.init, train=False),
                             jax.random.key(5), xr)
  with pytest.raises(ValueError, match=r"module 'bn1' of type BatchNorm.*mapping"):
    cap(_RES, variables, xr, ["conv1", "bn1"], train=False)
  with pytest.raises(ValueError, match=r"'conv1' -> 'bn1'.*BatchNorm, not a Dense"):
    cap(_RES, variables, xr, {"conv1": "bn1"}, train=False)
  # NNX: same checks over graph paths
  model = nnx.eval_shape(lambda: NNXMLP(6, 16, 3, rngs=nnx.Rngs(0)))
  ncap = lambda x, select: nnx.jit(lambda m, x: ss_nnx.capture_stats(
      m, x, select=select))(model, x)
  with pytest.raises(ValueError, match=r"matches no Dense/Conv.*\['fc1', 'fc2', 'out'\]"):
    ncap(jnp.ones((2, 6)), "nope*")
  with pytest.raises(ValueError, match=r"module 'fc1' returned shape \(16,\)"):
    ncap(jnp.ones(6), "fc1")
  assert type(model.fc1) is nnx.Linear  # restored after an error too


def test_probe_under_pmap_matches_jit(vit_mlp):
  params, _, batches = vit_mlp
  n = jax.local_device_count()
  split = [jax.tree_util.tree_map(lambda a: a.reshape((n, -1) + a.shape[1:]), b)
           for b in batches]
  d1 = probe.probe_dead(_mlp_stats, params, batches, where_fn=_where)
  d2 = probe.probe_dead(_mlp_stats, params, split, where_fn=_where,
                        axis_name="batch")
  _assert_trees_equal(d1, d2)
  with pytest.raises(ValueError, match="no batches"):
    probe.probe_dead(_mlp_stats, params, [])


# ---------------------------------------------------------------- README

def _readme_blocks(heading, doc="README.md"):
  text = (Path(__file__).resolve().parents[1] / doc).read_text()
  start = text.index(f"\n## {heading}\n")
  end = text.find("\n## ", start + 1)
  section = text[start:end if end >= 0 else None]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_bring_your_own_model_doc_snippets_run(capsys):
  blocks = (_readme_blocks("Linen", "docs/bring_your_own_model.md")
            + _readme_blocks("NNX", "docs/bring_your_own_model.md"))
  assert len(blocks) == 2
  for code in blocks:
    assert len([l for l in code.splitlines() if l.strip()]) < 20
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # pylint: disable=exec-used
    assert "dead" in ns
  assert "Dense_0" in capsys.readouterr().out


def test_readme_api_snippet_runs(capsys):
  (code,) = _readme_blocks("The API in a few lines")
  ns = {}
  exec(compile(code, "README.md", "exec"), ns)  # pylint: disable=exec-used
  assert "dead_neurons" in capsys.readouterr().out
  assert set(ns["dead"]) == {"ActDense_0", "ActDense_1", "Dense_0"}
