"""The in-memory dataset container of :mod:`synstrip_vit.datasets`.

:class:`ArrayDataset` holds uint8 NHWC images and int32 ``[N]`` labels of a
training and a test split; its constructor is the one place where arrays are
validated. :class:`DataNotFoundError` is what every loader raises for a
missing file or an unprepared dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import numpy as np

__all__ = ["DataNotFoundError", "ArrayDataset", "image_shape",
           "only_test_split"]


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




def only_test_split(name: str, x: np.ndarray, y: np.ndarray,
              num_classes: int) -> ArrayDataset:
  """An :class:`ArrayDataset` with ``(x, y)`` as its test split and an empty
  ``[0, H, W, C]`` training split."""
  return ArrayDataset(x_train=np.zeros((0,) + x.shape[1:], np.uint8),
                      y_train=np.zeros((0,), np.int32), x_test=x, y_test=y,
                      num_classes=num_classes, name=name)
