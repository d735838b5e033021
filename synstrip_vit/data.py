"""Image-classification data: loading, deterministic batching, augmentation.

Everything here is a small pure function; there is no module-level mutable
state and nothing is ever downloaded.

Conventions used throughout:

* Images are ``uint8`` NHWC arrays ``[N, H, W, C]`` of raw 0..255 pixels.
* Labels are ``int32`` ``[N]`` class indices in ``[0, num_classes)``.
* Preprocessing (:func:`normalize`, :func:`random_crop_flip`) is JAX, pure,
  ``jit``-able and takes an explicit PRNG key; loading, batching and the
  CIFAR-10-C stand-in (:func:`apply_corruption`) are NumPy.

Datasets (:func:`load_dataset`):

* ``"digits"``: scikit-learn's bundled 8x8 digits (offline default).
* ``"npz:<path>"``: a local ``.npz`` with ``x_train, y_train, x_test, y_test``.
* ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``,
  ``"cifar10_corrupted/<corruption>_<severity>"``: TFDS datasets that were
  already prepared (in a random-access format, ``array_record``) under
  ``data_dir``. Read with ``tfds.data_source``, which needs no TensorFlow.

Batching (:func:`batch_indices`, :func:`eval_batches`) is a pure function of
``(seed, epoch)``: resuming at step ``s`` of epoch ``e`` means taking row ``s``
of ``batch_indices(..., seed=seed, epoch=e)``. Multi-process sharding is done
per global batch: process ``p`` of ``P`` loads the ``p``-th contiguous slice of
every global batch, so the union over processes of a global batch does not
depend on ``P``.

Documented deviation: AutoAugment is **not** implemented; training
augmentation is random crop (zero padding 4) + horizontal flip only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: TFDS datasets read with ``load_dataset`` (plus ``cifar10_corrupted/<cfg>``).
TFDS_DATASETS: Tuple[str, ...] = ("cifar10", "cifar100", "svhn_cropped")
#: Prefix of the CIFAR-10-C TFDS names, e.g. ``cifar10_corrupted/contrast_3``.
CIFAR10_CORRUPTED_PREFIX = "cifar10_corrupted/"
#: Every form of ``name`` that :func:`load_dataset` accepts.
SUPPORTED_DATASETS: Tuple[str, ...] = (
    "digits", "npz:<path>", *TFDS_DATASETS,
    CIFAR10_CORRUPTED_PREFIX + "<corruption>_<severity>")

_NPZ_PREFIX = "npz:"
_NPZ_KEYS: Tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0

#: Hendrycks & Dietterich (ICLR 2019) CIFAR-10-C parameters, severities 1..5.
CORRUPTION_PARAMS: Mapping[str, Tuple[float, ...]] = types.MappingProxyType({
    # Additive N(0, c^2) noise on the [0, 1] scale.
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    # Gaussian blur with standard deviation c pixels.
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    # (x - mean) * c + mean, mean per image and channel.
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
})


class DataNotFoundError(ValueError, FileNotFoundError):
  """A dataset file or a prepared TFDS dataset is missing.

  Subclasses both ``ValueError`` (bad ``name``/path given) and
  ``FileNotFoundError``, so either ``except`` catches it.
  """


# --------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """An in-memory image-classification dataset (NumPy arrays).

  Attributes:
    x_train: ``[N_train, H, W, C]`` uint8 raw pixels (``N_train`` may be 0,
      e.g. for the test-only ``cifar10_corrupted``).
    y_train: ``[N_train]`` int32 labels in ``[0, num_classes)``.
    x_test: ``[N_test, H, W, C]`` uint8 raw pixels.
    y_test: ``[N_test]`` int32 labels in ``[0, num_classes)``.
    num_classes: number of classes (> every label).
    name: the ``name`` given to :func:`load_dataset`.

  The constructor validates dtypes, ranks, lengths and label ranges and raises
  ``ValueError`` naming the offending field.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str

  def __post_init__(self):
    for split in ("train", "test"):
      x = getattr(self, f"x_{split}")
      y = getattr(self, f"y_{split}")
      if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(
            f"ArrayDataset {self.name!r}: x_{split} must be a uint8 NHWC "
            f"numpy array, got {_describe(x)}")
      if not isinstance(y, np.ndarray) or y.dtype != np.int32 or y.ndim != 1:
        raise ValueError(
            f"ArrayDataset {self.name!r}: y_{split} must be a 1-D int32 "
            f"numpy array, got {_describe(y)}")
      if len(x) != len(y):
        raise ValueError(
            f"ArrayDataset {self.name!r}: x_{split} has {len(x)} images but "
            f"y_{split} has {len(y)} labels")
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(
          f"ArrayDataset {self.name!r}: train image shape "
          f"{self.x_train.shape[1:]} != test image shape "
          f"{self.x_test.shape[1:]}")
    if (isinstance(self.num_classes, bool)
        or not isinstance(self.num_classes, (int, np.integer))
        or self.num_classes < 1):
      raise ValueError(
          f"ArrayDataset {self.name!r}: num_classes must be a positive int, "
          f"got {self.num_classes!r}")
    for split in ("train", "test"):
      y = getattr(self, f"y_{split}")
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ValueError(
            f"ArrayDataset {self.name!r}: y_{split} labels span "
            f"[{y.min()}, {y.max()}], outside [0, {self.num_classes})")

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    """``(H, W, C)`` of every image."""
    return tuple(int(d) for d in self.x_test.shape[1:])  # type: ignore

  @property
  def num_train(self) -> int:
    """Number of training examples."""
    return int(self.x_train.shape[0])

  @property
  def num_test(self) -> int:
    """Number of test examples."""
    return int(self.x_test.shape[0])


