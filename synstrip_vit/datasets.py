"""Image-classification datasets, loaded fully into memory. Never downloads.

Conventions used throughout the application:

* Images are ``uint8`` NHWC arrays ``[N, H, W, C]`` of raw 0..255 pixels.
* Labels are ``int32`` ``[N]`` class indices in ``[0, num_classes)``.

Datasets (:func:`load_dataset`):

* ``"digits"``: scikit-learn's bundled 8x8 digits (offline default).
* ``"npz:<path>"``: a local ``.npz`` with ``x_train, y_train, x_test, y_test``.
* ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``,
  ``"cifar10_corrupted/<corruption>_<severity>"``: TFDS datasets that were
  already prepared (in a random-access format, ``array_record``) under
  ``data_dir``. Read with ``tfds.data_source``, which needs no TensorFlow.

Every loader returns an :class:`ArrayDataset`, whose constructor is the one
place where arrays are validated.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

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
    """Checks every field; one ``ValueError`` naming the first bad one."""
    for split in ("train", "test"):
      _check_split(self.name, split, getattr(self, f"x_{split}"),
                   getattr(self, f"y_{split}"))
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ValueError(
          f"dataset {self.name!r}: train image shape "
          f"{self.x_train.shape[1:]} != test image shape "
          f"{self.x_test.shape[1:]}")
    if (isinstance(self.num_classes, bool)
        or not isinstance(self.num_classes, (int, np.integer))
        or self.num_classes < 1):
      raise ValueError(
          f"dataset {self.name!r}: num_classes must be a positive int, "
          f"got {self.num_classes!r}")
    for split in ("train", "test"):
      y = getattr(self, f"y_{split}")
      if y.size and y.min() < 0:
        raise ValueError(
            f"dataset {self.name!r}: y_{split} has negative label {y.min()}")
      if y.size and y.max() >= self.num_classes:
        raise ValueError(
            f"dataset {self.name!r}: y_{split} labels span "
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
  """``dtype ..., shape ...`` of an array, else the type's name."""
  if isinstance(a, np.ndarray):
    return f"dtype {a.dtype}, shape {a.shape}"
  return f"{type(a).__name__}"


