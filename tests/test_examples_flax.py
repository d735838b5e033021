"""The Flax example integrations in ``docs/examples`` find the dead neurons
that an independent numpy forward pass finds.

Each script (the Flax examples' Linen MNIST CNN, the NNX MNIST tutorial's
CNN) trains briefly on a slice of ``mnist.npz``; a few channels are then
forced dead and the script's own probe-and-strip function runs. Its ``dead``
tree must equal the neurons whose pre-ReLU values, computed in float64 numpy
from the same weights on the same probe batches, are never positive.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from flax import nnx

from _shared import REPO

sys.path.insert(0, str(REPO / "docs" / "examples"))
import flax_mnist_linen  # noqa: E402  pylint: disable=wrong-import-position
import mnist_data  # noqa: E402  pylint: disable=wrong-import-position
import nnx_mnist_tutorial  # noqa: E402  pylint: disable=wrong-import-position

BATCH = 32
PROBE = 64

if not mnist_data.mnist_path().exists():
  pytest.skip(f"no {mnist_data.mnist_path()}", allow_module_level=True)


def _conv(x, kernel, bias):
  """3x3 'SAME' convolution, stride 1, ``[B, H, W, C] -> [B, H, W, O]``."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))
  return np.einsum("bhwcij,ijco->bhwo", patches, kernel) + bias


def _pool(x):
  """2x2 average pool, stride 2."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(
      b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _never_positive(pre):
  """``[n]`` bool: the neurons (last axis) never positive over the rest."""
  return pre.reshape(-1, pre.shape[-1]).max(axis=0) <= 0


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.fixture(scope="module")
def data():
  return mnist_data.load(256, 64)


def _probe_ds(data):
  return {"image": data["train_image"][:PROBE],
          "label": data["train_label"][:PROBE]}


@pytest.mark.slow
def test_linen_example_dead_neurons_match_numpy(data):
  state, _ = flax_mnist_linen.train_and_evaluate(
      data, epochs=1, batch_size=BATCH, probe_examples=PROBE, log=lambda s: None)
  params = jax.tree.map(np.array, state.params)
  params["Conv_0"]["bias"][[0, 5]] = -1e3  # force two dead channels
  state = state.replace(params=params)
  p = _np(params)
  x = _probe_ds(data)["image"].astype(np.float64)
  h1 = _conv(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"])
  h2 = _conv(_pool(np.maximum(h1, 0)), p["Conv_1"]["kernel"],
             p["Conv_1"]["bias"])
  flat = _pool(np.maximum(h2, 0)).reshape(len(x), -1)
  h3 = flat @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  _, dead = flax_mnist_linen.probe_and_strip(state, _probe_ds(data), BATCH,
                                             0.05)
  for name, pre in (("Conv_0", h1), ("Conv_1", h2), ("Dense_0", h3)):
    np.testing.assert_array_equal(np.asarray(dead[name]["kernel"]),
                                  _never_positive(pre), err_msg=name)
  assert np.asarray(dead["Conv_0"]["kernel"]).sum() >= 2
  assert dead["Dense_1"]["kernel"] is None


def _bn(x, bn):
  """Eval-mode BatchNorm with the layer's running statistics."""
  return ((x - bn["mean"]) / np.sqrt(bn["var"] + 1e-5) * bn["scale"]
          + bn["bias"])


@pytest.mark.slow
def test_nnx_example_dead_neurons_match_numpy(data, monkeypatch):
  model, optimizer, _ = nnx_mnist_tutorial.train_and_evaluate(
      data, epochs=1, batch_size=BATCH, probe_examples=PROBE,
      log=lambda s: None)
  bias = np.array(model.batch_norm1.bias[...])
  bias[[0, 5]] = -1e3  # force two dead channels
  model.batch_norm1.bias[...] = bias
  s = _np(nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat))))
  x = _probe_ds(data)["image"].astype(np.float64)
  h1 = _bn(_conv(x, s["conv1"]["kernel"], s["conv1"]["bias"]),
           s["batch_norm1"])
  h2 = _bn(_conv(_pool(np.maximum(h1, 0)), s["conv2"]["kernel"],
                 s["conv2"]["bias"]), s["batch_norm2"])
  flat = _pool(np.maximum(h2, 0)).reshape(len(x), -1)
  h3 = flat @ s["linear1"]["kernel"] + s["linear1"]["bias"]
  probe = mnist_data.batches(data["train_image"][:PROBE],
                             data["train_label"][:PROBE], BATCH)
  dead = nnx_mnist_tutorial.probe_and_strip(model, optimizer, probe, 0.05)
  for name, pre in (("conv1", h1), ("conv2", h2), ("linear1", h3)):
    np.testing.assert_array_equal(np.asarray(dead[name]["kernel"]),
                                  _never_positive(pre), err_msg=name)
  assert np.asarray(dead["conv1"]["kernel"]).sum() >= 2
  assert dead["linear2"]["kernel"] is None