def image_shape(dataset: ArrayDataset) -> Tuple[int, int, int]:
  """``(H, W, C)`` of ``dataset``'s images (same as ``dataset.image_shape``)."""
  return dataset.image_shape


def _describe(a: Any) -> str:
  if isinstance(a, np.ndarray):
    return f"dtype {a.dtype}, shape {a.shape}"
  return f"{type(a).__name__}"


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_dataset(name: str, *, data_dir: Optional[str] = None) -> ArrayDataset:
  """Loads a dataset fully into memory as NumPy arrays. Never downloads.

  Args:
    name: one of

      * ``"digits"``: scikit-learn's bundled ``load_digits`` (offline): 1797
        8x8 greyscale images, values 0..16 rescaled to uint8 with
        ``round(x * 255 / 16)``, shape ``[N, 8, 8, 1]``, 10 classes. Split:
        rows shuffled by ``np.random.default_rng(0).permutation``; the last
        20% (359 images) are the test set, the first 1438 the training set.
      * ``"npz:<path>"``: a local ``.npz`` with keys ``x_train, y_train,
        x_test, y_test`` (see :func:`load_npz`).
      * ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"`` (train and test
        splits; svhn's ``extra`` is not loaded) and
        ``"cifar10_corrupted/<corruption>_<severity>"`` (test split only; the
        returned training arrays are empty): TFDS datasets already prepared
        under ``data_dir`` in ``array_record`` format (see
        :func:`load_tfds`).
    data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Ignored for ``digits`` and ``npz:``.

  Returns:
    An :class:`ArrayDataset` (uint8 NHWC images, int32 labels).

  Raises:
    ValueError: unknown ``name`` (lists the supported names), or invalid data.
    DataNotFoundError: (a ``ValueError``) missing file / unprepared dataset.
  """
  if not isinstance(name, str):
    raise ValueError(f"dataset name must be a str, got {name!r}")
  if name == "digits":
    return load_digits()
  if name.startswith(_NPZ_PREFIX):
    return load_npz(name[len(_NPZ_PREFIX):], name=name)
  if name in TFDS_DATASETS or name.startswith(CIFAR10_CORRUPTED_PREFIX):
    return load_tfds(name, data_dir=data_dir)
  raise ValueError(
      f"unknown dataset {name!r}; supported: {', '.join(SUPPORTED_DATASETS)}")


