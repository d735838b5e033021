"""The task sequences of the continual-learning study
(``experiments/continual.py``): their sizes and their tasks.

  mnist  online permuted MNIST: every task draws a fresh fixed permutation of
         the 784 pixels and ``examples`` training images (without
         replacement, from the 60,000); each is seen once.
  cifar  the first 3,200 CIFAR-10 training images (the lossless 4k subset,
         2x2-average-pooled to 16 x 16 x 3) with a fresh permutation of the
         10 labels per task, ``epochs`` passes per task.

Every arm of a seed sees the same tasks and batches.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from synstrip_vit.paths import shared_file


class Bench(NamedTuple):
  """One task sequence.

  Attributes:
    name: ``'mnist'`` or ``'cifar'``.
    tasks: number of tasks.
    examples: training examples per task (per pass).
    epochs: passes over them per task (1: each example seen once).
    batch: mini-batch size.
    lr: SGD step size.
    width: hidden width.
    depth: hidden layers of the MLP.
    probe: held-out probe examples per task.
    tail: the last ``tail`` training examples give the online accuracy.
    chunk: SGD steps per call of a per-step remedy (CBP, shrink & perturb).
  """
  name: str
  tasks: int
  examples: int
  epochs: int
  batch: int
  lr: float
  width: int
  depth: int
  probe: int
  tail: int
  chunk: int = 20


BENCHES = {
    "mnist": Bench("mnist", tasks=50, examples=4000, epochs=1, batch=1,
                   lr=0.01, width=100, depth=3, probe=2000, tail=1000),
    "cifar": Bench("cifar", tasks=30, examples=3200, epochs=3, batch=16,
                   lr=0.02, width=100, depth=2, probe=800, tail=3200),
}


class Data(NamedTuple):
  """Float images in [0, 1] (``[N, H, W, C]``) and int32 labels."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_data(bench: Bench) -> Data:
  """The bench's arrays from the shared folder (``mnist.npz``;
  ``cifar10_lossless_4k.npz``, 2x2-average-pooled)."""
  name = "mnist.npz" if bench.name == "mnist" else "cifar10_lossless_4k.npz"
  pool = 1 if bench.name == "mnist" else 2

  def images(x):
    n, h, w, c = x.shape
    x = x.astype(np.float32).reshape(n, h // pool, pool, w // pool, pool, c)
    return x.mean(axis=(2, 4)) / 255.0

  with np.load(shared_file("data", name)) as f:
    return Data(images(f["x_train"]), f["y_train"].astype(np.int32),
                images(f["x_test"]), f["y_test"].astype(np.int32))


class Task(NamedTuple):
  """One task: ``x`` ``[steps, batch, ...]``, ``y`` ``[steps, batch]``, and
  the probe ``x_probe`` ``[P, ...]``, ``y_probe`` ``[P]``."""
  x: np.ndarray
  y: np.ndarray
  x_probe: np.ndarray
  y_probe: np.ndarray


def make_task(data: Data, bench: Bench, seed: int, task: int) -> Task:
  """Task ``task`` of ``seed`` (the same for every arm): MNIST permutes the
  pixels, CIFAR the labels; the training order is drawn per pass."""
  rng = np.random.default_rng([seed, task])
  n = len(data.x_train)
  if bench.name == "mnist":
    perm = rng.permutation(784)
    def view(x):
      return x.reshape(len(x), -1)[:, perm]
    labels = np.arange(10, dtype=np.int32)
  else:
    labels = rng.permutation(10).astype(np.int32)
    def view(x):
      return x
  order = np.concatenate([rng.permutation(n)[: bench.examples]
                          for _ in range(bench.epochs)])
  steps = len(order) // (bench.batch * bench.chunk) * bench.chunk
  order = order[: steps * bench.batch]
  x = view(data.x_train[order]).reshape(steps, bench.batch,
                                        *view(data.x_train[:1]).shape[1:])
  y = labels[data.y_train[order]].reshape(steps, bench.batch)
  return Task(x, y, view(data.x_test[: bench.probe]),
              labels[data.y_test[: bench.probe]])


__all__ = ["BENCHES", "Bench", "Data", "Task", "load_data", "make_task"]
