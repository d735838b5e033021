"""The one place a training run's configuration is defined and checked.

``base_config()`` lists every field with its default (the original's set-up
where it has one); the files in ``experiments/configs/`` start from it and
override what differs. :func:`validate` checks a config before anything is
loaded or trained and raises ``ValueError`` naming the offending field and
value.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from synstrip_jax.stripping import validate_stripping_factor

PROBES = ("train_holdout", "test")
DTYPES = ("float32", "bfloat16")
MODELS = ("vit", "mlp")
ACTIVATIONS = ("relu", "gelu")


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run, with the original's defaults (ViT on CIFAR-10).

  Field reference (also in README.md):

  * data: ``dataset`` (``digits``, ``npz:<path>``, ``cifar10``,
    ``cifar100``, ``svhn_cropped``), ``data_dir`` (TFDS data dir, ``''`` for
    the default), ``train_limit`` / ``test_limit`` (use only the first N
    examples; 0 = all), ``augment`` (random crop + flip on train batches),
    ``crop_padding``, ``flip``.
  * model: ``model`` (``vit``/``mlp``), ``activation`` (``relu``/``gelu``),
    ``patch_size``, ``hidden_size``, ``depth``, ``num_heads``, ``mlp_dim``,
    ``dropout`` (ViT), ``width`` (MLP; ``depth`` is its hidden layer count),
    ``dtype`` (computation: ``float32``/``bfloat16``; params stay float32).
  * optimisation: ``num_epochs``, ``batch_size`` (global, over all devices),
    ``eval_batch_size``, ``learning_rate``, ``weight_decay``,
    ``warmup_epochs``, ``min_learning_rate``, ``seed``.
  * stripping: ``strip``, ``stripping_factor``, ``stripping_frequency``
    (epochs), ``probe`` (``train_holdout``: a held-out part of the training
    data, or ``test``: the test set as the original does), ``probe_fraction``
    (held-out share), ``tau`` (< 0: exact rule ``total == 0``; else ReDo
    dormancy threshold), ``redo`` (the ReDo baseline: at the same events,
    recycle the dead neurons instead of / besides stripping them:
    re-initialise their incoming weights, zero their outgoing weights and
    the optimizer moments of both; see :mod:`synstrip_jax.redo`).
  * run: ``checkpoint_every_steps`` (0: only at epoch ends),
    ``max_checkpoints``, ``progress_bar``.
  """
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "cifar10"
  c.data_dir = ""
  c.train_limit = 0
  c.test_limit = 0
  c.augment = True
  c.crop_padding = 4
  c.flip = True
  # Model.
  c.model = "vit"
  c.activation = "relu"
  c.patch_size = 4
  c.hidden_size = 384
  c.depth = 7
  c.num_heads = 8
  c.mlp_dim = 1536
  c.dropout = 0.0
  c.width = 256
  c.dtype = "float32"
  # Optimisation.
  c.num_epochs = 200
  c.batch_size = 128
  c.eval_batch_size = 256
  c.learning_rate = 1e-3
  c.weight_decay = 5e-5
  c.warmup_epochs = 5
  c.min_learning_rate = 1e-5
  c.seed = 0
  # Stripping.
  c.strip = True
  c.stripping_factor = 0.05
  c.stripping_frequency = 1
  c.probe = "train_holdout"
  c.probe_fraction = 0.1
  c.tau = -1.0
  c.redo = False
  # Run.
  c.checkpoint_every_steps = 0
  c.max_checkpoints = 2
  c.progress_bar = True
  return c


def original_config(dataset: str) -> ml_collections.ConfigDict:
  """The original's set-up (REFERENCE.md) on a TFDS ``dataset``.

  ViT 7 blocks, hidden 384, 8 heads, MLP 1536; AdamW 1e-3 / 5e-5; 5 warm-up
  epochs then cosine to 1e-5; 200 epochs; batch 128; stripping factor 0.05
  every epoch. Probe: a held-out 10% of the training set (``probe='test'``
  reproduces the original, which probes on the test set). SVHN is not
  flipped (digits are not mirror-symmetric).
  """
  c = base_config()
  c.dataset = dataset
  c.flip = not dataset.startswith("svhn")
  return c


