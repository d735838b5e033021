"""The Flax NNX MNIST tutorial's CNN with synaptic stripping added.

After ``docs_nnx/mnist_tutorial`` of the Flax repository: the ``CNN`` class,
the optimizer and metrics, ``loss_fn``, ``train_step`` and ``eval_step`` are
restated from there unmodified; the lines marked ``# synstrip`` are all that
stripping adds (the targets, built from shapes so that no BatchNorm statistic
moves; the optimizer wrapper; a probe and strip event after each epoch, in
eval mode). The ReLUs see the BatchNorms' outputs, so each BatchNorm is paired
with the Conv whose kernel it normalizes. Run from the repository root::

    PYTHONPATH=$PWD python docs/examples/nnx_mnist_tutorial.py --epochs 2

(data: ``../shared/data/mnist.npz`` or ``$SYNSTRIP_SHARED/data/mnist.npz``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mnist_data
import synstrip_jax as ss  # synstrip
from synstrip_jax import nnx as ss_nnx  # synstrip

SELECT = {'batch_norm1': 'conv1', 'batch_norm2': 'conv2',  # synstrip
          'linear1': 'linear1'}  # synstrip


class CNN(nnx.Module):
  """A simple CNN model."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = nnx.relu(self.dropout2(self.linear1(x)))
    x = self.linear2(x)
    return x


def loss_fn(model: CNN, batch):
  logits = model(batch['image'])
  loss = optax.softmax_cross_entropy_with_integer_labels(
    logits=logits, labels=batch['label']
  ).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch):
  """Train for a single step."""
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.
  optimizer.update(model, grads)  # In-place updates.


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch['label'])  # In-place updates.


def _stats(model, batch):  # synstrip: statistics of the selected layers
  return ss_nnx.capture_stats(model, batch['image'], select=SELECT)[1]


def probe_and_strip(model, optimizer, probe_batches, stripping_factor):  # synstrip
  """A strip event in eval mode (BatchNorm running averages, no dropout)."""
  model.eval()
  dead = ss.probe_dead(_stats, model, probe_batches)
  ss_nnx.strip(model, optimizer, dead, stripping_factor=stripping_factor)
  model.train()
  return dead


def train_and_evaluate(data: dict[str, Any], *, epochs: int, batch_size: int,
                       learning_rate: float = 0.005, momentum: float = 0.9,
                       stripping_factor: float = 0.05, probe_examples: int = 1024,
                       seed: int = 0, log=print):
  """Train, with a strip event after every epoch; ``(model, optimizer, last
  dead)``."""
  model = CNN(rngs=nnx.Rngs(seed))
  targets = ss_nnx.targets(model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32),  # synstrip
                           select=SELECT)  # synstrip
  optimizer = nnx.Optimizer(
      model, ss.with_stripping(optax.adamw(learning_rate, momentum), targets),  # synstrip
      wrt=nnx.Param)
  metrics = nnx.MultiMetric(
    accuracy=nnx.metrics.Accuracy(),
    loss=nnx.metrics.Average('loss'),
  )
  rng = jax.random.key(seed)
  dead = None
  for epoch in range(1, epochs + 1):
    model.train()
    rng, key = jax.random.split(rng)
    order = jax.random.permutation(key, len(data['train_image']))
    for batch in mnist_data.batches(data['train_image'][order],
                                    data['train_label'][order], batch_size):
      train_step(model, optimizer, metrics, batch)
    train = {f'train_{k}': float(v) for k, v in metrics.compute().items()}
    metrics.reset()
    probe = mnist_data.batches(data['train_image'][:probe_examples],  # synstrip
                               data['train_label'][:probe_examples], batch_size)  # synstrip
    dead = probe_and_strip(model, optimizer, probe, stripping_factor)  # synstrip
    model.eval()
    for batch in mnist_data.batches(data['test_image'], data['test_label'],
                                    batch_size):
      eval_step(model, metrics, batch)
    test = {f'test_{k}': float(v) for k, v in metrics.compute().items()}
    metrics.reset()
    counts = {k.split('/')[0]: int(v) for k, v in ss.dead_counts(dead).items()}
    log(f'epoch {epoch}: ' + ', '.join(f'{k}: {v:.4f}' for k, v in
                                       {**train, **test}.items())
        + f', dead: {counts}')
  return model, optimizer, dead


def main(argv: Optional[Sequence[str]] = None) -> None:
  mnist_data.main(train_and_evaluate, __doc__.split('\n')[0], 32, argv)


if __name__ == '__main__':
  main()