def load_digits() -> ArrayDataset:
  """scikit-learn's bundled digits as uint8 ``[N, 8, 8, 1]`` (no download).

  Pixels 0..16 are mapped to ``round(x * 255 / 16)``. Deterministic split:
  ``np.random.default_rng(0).permutation(1797)``; the last
  ``round(0.2 * 1797) = 359`` permuted rows are the test set.
  """
  from sklearn import datasets as sk_datasets  # Lazy: heavy import.

  bunch = sk_datasets.load_digits()
  x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = bunch.target.astype(np.int32)
  perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(x))
  num_test = int(round(_DIGITS_TEST_FRACTION * len(x)))
  train, test = perm[:-num_test], perm[-num_test:]
  return ArrayDataset(x_train=x[train], y_train=y[train], x_test=x[test],
                      y_test=y[test], num_classes=10, name="digits")


def load_npz(path: str, *, name: Optional[str] = None) -> ArrayDataset:
  """Loads and validates a local ``.npz`` image-classification dataset.

  Required keys: ``x_train, y_train, x_test, y_test``. Images must be uint8
  NHWC ``[N, H, W, C]`` (any H, W, C) or NHW greyscale ``[N, H, W]`` (a
  channel axis is added). Labels: integer ``[N]``, non-negative; returned as
  int32. ``num_classes`` is ``len(class_names)`` when the file has a
  ``class_names`` array, else ``max label + 1`` over train and test. Other
  keys are ignored. Nothing is unpickled (``allow_pickle=False``).

  Args:
    path: path of the file (``~`` is expanded).
    name: the dataset's ``name`` (default ``"npz:<path>"``).

  Raises:
    DataNotFoundError: the file does not exist.
    ValueError: unreadable file, missing keys (listed), image dtype/rank,
      label dtype/rank/sign, x/y length mismatch, train/test image shapes
      differ, or labels >= ``len(class_names)``. The message names the path.
  """
  p = Path(path).expanduser()
  name = name if name is not None else _NPZ_PREFIX + str(path)
  if not p.is_file():
    raise DataNotFoundError(f"npz dataset file {str(p)!r} does not exist")
  try:
    with np.load(p, allow_pickle=False) as f:
      files = list(f.files)
      missing = [k for k in _NPZ_KEYS if k not in files]
      arrays = {} if missing else {k: f[k] for k in _NPZ_KEYS}
      class_names = (f["class_names"]
                     if "class_names" in files and not missing else None)
  except Exception as e:  # Not a zip / pickled data / corrupt member.
    raise ValueError(
        f"cannot read npz dataset {str(p)!r} as an .npz archive: "
        f"{type(e).__name__}: {e}") from e
  if missing:
    raise ValueError(
        f"npz dataset {str(p)!r} is missing keys {missing} (has "
        f"{sorted(files)}; needs {list(_NPZ_KEYS)})")

  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.dtype != np.uint8:
      raise ValueError(
          f"npz dataset {str(p)!r}: x_{split} must be uint8, got {x.dtype}")
    if x.ndim == 3:
      x = x[..., None]
    elif x.ndim != 4:
      raise ValueError(
          f"npz dataset {str(p)!r}: x_{split} must be NHWC (4-D) or NHW "
          f"(3-D), got shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(
          f"npz dataset {str(p)!r}: y_{split} must be integer, got {y.dtype}")
    if y.ndim != 1:
      raise ValueError(
          f"npz dataset {str(p)!r}: y_{split} must be 1-D, got shape "
          f"{y.shape}")
    if len(x) != len(y):
      raise ValueError(
          f"npz dataset {str(p)!r}: x_{split} has {len(x)} images but "
          f"y_{split} has {len(y)} labels")
    if y.size and y.min() < 0:
      raise ValueError(
          f"npz dataset {str(p)!r}: y_{split} has negative label {y.min()}")
    if y.size and y.max() > np.iinfo(np.int32).max:
      raise ValueError(
          f"npz dataset {str(p)!r}: y_{split} label {y.max()} exceeds int32")
    arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y.astype(np.int32)

  if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
    raise ValueError(
        f"npz dataset {str(p)!r}: train image shape "
        f"{arrays['x_train'].shape[1:]} != test image shape "
        f"{arrays['x_test'].shape[1:]}")
  max_label = max([int(arrays[k].max()) for k in ("y_train", "y_test")
                   if arrays[k].size] or [-1])
  if class_names is not None:
    num_classes = int(np.asarray(class_names).reshape(-1).shape[0])
    if max_label >= num_classes:
      raise ValueError(
          f"npz dataset {str(p)!r}: label {max_label} >= len(class_names) = "
          f"{num_classes}")
  else:
    num_classes = max_label + 1
  if num_classes < 1:
    raise ValueError(f"npz dataset {str(p)!r} has no labels at all")
  return ArrayDataset(num_classes=num_classes, name=name, **arrays)


