"""The one place a training run's configuration is defined and checked.

A config has seven sections; ``base_config()`` gives every field its default
(the original's set-up where it has one) and the files in
``experiments/configs/`` start from it and override what differs::

  data       dataset, data_dir, train_limit, test_limit, augment,
             crop_padding, flip, autoaugment, mean, std, on_device
  model      name + the constructor fields of its class (models.MODELS;
             passed to it as keyword arguments; see synstrip_vit/models/)
  optimizer  learning_rate, min_learning_rate, warmup_epochs, weight_decay
  stripping  enabled, factor, frequency, probe, probe_fraction, tau
  remedy     name (none, redo, cbp, shrink_perturb), frequency, tau,
             replacement_rate, maturity_threshold, decay_rate, shrink, sigma
             (synstrip_vit.remedy; runs after stripping at a shared event)
  run        num_epochs, batch_size, eval_batch_size, seed,
             checkpoint_every_steps, max_checkpoints, progress_bar,
             compilation_cache_dir, steps_per_dispatch
  eval       corruptions, severities, corruption_seed, frost_dir (the
             corrupted test sets evaluated after training)

On the command line: ``--config.stripping.factor=0.1``,
``--config.model.depth=4``. :func:`validate` checks a config before
anything is loaded or trained and raises ``ValueError`` naming the field and
value; the model's own fields are checked by the model class (once, there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

from synstrip_jax import DEFAULT_STRIPPING_FACTOR
from synstrip_jax.validation import validate_stripping_factor
from synstrip_vit import models

PROBES = ("train_holdout", "test")
SECTIONS = ("data", "model", "optimizer", "stripping", "remedy", "run",
            "eval")
#: ``remedy.name``: the remedy applied to the neurons at its events
#: (:mod:`synstrip_vit.remedy`, :mod:`synstrip_jax.remedies`).
REMEDIES = ("none", "redo", "cbp", "shrink_perturb")
#: Fields of older configs and the field that takes the place of each.
REPLACED_FIELDS = {"stripping.redo": "remedy.name='redo' (with remedy.tau "
                                     "and remedy.frequency)"}
#: ``data.on_device``: ``auto`` keeps the training arrays on the accelerator
#: when they fit (:data:`synstrip_vit.rundata.RESIDENT_BUDGET_BYTES`; never
#: on CPU, where host and device memory are one), ``yes`` always, ``no``
#: never.
ON_DEVICE = ("auto", "yes", "no")

#: Fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("run.progress_bar", "data.data_dir",
                     "run.checkpoint_every_steps", "run.max_checkpoints",
                     "run.compilation_cache_dir", "eval.corruptions",
                     "eval.severities", "eval.corruption_seed",
                     "eval.frost_dir")

#: Model constructor fields that the config never sets.
_NOT_CONFIGURED = ("num_classes", "parent", "name")


def model_config(name: str = "vit") -> ml_collections.ConfigDict:
  """The ``model`` section of the model ``name`` (``models.MODELS``).

  ``name`` plus every constructor field of the model class that has a plain
  default (str, int, float, bool; ``dtype`` by its name), with that default:
  a field added to the model is configurable without being listed here.

  Raises:
    ValueError: unknown model name.
  """
  cls = models.model_spec(name).cls
  section = {"name": name}
  for field in dataclasses.fields(cls):
    default = field.default
    if field.name == "dtype":
      default = jnp.dtype(default).name
    if field.name not in _NOT_CONFIGURED and isinstance(
        default, (bool, int, float, str)):
      section[field.name] = default
  return ml_collections.ConfigDict(section)


def base_config(model: str = "vit") -> ml_collections.ConfigDict:
  """Every field of a run, with the original's defaults (ViT on CIFAR-10).

  Args:
    model: the model whose fields fill the ``model`` section (``vit`` or
      ``mlp``; see :func:`model_config`).

  ``stripping.probe`` is ``train_holdout`` (a held-out ``probe_fraction`` of
  the training data) or ``test`` (the test set, as the original);
  ``stripping.tau`` unset is the exact rule ``total == 0``, a number the
  ReDo dormancy threshold;
  ``run.checkpoint_every_steps`` 0 checkpoints at epoch ends only;
  ``run.compilation_cache_dir`` unset uses ``$JAX_COMPILATION_CACHE_DIR`` or
  ``~/.cache/synstrip_jax/jax_cache``, ``''`` disables the persistent
  compilation cache (see :mod:`synstrip_vit.compile_cache`; applied by
  ``experiments/train_vit.py``).

  ``data.autoaugment`` applies the original's AutoAugment policy for the
  data set (:func:`synstrip_vit.augment.augment_batch`) after the crop
  (grey fill 128) and flip; ``data.mean``/``data.std`` are per-channel
  normalisation constants in 0..1 units (``()``: the training part's own
  statistics); ``data.on_device`` is one of :data:`ON_DEVICE`;
  ``run.steps_per_dispatch`` optimizer steps run in one compiled program
  (``lax.scan``), so Python runs once per chunk. ``eval.corruptions``
  names corruptions of :mod:`synstrip_vit.corruptions` evaluated on the
  test set after training, at ``eval.severities``, generated from
  ``eval.corruption_seed`` (``frost`` needs ``eval.frost_dir``); results go
  to ``<workdir>/corrupted.json``.

  ``remedy.name`` (one of :data:`REMEDIES`) acts every ``remedy.frequency``
  epochs, after the strip event of the same epoch if any (so stripping and
  a remedy combine): ``redo`` recycles the neurons with ReDo score ``<=
  remedy.tau`` (unset: exact zero); ``cbp`` (continual backprop) replaces
  ``remedy.replacement_rate`` of the neurons older than
  ``remedy.maturity_threshold`` events with the lowest running utility
  (decay ``remedy.decay_rate``; its state is in the checkpoint);
  ``shrink_perturb`` sets ``p <- remedy.shrink * p + remedy.sigma * N(0,
  1)``. The fields of the other remedies are unused.
  """
  c = ml_collections.ConfigDict()
  c.data = dict(dataset="cifar10", data_dir="", train_limit=0, test_limit=0,
                augment=True, crop_padding=4, flip=True, autoaugment=False,
                mean=(), std=(), on_device="auto")
  c.model = model_config(model)
  c.optimizer = dict(learning_rate=1e-3, min_learning_rate=1e-5,
                     warmup_epochs=5, weight_decay=5e-5)
  c.stripping = dict(enabled=True, factor=DEFAULT_STRIPPING_FACTOR,
                     frequency=1, probe="train_holdout", probe_fraction=0.1,
                     tau=placeholder(float))
  c.remedy = dict(name="none", frequency=1, tau=placeholder(float),
                  replacement_rate=1e-4, maturity_threshold=100,
                  decay_rate=0.99, shrink=0.8, sigma=0.01)
  c.run = dict(num_epochs=200, batch_size=128, eval_batch_size=256, seed=0,
               checkpoint_every_steps=0, max_checkpoints=2,
               progress_bar=True, compilation_cache_dir=placeholder(str),
               steps_per_dispatch=1)
  c.eval = dict(corruptions=(), severities=(1, 2, 3, 4, 5),
                corruption_seed=0, frost_dir="")
  return c


def original_config(dataset: str) -> ml_collections.ConfigDict:
  """The original's set-up (docs/design.md) on a TFDS ``dataset``.

  ViT 7 blocks, hidden 384, 8 heads, MLP 1536; AdamW 1e-3 / 5e-5; 5 warm-up
  epochs then cosine to 1e-5; 200 epochs; batch 128; the library's default
  stripping factor every epoch. Probe: a held-out 10% of the training set
  (``stripping.probe='test'`` reproduces the original, which probes on the
  test set). SVHN is not flipped (digits are not mirror-symmetric).
  """
  c = base_config()
  c.data.dataset = dataset
  c.data.flip = not dataset.startswith("svhn")
  return c


# ------------------------------------------------------------------ checks

Check = Callable[[Any], Optional[str]]


def _int(minimum: int) -> Check:
  def check(v):
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
    return None if ok else f"must be an int >= {minimum}"
  return check


def _float(lo: float, hi: float, *, open_lo: bool = False,
           open_hi: bool = False) -> Check:
  def check(v):
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v) and (v > lo if open_lo else v >= lo)
          and (v < hi if open_hi else v <= hi))
    lb, rb = "(" if open_lo else "[", ")" if open_hi else "]"
    return None if ok else f"must be a number in {lb}{lo}, {hi}{rb}"
  return check


def _choice(choices: tuple[str, ...]) -> Check:
  return lambda v: None if v in choices else f"is not one of {choices}"


def _bool(v: Any) -> Optional[str]:
  return None if isinstance(v, bool) else "must be True or False"


def _str(*, empty: bool) -> Check:
  def check(v):
    ok = isinstance(v, str) and (empty or v)
    return None if ok else f"must be a{'' if empty else ' non-empty'} str"
  return check


def _optional_str(v: Any) -> Optional[str]:
  return None if v is None or isinstance(v, str) else "must be unset or a str"


def _channels(v: Any) -> Optional[str]:
  ok = isinstance(v, tuple) and all(
      isinstance(x, (int, float)) and not isinstance(x, bool)
      and math.isfinite(x) for x in v)
  return None if ok else "must be a tuple of numbers (() for the data's own)"


def _corruptions(v: Any) -> Optional[str]:
  if v == ():
    return None
  from synstrip_vit import corruptions  # pylint: disable=import-outside-toplevel
  known = corruptions.CORRUPTIONS + corruptions.EXTRA_CORRUPTIONS
  ok = isinstance(v, tuple) and all(n in known for n in v)
  return None if ok else f"must be a tuple of names from {known}"


def _severities(v: Any) -> Optional[str]:
  ok = isinstance(v, tuple) and v and all(
      isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 5
      for s in v)
  return None if ok else "must be a non-empty tuple of ints in 1..5"


def _stripping_factor(v: Any) -> Optional[str]:
  try:
    validate_stripping_factor(v)
  except (TypeError, ValueError) as e:
    return f"invalid: {e}"
  return None


def _tau(v: Any) -> Optional[str]:
  if v is None or _float(0.0, math.inf, open_hi=True)(v) is None:
    return None
  return "must be unset (exact rule) or a finite number >= 0"


#: Every field outside the ``model`` section and its check.
CHECKS: dict[str, Check] = {
    "data.dataset": _str(empty=False), "data.data_dir": _str(empty=True),
    "data.train_limit": _int(0), "data.test_limit": _int(0),
    "data.augment": _bool, "data.crop_padding": _int(0), "data.flip": _bool,
    "data.autoaugment": _bool, "data.mean": _channels, "data.std": _channels,
    "data.on_device": _choice(ON_DEVICE),
    "optimizer.learning_rate": _float(0.0, math.inf, open_lo=True,
                                      open_hi=True),
    "optimizer.min_learning_rate": _float(0.0, math.inf, open_hi=True),
    "optimizer.warmup_epochs": _int(0),
    "optimizer.weight_decay": _float(0.0, math.inf, open_hi=True),
    "stripping.enabled": _bool, "stripping.factor": _stripping_factor,
    "stripping.frequency": _int(1), "stripping.probe": _choice(PROBES),
    "stripping.probe_fraction": _float(0.0, 1.0, open_lo=True, open_hi=True),
    "stripping.tau": _tau,
    "remedy.name": _choice(REMEDIES), "remedy.frequency": _int(1),
    "remedy.tau": _tau, "remedy.replacement_rate": _float(0.0, 1.0),
    "remedy.maturity_threshold": _int(0),
    "remedy.decay_rate": _float(0.0, 1.0, open_hi=True),
    "remedy.shrink": _float(0.0, 1.0),
    "remedy.sigma": _float(0.0, math.inf, open_hi=True),
    "run.num_epochs": _int(1), "run.batch_size": _int(1),
    "run.eval_batch_size": _int(1), "run.seed": _int(0),
    "run.checkpoint_every_steps": _int(0), "run.max_checkpoints": _int(1),
    "run.progress_bar": _bool, "run.compilation_cache_dir": _optional_str,
    "run.steps_per_dispatch": _int(1),
    "eval.corruptions": _corruptions, "eval.severities": _severities,
    "eval.corruption_seed": _int(0), "eval.frost_dir": _str(empty=True),
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': 1}} -> {'a.b': 1}`` (a config as plain nested dicts)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def replaced_field(name: str) -> str:
  """The error message of the old field ``name`` (:data:`REPLACED_FIELDS`)."""
  return (f"config.{name} no longer exists: use "
          f"config.{REPLACED_FIELDS[name]}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ``ValueError`` naming the first invalid field of ``c``.

  Checks the fields of :data:`CHECKS` and builds the model once (its class
  checks its own fields); the dataset itself is checked when loaded (still
  before training starts).
  """
  sections = sorted(c.keys())
  if sections != sorted(SECTIONS):
    raise ValueError(f"config sections {sections} must be {list(SECTIONS)}")
  fields = flatten({k: v for k, v in c.to_dict().items() if k != "model"})
  unknown = sorted(set(fields) - set(CHECKS))
  for name in unknown:
    if name in REPLACED_FIELDS:
      raise ValueError(replaced_field(name))
  missing = sorted(set(CHECKS) - set(fields))
  if unknown or missing:
    raise ValueError(f"unknown config field(s) {unknown}, missing {missing}")
  for name, check in CHECKS.items():
    problem = check(fields[name])
    if problem:
      raise ValueError(f"config.{name}={fields[name]!r} {problem}")
  try:
    create_model(c.model, num_classes=2)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from None