def _check_split(name: str, split: str, x: Any, y: Any) -> None:
  """Raises ``ValueError`` unless ``x``/``y`` are uint8 NHWC / int32 ``[N]``."""
  where = f"dataset {name!r}: "
  if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
    raise ValueError(f"{where}x_{split} must be uint8, got {_describe(x)}")
  if x.ndim != 4:
    raise ValueError(
        f"{where}x_{split} must be NHWC (4-D), got shape {x.shape}")
  if min(x.shape[1:]) == 0:
    raise ValueError(
        f"{where}x_{split} images must have height, width and channels >= 1, "
        f"got shape {x.shape}")
  if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{where}y_{split} must be integer, got {_describe(y)}")
  if y.ndim != 1:
    raise ValueError(f"{where}y_{split} must be 1-D, got shape {y.shape}")
  if y.dtype != np.int32:
    raise ValueError(f"{where}y_{split} must be int32, got {y.dtype}")
  if len(x) != len(y):
    raise ValueError(
        f"{where}x_{split} has {len(x)} images but y_{split} has {len(y)} "
        f"labels")


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
  images, target = _sklearn_digits()
  x = np.rint(images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = target.astype(np.int32)
  perm = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(x))
  num_test = int(round(_DIGITS_TEST_FRACTION * len(x)))
  train, test = perm[:-num_test], perm[-num_test:]
  return ArrayDataset(x_train=x[train], y_train=y[train], x_test=x[test],
                      y_test=y[test], num_classes=10, name="digits")


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """``(images [1797, 8, 8] float64, target [1797])`` of ``load_digits``.

  Read straight from the CSV that ships inside scikit-learn
  (``sklearn/datasets/data/digits.csv.gz``, parsed as ``load_digits``
  does), found without importing scikit-learn (an import of over a second);
  ``sklearn.datasets.load_digits`` itself when the file is not there.
  """
  path = _digits_csv()
  if path is None:
    from sklearn import datasets as sk_datasets  # Lazy: heavy import.
    bunch = sk_datasets.load_digits()
    return bunch.images, bunch.target
  with gzip.open(path, "rt", encoding="utf-8") as f:
    data = np.loadtxt(f, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _digits_csv() -> Optional[Path]:
  """scikit-learn's ``digits.csv.gz``, if scikit-learn ships it (no import)."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.origin:
    return None
  path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
  return path if path.is_file() else None


def load_npz(path: str, *, name: Optional[str] = None) -> ArrayDataset:
  """Loads a local ``.npz`` image-classification dataset.

  Required keys: ``x_train, y_train, x_test, y_test``. Images must be uint8
  NHWC ``[N, H, W, C]`` (any H, W, C) or NHW greyscale ``[N, H, W]`` (a
  channel axis is added). Labels: integer ``[N]``, non-negative; returned as
  int32. ``num_classes`` is ``len(class_names)`` when the file has a
  ``class_names`` array, else ``max label + 1`` over train and test. Other
  keys are ignored. Nothing is unpickled (``allow_pickle=False``). The arrays
  are then checked by :class:`ArrayDataset` (whose messages name the path).

  Args:
    path: path of the file (``~`` is expanded).
    name: the dataset's ``name`` (default ``"npz:<path>"``).

  Raises:
    DataNotFoundError: the file does not exist.
    ValueError: unreadable file, missing keys (listed), labels >=
      ``len(class_names)``, or arrays that :class:`ArrayDataset` refuses.
  """
  p = Path(path).expanduser()
  name = name if name is not None else _NPZ_PREFIX + str(path)
  if not p.is_file():
    raise DataNotFoundError(f"npz dataset file {str(p)!r} does not exist")
  if not zipfile.is_zipfile(p):
    raise ValueError(
        f"npz dataset file {str(p)!r} is not an .npz archive (not a zip "
        f"file; it starts with {p.open('rb').read(16)!r})")
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
  arrays = {k: (_with_channel_axis(v) if k.startswith("x_")
                else _as_int32_labels(v)) for k, v in arrays.items()}
  max_label = max([int(v.max()) for k, v in arrays.items()
                   if k.startswith("y_") and v.size
                   and np.issubdtype(v.dtype, np.integer)] or [-1])
  if class_names is None:
    num_classes = max_label + 1
  else:
    num_classes = int(np.asarray(class_names).reshape(-1).shape[0])
    if max_label >= num_classes:
      raise ValueError(
          f"npz dataset {str(p)!r}: label {max_label} >= len(class_names) = "
          f"{num_classes}")
  return ArrayDataset(num_classes=num_classes, name=name, **arrays)


def _with_channel_axis(x: np.ndarray) -> np.ndarray:
  """NHW greyscale images as NHWC (``[N, H, W, 1]``); anything else as is."""
  return x[..., None] if x.ndim == 3 else x


def _as_int32_labels(y: np.ndarray) -> np.ndarray:
  """Integer labels that fit int32, as int32; anything else as is."""
  info = np.iinfo(np.int32)
  if (np.issubdtype(y.dtype, np.integer)
      and (not y.size or info.min <= y.min() <= y.max() <= info.max)):
    return y.astype(np.int32)
  return y


def _tfds_splits(name: str) -> Tuple[str, ...]:
  return (("test",) if name.startswith(CIFAR10_CORRUPTED_PREFIX)
          else ("train", "test"))


def _import_tfds(name: str) -> Any:
  """``tensorflow_datasets``, once ``name`` is known to be a supported TFDS
  dataset (a ``cifar10_corrupted/<config>`` with a valid config)."""
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
  return tfds


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
  tfds = _import_tfds(name)
  arrays = {}
  num_classes = None
  for split in _tfds_splits(name):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir,
                                download=False)
    except (NotImplementedError, ValueError, OSError, KeyError) as e:
      tfrecord = _tfrecord_arrays(tfds, name, split, data_dir)
      if tfrecord is None:
        raise _tfds_not_prepared_error(tfds, name, data_dir, e) from e
      arrays[f"x_{split}"], arrays[f"y_{split}"], num_classes = tfrecord
      continue
    arrays[f"x_{split}"], arrays[f"y_{split}"] = _materialize(source, name,
                                                              split)
    num_classes = int(source.dataset_info.features["label"].num_classes)
  if "x_train" not in arrays:
    arrays["x_train"] = np.zeros((0,) + arrays["x_test"].shape[1:], np.uint8)
    arrays["y_train"] = np.zeros((0,), np.int32)
  return ArrayDataset(num_classes=num_classes, name=name, **arrays)


def _tfrecord_arrays(tfds: Any, name: str, split: str,
                     data_dir: Optional[str]
                     ) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
  """``(images, labels, num_classes)`` of a split prepared as TFRecord,
  read with ``tfds.load`` when TensorFlow is installed; else None."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      return None
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  except Exception:  # pylint: disable=broad-except  # No TF / not prepared.
    return None
  data = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir,
                                 download=False, batch_size=-1))
  images = np.asarray(data["image"], np.uint8)
  labels = np.asarray(data["label"]).astype(np.int32)
  if len(images) == 0:
    raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
  return images, labels, int(builder.info.features["label"].num_classes)


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
        f"TFDS dataset {name!r} is prepared at {where!r} in a format that "
        "needs TensorFlow to read (e.g. tfrecord, what `tfds build` writes by "
        "default) and TensorFlow is not installed: install tensorflow, or "
        "convert it once, in place, with `tfds convert_format "
        f"--dataset_version_dir={where} --out_file_format=array_record` (in "
        f"an environment with TensorFlow), or rebuild it with {how} "
        f"(TFDS said: {' '.join(str(cause).split())[:200]})")
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