def _tfds_splits(name: str) -> Tuple[str, ...]:
  return (("test",) if name.startswith(CIFAR10_CORRUPTED_PREFIX)
          else ("train", "test"))


def load_tfds(name: str, *, data_dir: Optional[str] = None) -> ArrayDataset:
  """Reads an already-prepared TFDS dataset into memory. Never downloads.

  Uses ``tfds.data_source(name, split=..., data_dir=data_dir,
  download=False)`` (random access; works without TensorFlow). The dataset
  must have been prepared in ``array_record`` (or another random-access)
  format, e.g. ``tfds build cifar10 --data_dir=DIR --file_format=array_record``
  (building needs TensorFlow and network access; reading does not). Images
  (feature ``"image"``) and labels (feature ``"label"``) are materialised in
  the stored order of each split (~0.1 ms per image with PIL decoding, so
  ~7 s and ~180 MB for CIFAR's 60k images, on one CPU core).

  Args:
    name: ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"`` (train + test) or
      ``"cifar10_corrupted/<corruption>_<severity>"`` (test only; the training
      arrays are empty ``[0, H, W, C]``).
    data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Raises:
    ValueError: unsupported name or unknown ``cifar10_corrupted`` config.
    DataNotFoundError: not prepared (or prepared in a non-random-access
      format) under ``data_dir``; the message says how to prepare it.
  """
  if not (name in TFDS_DATASETS or name.startswith(CIFAR10_CORRUPTED_PREFIX)):
    raise ValueError(
        f"unsupported TFDS dataset {name!r}; supported: "
        f"{', '.join(SUPPORTED_DATASETS[2:])}")
  try:
    import tensorflow_datasets as tfds  # Lazy: optional dependency.
  except ImportError as e:
    raise ImportError(
        f"loading {name!r} needs tensorflow_datasets (pip install "
        f"tensorflow-datasets)") from e
  if name.startswith(CIFAR10_CORRUPTED_PREFIX):
    config = name[len(CIFAR10_CORRUPTED_PREFIX):]
    configs = [c.name for c in tfds.builder_cls(
        "cifar10_corrupted").BUILDER_CONFIGS]
    if config not in configs:
      raise ValueError(
          f"unknown cifar10_corrupted config {config!r} in {name!r}; valid "
          f"configs are <corruption>_<1..5>, e.g. {configs[:5]}")

  arrays = {}
  num_classes = None
  for split in _tfds_splits(name):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir,
                                download=False)
    except (NotImplementedError, ValueError, OSError) as e:
      raise _tfds_not_prepared_error(tfds, name, data_dir, e) from e
    arrays[f"x_{split}"], arrays[f"y_{split}"] = _materialize(source, name,
                                                              split)
    num_classes = int(source.dataset_info.features["label"].num_classes)
  if "x_train" not in arrays:
    arrays["x_train"] = np.zeros((0,) + arrays["x_test"].shape[1:], np.uint8)
    arrays["y_train"] = np.zeros((0,), np.int32)
  return ArrayDataset(num_classes=num_classes, name=name, **arrays)