def create_model(section: ml_collections.ConfigDict, num_classes: int):
  """The model of a ``model`` section: ``create_model(name, **fields)``."""
  return models.create_model(**section, num_classes=num_classes)


def warmup_epochs(c: ml_collections.ConfigDict) -> tuple[int, Optional[str]]:
  """The warm-up length a run uses, and a one-line notice if it was clamped.

  A warm-up as long as the run or longer would never reach the peak
  learning rate; it is clamped to half the run (rounded down).
  """
  warmup, epochs = c.optimizer.warmup_epochs, c.run.num_epochs
  if warmup < epochs:
    return warmup, None
  clamped = epochs // 2
  return clamped, (f"notice: optimizer.warmup_epochs={warmup} >= "
                   f"run.num_epochs={epochs}; warming up for {clamped} "
                   "epoch(s) instead so the learning rate reaches its peak")


def upgrade(old: dict[str, Any]) -> dict[str, Any]:
  """A config dict written without a ``remedy`` section (``stripping.redo``
  instead) as today's equivalent: ``redo`` True becomes ``remedy.name='redo'``
  with the stripping events' ``tau`` and ``frequency``, the other remedy
  fields their defaults. Any other dict is returned as it is."""
  if "remedy" in old or not isinstance(old.get("stripping"), dict):
    return old
  stripping = dict(old["stripping"])
  redo = stripping.pop("redo", False)
  remedy = base_config().remedy.to_dict()
  if redo:
    remedy.update(name="redo", tau=stripping.get("tau"),
                  frequency=stripping.get("frequency", 1))
  return {**old, "stripping": stripping, "remedy": remedy}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
  """Dotted fields whose values differ (ignoring :data:`RESUMABLE_CHANGES`).

  ``old`` and ``new`` are configs as nested dicts (e.g. two ``config.json``;
  ``old`` is read through :func:`upgrade`).
  """
  old, new = flatten(upgrade(old)), flatten(new)
  keys = (set(old) | set(new)) - set(RESUMABLE_CHANGES)
  return {k: (old.get(k), new.get(k)) for k in sorted(keys)
          if old.get(k) != new.get(k)}


__all__ = ["CHECKS", "ON_DEVICE", "PROBES", "REMEDIES", "REPLACED_FIELDS",
           "RESUMABLE_CHANGES", "SECTIONS", "base_config", "config_diff",
           "create_model", "flatten", "model_config", "original_config",
           "replaced_field", "upgrade", "validate", "warmup_epochs"]
