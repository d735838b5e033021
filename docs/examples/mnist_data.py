"""MNIST for the Flax example scripts: ``mnist.npz`` from the shared data.

The file is ``$SYNSTRIP_SHARED/data/mnist.npz`` when ``SYNSTRIP_SHARED`` is
set, else ``../shared/data/mnist.npz`` next to the repository.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def mnist_path() -> Path:
  """Where ``mnist.npz`` is looked for (the file need not exist)."""
  shared = os.environ.get("SYNSTRIP_SHARED")
  root = Path(shared) if shared else REPO.parent / "shared"
  return root / "data" / "mnist.npz"


def load(n_train: Optional[int] = None, n_test: Optional[int] = None
         ) -> dict[str, np.ndarray]:
  """``{'train_image', 'train_label', 'test_image', 'test_label'}``: images
  ``[N, 28, 28, 1]`` float32 in ``[0, 1]``, labels ``[N]`` int32; the first
  ``n_train`` / ``n_test`` examples of each split (all when ``None``)."""
  path = mnist_path()
  if not path.exists():
    raise FileNotFoundError(
        f"MNIST file {path} does not exist (set $SYNSTRIP_SHARED to the "
        "directory that holds data/mnist.npz)")
  with np.load(path) as d:
    return {"train_image": d["x_train"][:n_train].astype(np.float32) / 255.0,
            "train_label": d["y_train"][:n_train].astype(np.int32),
            "test_image": d["x_test"][:n_test].astype(np.float32) / 255.0,
            "test_label": d["y_test"][:n_test].astype(np.int32)}


def batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
            rng: Optional[np.random.Generator] = None
            ) -> Iterator[dict[str, np.ndarray]]:
  """``{'image', 'label'}`` batches (shuffled when ``rng`` is given; the
  last incomplete batch dropped, as the Flax example does)."""
  order = (np.arange(len(images)) if rng is None
           else rng.permutation(len(images)))
  for i in range(len(images) // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {"image": images[idx], "label": labels[idx]}


def main(train_and_evaluate: Callable[..., Any], description: str,
         batch_size: int, argv: Optional[Sequence[str]] = None) -> None:
  """Command line of the example scripts: ``--epochs``, ``--batch-size``,
  ``--train-examples``, ``--test-examples``, ``--stripping-factor``."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=batch_size)
  p.add_argument("--train-examples", type=int, default=None)
  p.add_argument("--test-examples", type=int, default=None)
  p.add_argument("--stripping-factor", type=float, default=0.05)
  args = p.parse_args(argv)
  data = load(args.train_examples, args.test_examples)
  train_and_evaluate(data, epochs=args.epochs, batch_size=args.batch_size,
                     stripping_factor=args.stripping_factor)