def _tfds_not_prepared_error(tfds: Any, name: str, data_dir: Optional[str],
                             cause: Exception) -> DataNotFoundError:
  """Explains why ``tfds.data_source`` failed and how to prepare the data."""
  where = data_dir
  prepared = False
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    where = str(builder.data_dir)
    prepared = builder.is_prepared()
  except Exception:  # pylint: disable=broad-except  # Best-effort diagnosis.
    pass
  dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  how = (f"`tfds build {name}{dir_flag} --file_format=array_record` "
         f"(in an environment with TensorFlow and network access)")
  if prepared:
    return DataNotFoundError(
        f"TFDS dataset {name!r} is prepared at {where!r} but not in a "
        f"random-access format (array_record/parquet); rebuild it with {how}. "
        f"Cause: {type(cause).__name__}: {cause}")
  return DataNotFoundError(
      f"TFDS dataset {name!r} is not prepared at {where!r} (downloads are "
      f"disabled); prepare it first with {how}")


def _materialize(source: Sequence[Mapping[str, Any]], name: str,
                 split: str) -> Tuple[np.ndarray, np.ndarray]:
  """Reads every example of a TFDS data source into uint8/int32 arrays."""
  n = len(source)
  if n == 0:
    raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
  first = source[0]
  shape = np.shape(first["image"])
  if len(shape) != 3:
    raise ValueError(
        f"TFDS dataset {name!r}: expected HWC images, got shape {shape}")
  images = np.empty((n,) + tuple(shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    example = first if i == 0 else source[i]
    images[i] = example["image"]
    labels[i] = example["label"]
  return images, labels


def split_holdout(
    x: np.ndarray, y: np.ndarray, *, fraction: float, seed: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Deterministically holds out a fraction of the training data.

  The held-out part is the probe set for dead-neuron detection. Rows are
  chosen by ``np.random.default_rng(seed).permutation(N)``: the first
  ``round(fraction * N)`` permuted rows are held out. Both parts keep the
  original row order.

  Args:
    x: ``[N, ...]`` images (any dtype).
    y: ``[N]`` labels.
    fraction: held-out fraction, in the open interval ``(0, 1)``.
    seed: non-negative int.

  Returns:
    ``(x_train, y_train, x_holdout, y_holdout)``; both parts are non-empty.

  Raises:
    ValueError: ``fraction`` outside (0, 1), a part would be empty, bad seed,
      or ``len(x) != len(y)``.
  """
  if not isinstance(fraction, (float, int)) or isinstance(fraction, bool) \
      or not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in the open interval (0, 1), got "
                     f"{fraction!r}")
  _check_nonneg_int("seed", seed)
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
  n = len(x)
  num_holdout = int(round(fraction * n))
  if not 0 < num_holdout < n:
    raise ValueError(
        f"fraction={fraction!r} of {n} examples leaves an empty part "
        f"({num_holdout} held out)")
  perm = np.random.default_rng(seed).permutation(n)
  holdout = np.sort(perm[:num_holdout])
  train = np.sort(perm[num_holdout:])
  return x[train], y[train], x[holdout], y[holdout]


# --------------------------------------------------------------------------
# Deterministic, resumable batching
# --------------------------------------------------------------------------


def _check_nonneg_int(what: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
      or value < 0:
    raise ValueError(f"{what} must be a non-negative int, got {value!r}")


def _check_pos_int(what: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
      or value < 1:
    raise ValueError(f"{what} must be a positive int, got {value!r}")


def epoch_permutation(num_examples: int, *, seed: int,
                      epoch: int) -> np.ndarray:
  """The shuffled example order of one epoch.

  ``np.random.default_rng([seed, epoch]).permutation(num_examples)``: a pure
  function of ``(num_examples, seed, epoch)``, so training can resume
  anywhere, and different epochs get independent orders.

  Returns:
    ``[num_examples]`` int64, a permutation of ``0..num_examples-1``.
  """
  _check_pos_int("num_examples", num_examples)
  _check_nonneg_int("seed", seed)
  _check_nonneg_int("epoch", epoch)
  return np.random.default_rng([int(seed), int(epoch)]).permutation(
      int(num_examples))


def _global_batches(num_examples: int, global_batch_size: int, *, seed: int,
                    epoch: int, shuffle: bool, drop_remainder: bool,
                    process_index: int, process_count: int
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """Shared implementation of :func:`batch_indices` / :func:`eval_batches`."""
  _check_pos_int("num_examples", num_examples)
  _check_pos_int("global_batch_size", global_batch_size)
  _check_pos_int("process_count", process_count)
  _check_nonneg_int("process_index", process_index)
  if process_index >= process_count:
    raise ValueError(f"process_index={process_index} must be < "
                     f"process_count={process_count}")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}")
  if drop_remainder and global_batch_size > num_examples:
    raise ValueError(
        f"global_batch_size={global_batch_size} > num_examples="
        f"{num_examples} with drop_remainder=True gives no batch")
  if shuffle:
    order = epoch_permutation(num_examples, seed=seed, epoch=epoch)
  else:
    _check_nonneg_int("seed", seed)
    _check_nonneg_int("epoch", epoch)
    order = np.arange(num_examples, dtype=np.int64)
  if drop_remainder:
    num_batches = num_examples // global_batch_size
  else:
    num_batches = -(-num_examples // global_batch_size)
  total = num_batches * global_batch_size
  valid = np.arange(total) < num_examples
  order = np.concatenate(
      [order[:total], np.zeros(max(total - num_examples, 0), np.int64)])
  local = global_batch_size // process_count
  cols = slice(process_index * local, (process_index + 1) * local)
  return (order.reshape(num_batches, global_batch_size)[:, cols],
          valid.reshape(num_batches, global_batch_size)[:, cols])


def batch_indices(num_examples: int, global_batch_size: int, *, seed: int,
                  epoch: int, shuffle: bool = True,
                  drop_remainder: bool = True, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """Rows this process loads for each global batch of one epoch.

  The epoch's order is :func:`epoch_permutation` (or ``arange`` if not
  ``shuffle``); global batch ``b`` is ``order[b*G:(b+1)*G]``
  (``G = global_batch_size``) and process ``p`` takes its ``p``-th
  contiguous slice of ``G // process_count`` rows. The union over processes
  of a global batch is therefore the same for every ``process_count``. To
  resume at step ``s`` of epoch ``e``, use row ``s`` of the result for
  ``epoch=e``.

  With ``drop_remainder=True`` the last ``num_examples % G`` examples of the
  order are skipped (a different subset each epoch when shuffling). With
  ``drop_remainder=False`` the last batch is padded with index ``0``; use
  :func:`eval_batches` (which also returns the validity mask) so padded
  slots are not counted.

  Args:
    num_examples: dataset size (>= 1).
    global_batch_size: examples per global batch, divisible by
      ``process_count``; ``<= num_examples`` when ``drop_remainder``.
    seed, epoch: non-negative ints fixing the order.
    shuffle: permute the examples (else dataset order).
    drop_remainder: drop the final partial batch (else pad it).
    process_index, process_count: this process / number of processes
      (``jax.process_index()``, ``jax.process_count()``).

  Returns:
    ``[num_batches, global_batch_size // process_count]`` int64 row indices.

  Raises:
    ValueError: on any invalid argument (named in the message).
  """
  indices, _ = _global_batches(
      num_examples, global_batch_size, seed=seed, epoch=epoch,
      shuffle=shuffle, drop_remainder=drop_remainder,
      process_index=process_index, process_count=process_count)
  return indices


class EvalBatches(NamedTuple):
  """Padded evaluation batches of one process (see :func:`eval_batches`).

  Attributes:
    indices: ``[num_batches, local_batch]`` int64 row indices; padded slots
      hold index 0 (a real row, so gathering never fails).
    valid: ``[num_batches, local_batch]`` bool, False exactly on padded
      slots. Over all processes and batches each example has exactly one
      True slot.
  """
  indices: np.ndarray
  valid: np.ndarray


def eval_batches(num_examples: int, global_batch_size: int, *,
                 process_index: int = 0,
                 process_count: int = 1) -> EvalBatches:
  """Fixed-shape evaluation batches that cover every example exactly once.

  Dataset order (no shuffle), ``ceil(num_examples / G)`` global batches of
  ``G = global_batch_size``; the last one is padded with index 0 and marked
  invalid. Weight per-example metrics by ``valid`` (e.g.
  ``sum(correct * valid)`` and ``sum(valid)``) so every example counts
  exactly once. Sharding across processes is as in :func:`batch_indices`.

  Returns:
    :class:`EvalBatches` ``(indices, valid)``, both
    ``[num_batches, global_batch_size // process_count]``.
  """
  return EvalBatches(*_global_batches(
      num_examples, global_batch_size, seed=0, epoch=0, shuffle=False,
      drop_remainder=False, process_index=process_index,
      process_count=process_count))


# --------------------------------------------------------------------------
# Preprocessing and augmentation (JAX)
# --------------------------------------------------------------------------


def channel_stats(x_train: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and (population) std of uint8 images, in 0..255 units.

  Exact and memory-light (per-channel 256-bin histograms; no float copy of
  the data).

  Args:
    x_train: ``[N, H, W, C]`` uint8 images (N >= 1).

  Returns:
    ``(mean, std)``, each ``[C]`` float32 (std with ``ddof=0``). Pass them to
    :func:`normalize`.

  Raises:
    ValueError: not a non-empty uint8 4-D array.
  """
  x = np.asarray(x_train)
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[0] == 0:
    raise ValueError(
        f"channel_stats needs non-empty uint8 [N, H, W, C] images, got "
        f"dtype {x.dtype}, shape {x.shape}")
  values = np.arange(256, dtype=np.float64)
  means, stds = [], []
  for c in range(x.shape[-1]):
    counts = np.bincount(x[..., c].reshape(-1), minlength=256)
    total = counts.sum()
    mean = float(counts @ values) / total
    var = float(counts @ (values - mean) ** 2) / total
    means.append(mean)
    stds.append(math.sqrt(var))
  return np.asarray(means, np.float32), np.asarray(stds, np.float32)


def normalize(images: Array, mean: Array, std: Array) -> Array:
  """``(images - mean) / std`` in float32.

  Args:
    images: ``[..., C]`` images, typically uint8 raw pixels (any dtype).
    mean, std: ``[C]`` (broadcastable) in the same units as ``images``
      (0..255 for raw pixels, as returned by :func:`channel_stats`).

  Returns:
    float32 array of ``images``' shape. Pure; works under ``jit``.
  """
  images = jnp.asarray(images).astype(jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images - mean) / std


def _crop_flip_one(key: Array, image: Array, padding: int,
                   flip: bool) -> Array:
  height, width, channels = image.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
    image = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0),
                                  (height, width, channels))
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key, 0.5), image[:, ::-1, :],
                      image)
  return image


