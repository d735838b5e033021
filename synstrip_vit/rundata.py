"""The data of a run: the arrays, their input functions and the epoch size.

:class:`RunData` loads the dataset of a config (limits, held-out probe
split, normalisation statistics, fingerprint); :func:`input_fns` gives the
augmentation and preprocessing the compiled steps apply; and
:func:`steps_per_epoch` and :func:`shares_eval_step` follow from the sizes.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synstrip_vit import datasets, input_pipeline
from synstrip_vit import workdir as workdir_lib
from synstrip_vit.augment import augment_batch

#: ``data.on_device='auto'`` keeps the training arrays on an accelerator
#: when they take at most this many bytes (CIFAR-10's 50,000 images: 150 MB).
RESIDENT_BUDGET_BYTES = 4 << 30


class RunData:
  """The arrays of one run: train, probe (held-out or test) and test parts.

  Attributes:
    x_train, y_train, x_probe, y_probe, x_test, y_test: NumPy arrays (every
      process holds them; each reads only its rows of every batch).
    num_classes: number of classes.
    image_shape: ``(H, W, C)``.
    mean, std: per-channel statistics of the training part (normalisation).
    fingerprint: SHA-256 of the arrays used (after the limits), recorded
      with the run so that a resume on other data is refused.

  Raises:
    ValueError: data that cannot be trained on (no training or test images,
      an image side of 0, a constant channel).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    c = config.data
    ds = datasets.load_dataset(c.dataset, data_dir=c.data_dir or None)
    x_train, y_train = ds.x_train, ds.y_train
    x_test, y_test = ds.x_test, ds.y_test
    if c.train_limit:
      x_train, y_train = x_train[:c.train_limit], y_train[:c.train_limit]
    if c.test_limit:
      x_test, y_test = x_test[:c.test_limit], y_test[:c.test_limit]
    if len(x_train) == 0:
      raise ValueError(f"dataset {c.dataset!r} has no training images")
    if len(x_test) == 0:
      raise ValueError(f"dataset {c.dataset!r} has no test images (an empty "
                       "test split cannot be evaluated)")
    self.fingerprint = workdir_lib.data_fingerprint(
        {"x_train": x_train, "y_train": y_train, "x_test": x_test,
         "y_test": y_test})
    if config.stripping.probe == "train_holdout":
      x_train, y_train, x_probe, y_probe = input_pipeline.split_holdout(
          x_train, y_train, fraction=config.stripping.probe_fraction,
          seed=config.run.seed)
    else:
      x_probe, y_probe = x_test, y_test
    self.x_train, self.y_train = x_train, y_train
    self.x_probe, self.y_probe = x_probe, y_probe
    self.x_test, self.y_test = x_test, y_test
    self.num_classes = ds.num_classes
    self.image_shape = ds.image_shape
    self.mean, self.std = normalization(c, x_train)
    input_pipeline.check_normalizable(self.mean, self.std, c.dataset)


def normalization(data: ml_collections.ConfigDict, x_train: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, std)`` in 0..255 units: ``data.mean``/``data.std`` (0..1
  units, as torchvision's ``Normalize``) times 255, or the training part's
  own statistics when they are ``()``.

  Raises:
    ValueError: only one of them set, or not one value per channel.
  """
  if not data.mean and not data.std:
    return input_pipeline.channel_stats(x_train)
  channels = x_train.shape[-1]
  if len(data.mean) != channels or len(data.std) != channels:
    raise ValueError(f"config.data.mean={data.mean!r} and config.data.std="
                     f"{data.std!r} must both hold {channels} values (one "
                     f"per channel of {data.dataset!r}) or both be ()")
  return (np.asarray(data.mean, np.float32) * 255,
          np.asarray(data.std, np.float32) * 255)


def resident(config: ml_collections.ConfigDict, run_data: RunData,
             platform: str | None = None) -> bool:
  """Whether the training arrays live on the devices (``data.on_device``;
  ``auto``: an accelerator and at most :data:`RESIDENT_BUDGET_BYTES`)."""
  mode = config.data.on_device
  if mode != "auto":
    return mode == "yes"
  platform = platform or jax.default_backend()
  size = run_data.x_train.nbytes + run_data.y_train.nbytes
  return platform != "cpu" and size <= RESIDENT_BUDGET_BYTES


def input_fns(config: ml_collections.ConfigDict, run_data: RunData
              ) -> tuple[Callable, Callable]:
  """``augment(key, uint8) -> float`` and ``preprocess(uint8) -> float``.

  ``augment`` is the original's training transform
  (:func:`synstrip_vit.augment.augment_batch`: crop after grey padding,
  ``data.flip``, AutoAugment with the data set's policy when
  ``data.autoaugment``) or, with ``data.augment`` off, ``preprocess``.
  """
  mean, std = jnp.asarray(run_data.mean), jnp.asarray(run_data.std)

  def preprocess(images):
    return input_pipeline.normalize(images, mean, std)

  def augment(key, images):
    if not config.data.augment:
      return preprocess(images)
    return augment_batch(key, images, mean=mean, std=std,
                         dataset=config.data.dataset,
                         autoaugment=config.data.autoaugment,
                         padding=config.data.crop_padding,
                         flip=config.data.flip)

  return augment, preprocess


def steps_per_epoch(config: ml_collections.ConfigDict, run_data: RunData
                    ) -> int:
  """Optimizer steps per epoch: the whole training batches (at least 1).

  A step's position is ``epoch, batch = divmod(step, steps_per_epoch)``.
  """
  return max(len(run_data.x_train) // config.run.batch_size, 1)


#: Up to this many test batches, the test pass runs the probe step (which
#: also collects the activation statistics) instead of a plain eval step of
#: its own: one compile less (about a second on a 2-core CPU) for at most a
#: few batches' worth of statistics per epoch.
SHARED_EVAL_MAX_BATCHES = 8


def shares_eval_step(config: ml_collections.ConfigDict, run_data: RunData
                     ) -> bool:
  """Whether the test pass uses the probe step (see
  :data:`SHARED_EVAL_MAX_BATCHES`; always with ``stripping.probe='test'``,
  where one pass gives both). The values are the same either way."""
  batches = math.ceil(len(run_data.x_test) / config.run.eval_batch_size)
  return (config.stripping.probe == "test"
          or batches <= SHARED_EVAL_MAX_BATCHES)


__all__ = ["RESIDENT_BUDGET_BYTES", "RunData", "SHARED_EVAL_MAX_BATCHES",
           "input_fns", "normalization", "resident", "shares_eval_step",
           "steps_per_epoch"]
