"""The Flax examples' Linen MNIST CNN with synaptic stripping added.

After ``examples/mnist/train.py`` of the Flax repository: the ``CNN`` class,
``apply_model``, ``update_model``, ``train_epoch`` and ``create_train_state``
are restated from there unmodified; the lines marked ``# synstrip`` are all
that stripping adds (the targets, the optimizer wrapper, and a probe and strip
event after each epoch). Run::

    PYTHONPATH=$PWD python docs/examples/flax_mnist_linen.py --epochs 2

(data: ``../shared/data/mnist.npz`` or ``$SYNSTRIP_SHARED/data/mnist.npz``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

import mnist_data
import synstrip_jax as ss  # synstrip
from synstrip_jax import linen as ss_linen  # synstrip

SELECT = ["Conv_0", "Conv_1", "Dense_0"]  # synstrip: the layers before a ReLU


class CNN(nn.Module):
  """A simple CNN model."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=64, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=256)(x)
    x = nn.relu(x)
    x = nn.Dense(features=10)(x)
    return x


@jax.jit
def apply_model(state, images, labels):
  """Computes gradients, loss and accuracy for a single batch."""

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, images)
    one_hot = jax.nn.one_hot(labels, 10)
    loss = jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))
    return loss, logits

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return grads, loss, accuracy


@jax.jit
def update_model(state, grads):
  return state.apply_gradients(grads=grads)


def train_epoch(state, train_ds, batch_size, rng):
  """Train for a single epoch."""
  train_ds_size = len(train_ds['image'])
  steps_per_epoch = train_ds_size // batch_size

  perms = jax.random.permutation(rng, len(train_ds['image']))
  perms = perms[: steps_per_epoch * batch_size]  # skip incomplete batch
  perms = perms.reshape((steps_per_epoch, batch_size))

  epoch_loss = []
  epoch_accuracy = []

  for perm in perms:
    batch_images = train_ds['image'][perm, ...]
    batch_labels = train_ds['label'][perm, ...]
    grads, loss, accuracy = apply_model(state, batch_images, batch_labels)
    state = update_model(state, grads)
    epoch_loss.append(loss)
    epoch_accuracy.append(accuracy)
  train_loss = np.mean(epoch_loss)
  train_accuracy = np.mean(epoch_accuracy)
  return state, train_loss, train_accuracy


def create_train_state(rng, learning_rate, momentum):
  """Creates initial `TrainState`."""
  cnn = CNN()
  params = cnn.init(rng, jnp.ones([1, 28, 28, 1]))['params']
  targets = ss_linen.targets(cnn, {'params': params}, jnp.ones([1, 28, 28, 1]),  # synstrip
                             select=SELECT)  # synstrip
  tx = ss.with_stripping(optax.sgd(learning_rate, momentum), targets)  # synstrip
  return train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)


def _stats(params, batch):  # synstrip: statistics of the selected layers
  return ss_linen.capture_stats(CNN(), {'params': params}, batch['image'],
                                select=SELECT)[1]


def probe_and_strip(state, probe_ds, batch_size, stripping_factor):  # synstrip
  """A strip event: probe for dead neurons, strip them (``(state, dead)``)."""
  batches = mnist_data.batches(probe_ds['image'], probe_ds['label'], batch_size)
  dead = ss.probe_dead(_stats, state.params, batches)
  params, opt_state = ss.strip_event(state.params, state.opt_state, dead,
                                     stripping_factor=stripping_factor)
  return state.replace(params=params, opt_state=opt_state), dead


def train_and_evaluate(data: dict[str, Any], *, epochs: int, batch_size: int,
                       learning_rate: float = 0.1, momentum: float = 0.9,
                       stripping_factor: float = 0.05, probe_examples: int = 1024,
                       seed: int = 0, log=print):
  """Train, with a strip event after every epoch; ``(state, last dead)``."""
  train_ds = {'image': data['train_image'], 'label': data['train_label']}
  probe_ds = {k: v[:probe_examples] for k, v in train_ds.items()}
  rng = jax.random.key(seed)
  rng, init_rng = jax.random.split(rng)
  state = create_train_state(init_rng, learning_rate, momentum)
  dead = None
  for epoch in range(1, epochs + 1):
    rng, input_rng = jax.random.split(rng)
    state, train_loss, train_accuracy = train_epoch(
        state, train_ds, batch_size, input_rng)
    state, dead = probe_and_strip(state, probe_ds, batch_size,  # synstrip
                                  stripping_factor)  # synstrip
    _, test_loss, test_accuracy = apply_model(
        state, data['test_image'], data['test_label'])
    counts = {k.split('/')[0]: int(v) for k, v in ss.dead_counts(dead).items()}
    log(f'epoch:{epoch:3d}, train_loss: {train_loss:.4f}, train_accuracy: '
        f'{train_accuracy * 100:.2f}, test_loss: {test_loss:.4f}, '
        f'test_accuracy: {test_accuracy * 100:.2f}, dead: {counts}')
  return state, dead


def main(argv: Optional[Sequence[str]] = None) -> None:
  mnist_data.main(train_and_evaluate, __doc__.split('\n')[0], 128, argv)


if __name__ == '__main__':
  main()