@functools.partial(jax.jit, static_argnames=("padding", "flip"))
def random_crop_flip(key: Array, images: Array, *, padding: int = 4,
                     flip: bool = True) -> Array:
  """Per-example random crop after zero padding, then random horizontal flip.

  Like torchvision's ``RandomCrop(H, padding=padding)`` followed by
  ``RandomHorizontalFlip(0.5)``: each image is zero-padded by ``padding`` on
  every side and an ``H x W`` window is cut at a uniformly random offset in
  ``[0, 2 * padding]`` per axis; then, with probability 0.5, it is mirrored
  left-right. Per-example keys are ``jax.random.split(key, B)``, so the
  result is a pure function of ``(key, images)``. Implemented with
  ``jax.vmap`` + ``jax.lax.dynamic_slice``; jitted (``padding``/``flip`` are
  static).

  The padding value is 0 in the units of ``images``. torchvision pads the raw
  image with black, so to match it apply this to raw pixels (uint8, or
  float 0..255) and :func:`normalize` afterwards; applied to normalised
  images it pads with the channel mean instead.

  Documented deviation from the paper's CIFAR recipe: AutoAugment is not
  implemented.

  Args:
    key: PRNG key.
    images: ``[B, H, W, C]`` batch (float, or any dtype).
    padding: non-negative int; 0 disables cropping.
    flip: whether to apply random horizontal flips.

  Returns:
    Array with the shape and dtype of ``images``.

  Raises:
    ValueError: ``images`` not 4-D or ``padding`` negative / not an int.
  """
  if isinstance(padding, bool) or not isinstance(padding, int) \
      or padding < 0:
    raise ValueError(f"padding must be a non-negative int, got {padding!r}")
  if images.ndim != 4:
    raise ValueError(
        f"random_crop_flip needs a [B, H, W, C] batch, got shape "
        f"{images.shape}")
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(
      functools.partial(_crop_flip_one, padding=padding, flip=bool(flip)))(
          keys, images)