#: Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("progress_bar", "data_dir", "checkpoint_every_steps",
                     "max_checkpoints")


def _int(c, name: str, minimum: int) -> None:
  v = c[name]
  if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
    raise ValueError(f"config.{name} must be an int >= {minimum}, got {v!r}")


def _choice(c, name: str, choices: tuple[str, ...]) -> None:
  if c[name] not in choices:
    raise ValueError(f"config.{name}={c[name]!r} is not one of {choices}")


def _float(c, name: str, lo: float, hi: float, *, open_lo: bool = False,
           open_hi: bool = False) -> None:
  v = c[name]
  ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
        and math.isfinite(v) and (v > lo if open_lo else v >= lo)
        and (v < hi if open_hi else v <= hi))
  if not ok:
    lb, rb = "(" if open_lo else "[", ")" if open_hi else "]"
    raise ValueError(f"config.{name} must be a number in {lb}{lo}, {hi}{rb}, "
                     f"got {v!r}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ``ValueError`` naming the first invalid field of ``c``.

  Checks types and ranges only; the dataset itself is checked when loaded
  (still before training starts).
  """
  known = set(base_config().keys())
  unknown = sorted(set(c.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown}; known: "
                     f"{sorted(known)}")
  if not isinstance(c.dataset, str) or not c.dataset:
    raise ValueError(f"config.dataset must be a non-empty str, got "
                     f"{c.dataset!r}")
  try:
    validate_stripping_factor(c.stripping_factor)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.stripping_factor: {e}") from None
  _choice(c, "model", MODELS)
  _choice(c, "activation", ACTIVATIONS)
  _choice(c, "dtype", DTYPES)
  _choice(c, "probe", PROBES)
  for name in ("patch_size", "hidden_size", "depth", "num_heads", "mlp_dim",
               "width", "num_epochs", "batch_size", "eval_batch_size",
               "stripping_frequency", "max_checkpoints"):
    _int(c, name, 1)
  for name in ("train_limit", "test_limit", "crop_padding", "seed",
               "warmup_epochs", "checkpoint_every_steps"):
    _int(c, name, 0)
  _float(c, "dropout", 0.0, 1.0, open_hi=True)
  _float(c, "learning_rate", 0.0, math.inf, open_lo=True, open_hi=True)
  _float(c, "min_learning_rate", 0.0, math.inf, open_hi=True)
  _float(c, "weight_decay", 0.0, math.inf, open_hi=True)
  _float(c, "probe_fraction", 0.0, 1.0, open_lo=True, open_hi=True)
  if not isinstance(c.tau, (int, float)) or not math.isfinite(c.tau):
    raise ValueError(f"config.tau must be a finite number, got {c.tau!r}")
  if c.hidden_size % c.num_heads:
    raise ValueError(f"config.num_heads={c.num_heads} does not divide "
                     f"config.hidden_size={c.hidden_size}")
  for name in ("strip", "redo", "augment", "flip", "progress_bar"):
    if not isinstance(c[name], bool):
      raise ValueError(f"config.{name} must be True or False, got "
                       f"{c[name]!r}")


def model_kwargs(c: ml_collections.ConfigDict, num_classes: int
                 ) -> tuple[str, dict[str, Any]]:
  """``(model name, kwargs)`` for :func:`synstrip_vit.models.create_model`."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.dtype]
  if c.model == "vit":
    return "vit", dict(num_classes=num_classes, patch_size=c.patch_size,
                       hidden_size=c.hidden_size, depth=c.depth,
                       num_heads=c.num_heads, mlp_dim=c.mlp_dim,
                       activation=c.activation, dropout=c.dropout,
                       dtype=dtype)
  return "mlp", dict(num_classes=num_classes, width=c.width, depth=c.depth,
                     activation=c.activation, dtype=dtype)


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
  """Fields whose values differ (ignoring :data:`RESUMABLE_CHANGES`)."""
  keys = (set(old) | set(new)) - set(RESUMABLE_CHANGES)
  return {k: (old.get(k), new.get(k)) for k in sorted(keys)
          if old.get(k) != new.get(k)}


__all__ = ["ACTIVATIONS", "DTYPES", "MODELS", "PROBES", "RESUMABLE_CHANGES",
           "base_config", "config_diff", "model_kwargs", "original_config",
           "validate"]