# --------------------------------------------------------------------------
# CIFAR-10-C stand-in (NumPy)
# --------------------------------------------------------------------------


def apply_corruption(images: np.ndarray, kind: str, severity: int, *,
                     seed: int) -> np.ndarray:
  """Corrupts uint8 images like CIFAR-10-C (offline stand-in).

  Parameters follow Hendrycks & Dietterich (2019), ``make_cifar_c.py``, on
  the ``[0, 1]`` scale (``x = images / 255``):

  * ``gaussian_noise``: ``x + N(0, c^2)``, ``c = [.04, .06, .08, .09, .10]``.
  * ``gaussian_blur``: Gaussian filter with ``sigma = [.4, .6, .7, .8, 1]``
    pixels over H and W of each channel (``scipy.ndimage.gaussian_filter``,
    ``mode="nearest"`` as skimage's ``gaussian`` used by the original).
  * ``contrast``: ``(x - m) * c + m``, ``m`` the per-image, per-channel
    mean, ``c = [.75, .5, .4, .3, .15]``.

  Results are clipped to ``[0, 1]`` and mapped back with
  ``round(x * 255)`` (the original truncates with ``np.uint8``; rounding
  avoids its -0.5 bias). Only ``gaussian_noise`` uses randomness:
  ``np.random.default_rng(seed)``.

  Args:
    images: ``[N, H, W, C]`` uint8.
    kind: a key of :data:`CORRUPTION_PARAMS`.
    severity: int in 1..5.
    seed: non-negative int.

  Returns:
    ``[N, H, W, C]`` uint8 corrupted images (a new array).

  Raises:
    ValueError: unknown ``kind`` (lists the valid ones), ``severity`` not in
      1..5, bad ``seed``, or images not uint8 4-D.
  """
  if kind not in CORRUPTION_PARAMS:
    raise ValueError(f"unknown corruption kind {kind!r}; valid: "
                     f"{sorted(CORRUPTION_PARAMS)}")
  if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
      or not 1 <= severity <= 5:
    raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
  _check_nonneg_int("seed", seed)
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(
        f"apply_corruption needs uint8 [N, H, W, C] images, got dtype "
        f"{images.dtype}, shape {images.shape}")
  c = CORRUPTION_PARAMS[kind][int(severity) - 1]
  x = images.astype(np.float32) / 255.0
  if kind == "gaussian_noise":
    rng = np.random.default_rng(int(seed))
    x = x + rng.normal(scale=c, size=x.shape).astype(np.float32)
  elif kind == "gaussian_blur":
    from scipy import ndimage  # Lazy: only needed here.
    x = ndimage.gaussian_filter(x, sigma=(0.0, c, c, 0.0), mode="nearest")
  else:  # contrast
    means = x.mean(axis=(1, 2), keepdims=True)
    x = (x - means) * c + means
  return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
