"""Image-folder datasets of :mod:`synstrip_vit.datasets`, read with Pillow.

``folder:<root>`` (torchvision ``ImageFolder`` layout, :func:`load_folder`)
and ``tinyimagenet:<root>`` (``tiny-imagenet-200``, :func:`load_tiny_imagenet`),
every image resized to :data:`FOLDER_IMAGE_SIZE` as the original does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from synstrip_vit.dataset_arrays import (ArrayDataset, DataNotFoundError,
                                         only_test_split)

__all__ = ["IMAGE_EXTENSIONS", "FOLDER_IMAGE_SIZE", "read_image",
           "image_files", "class_folders", "read_labelled", "folder_split",
           "load_folder", "tiny_imagenet_root", "tiny_imagenet_val",
           "load_tiny_imagenet"]

_FOLDER_PREFIX = "folder:"
_TINY_PREFIX = "tinyimagenet:"


#: File endings read as images (torchvision's ``IMG_EXTENSIONS``), any case.
IMAGE_EXTENSIONS: Tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Side of the square images folders are resized to (the original's
#: ``Resize(32)``).
FOLDER_IMAGE_SIZE = 32




def read_image(path: Path, size: int = FOLDER_IMAGE_SIZE) -> np.ndarray:
  """One image file as uint8 ``[size, size, 3]``, as the original reads it.

  torchvision's ``pil_loader`` (``Image.open(path).convert("RGB")``), then
  ``transforms.Resize(size)``: the shorter side becomes ``size`` and the
  longer ``int(size * long / short)``, with Pillow's ``BILINEAR`` filter
  (which widens its support when shrinking, i.e. antialiases); an image
  already that size is unchanged. A non-square result is centre-cropped to
  ``size x size`` (torchvision's ``CenterCrop``; the original has no crop and
  every Tiny ImageNet image is square).

  Raises:
    ValueError: the file cannot be decoded (names it).
  """
  from PIL import Image  # Lazy: only image folders need Pillow.
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: "
                     f"{e}") from e
  w, h = img.size
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), Image.BILINEAR)
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return np.asarray(img)[top:top + size, left:left + size]


def image_files(class_dir: Path) -> list:
  """Image files under ``class_dir`` (any depth, links followed), in
  torchvision's ``make_dataset`` order: sorted walk, sorted names."""
  out = []
  for root, _, names in sorted(os.walk(class_dir, followlinks=True)):
    out += [Path(root) / n for n in sorted(names)
            if n.lower().endswith(IMAGE_EXTENSIONS)]
  return out


def class_folders(root: Path) -> list:
  """Sorted names of the sub-folders of ``root`` (torchvision's classes).

  Raises:
    DataNotFoundError: ``root`` is not a folder.
    ValueError: ``root`` has no sub-folder.
  """
  if not root.is_dir():
    raise DataNotFoundError(f"image folder {str(root)!r} does not exist")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not classes:
    raise ValueError(f"image folder {str(root)!r} has no class sub-folders "
                     f"(expected <root>/<class>/<image>)")
  return classes


def read_labelled(files: Sequence[Tuple[Path, int]],
                  size: int = FOLDER_IMAGE_SIZE
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """``(images [N, size, size, 3] uint8, labels [N] int32)`` of
  ``(path, label)`` pairs, read with :func:`read_image`."""
  x = np.empty((len(files), size, size, 3), np.uint8)
  for i, (path, _) in enumerate(files):
    x[i] = read_image(path, size)
  return x, np.array([label for _, label in files], np.int32)


def folder_split(root: Path, classes: Optional[Sequence[str]] = None,
                 size: int = FOLDER_IMAGE_SIZE
                 ) -> Tuple[np.ndarray, np.ndarray, list]:
  """Reads a ``<root>/<class>/<image>`` folder (torchvision ``ImageFolder``).

  Args:
    root: the folder; every sub-folder is a class, images found at any depth
      below it (:func:`image_files`).
    classes: the class names labels index (default: ``root``'s sorted
      sub-folders, as ``ImageFolder``); ``root``'s sub-folders must be among
      them.
    size: image side (:func:`read_image`).

  Returns:
    ``(x [N, size, size, 3] uint8, y [N] int32, classes)``, images in class
    order, then file order.

  Raises:
    DataNotFoundError: ``root`` missing. ValueError: no class folder, a class
    folder without images, a class not in ``classes``, an unreadable image
    (each named).
  """
  found = class_folders(root)
  classes = list(found if classes is None else classes)
  unknown = [c for c in found if c not in classes]
  if unknown:
    raise ValueError(f"image folder {str(root)!r} has classes {unknown[:5]} "
                     f"that the training split does not have")
  index = {c: i for i, c in enumerate(classes)}
  files = []
  for c in found:
    got = image_files(root / c)
    if not got:
      raise ValueError(f"class folder {str(root / c)!r} holds no image "
                       f"(endings {', '.join(IMAGE_EXTENSIONS)})")
    files += [(f, index[c]) for f in got]
  x, y = read_labelled(files, size)
  return x, y, classes


def load_folder(root: str, *, name: Optional[str] = None) -> ArrayDataset:
  """An image-folder dataset, images resized to 32x32 (:func:`read_image`).

  * ``<root>/train/<class>/...`` with ``<root>/test/<class>/...`` (or
    ``<root>/val/``): training and test splits, classes the sorted
    sub-folders of ``train`` (the test split's classes must be among them).
  * otherwise ``<root>/<class>/...`` is a test split only (the training
    arrays are empty), e.g. one ``<corruption>/<severity>`` folder of
    Tiny-ImageNet-C.

  Raises:
    DataNotFoundError: ``root`` (or its test folder) missing; ValueError: as
    :func:`folder_split`.
  """
  base = Path(root).expanduser()
  name = name if name is not None else _FOLDER_PREFIX + str(root)
  if not (base / "train").is_dir():
    x, y, classes = folder_split(base)
    return only_test_split(name, x, y, len(classes))
  test_dir = base / "test" if (base / "test").is_dir() else base / "val"
  if not test_dir.is_dir():
    raise DataNotFoundError(f"image folder {str(base)!r} has train/ but no "
                            f"test/ or val/ folder")
  x_train, y_train, classes = folder_split(base / "train")
  x_test, y_test, _ = folder_split(test_dir, classes)
  return ArrayDataset(x_train=x_train, y_train=y_train, x_test=x_test,
                      y_test=y_test, num_classes=len(classes), name=name)


def tiny_imagenet_root(root: str) -> Path:
  """The ``tiny-imagenet-200`` folder: ``root`` itself or ``root``'s child.

  Raises:
    DataNotFoundError: neither has a ``train/`` folder.
  """
  base = Path(root).expanduser()
  for cand in (base, base / "tiny-imagenet-200"):
    if (cand / "train").is_dir():
      return cand
  raise DataNotFoundError(
      f"Tiny ImageNet folder {str(base)!r} has no train/ (nor "
      f"tiny-imagenet-200/train/); download and unzip tiny-imagenet-200.zip")


def tiny_imagenet_val(val: Path,
                      classes: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  """The validation split of Tiny ImageNet, in either layout.

  * As released: ``val/images/*.JPEG`` with ``val/val_annotations.txt``
    (tab-separated ``file, wnid, box``), ordered by class, then file name
    (the order ``ImageFolder`` gives the reorganised layout).
  * Reorganised (what the original's ``ImageFolder`` expects):
    ``val/<wnid>/...``.
  """
  notes = val / "val_annotations.txt"
  if not ((val / "images").is_dir() and notes.is_file()):
    return folder_split(val, classes)[:2]
  index = {c: i for i, c in enumerate(classes)}
  files = []
  for line_no, line in enumerate(notes.read_text().splitlines(), 1):
    parts = line.split("\t")
    if not line.strip():
      continue
    if len(parts) < 2 or parts[1] not in index:
      raise ValueError(f"{str(notes)!r} line {line_no}: expected "
                       f"'<file>\\t<wnid of train/>...', got {line!r}")
    files.append((index[parts[1]], parts[0]))
  if not files:
    raise ValueError(f"{str(notes)!r} lists no image")
  return read_labelled([(val / "images" / f, label)
                        for label, f in sorted(files)])


def load_tiny_imagenet(root: str, *,
                       name: Optional[str] = None) -> ArrayDataset:
  """Tiny ImageNet (200 classes) as the original reads it, at 32x32.

  ``train/<wnid>/images/*.JPEG`` (100,000 images) is the training split and
  ``val/`` (10,000, either layout, :func:`tiny_imagenet_val`) the test split;
  classes are the sorted ``train/`` wnids (``ImageFolder``); every image
  goes through :func:`read_image` (64x64 -> 32x32, Pillow bilinear).
  Reading all of it takes tens of seconds on one core (about 0.2 ms per
  image) and 37 MB of uint8 per 10,000 images.

  Args:
    root: the ``tiny-imagenet-200`` folder or its parent.
  """
  base = tiny_imagenet_root(root)
  name = name if name is not None else _TINY_PREFIX + str(root)
  x_train, y_train, classes = folder_split(base / "train")
  if not (base / "val").is_dir():
    raise DataNotFoundError(f"Tiny ImageNet folder {str(base)!r} has no val/")
  x_test, y_test = tiny_imagenet_val(base / "val", classes)
  return ArrayDataset(x_train=x_train, y_train=y_train, x_test=x_test,
                      y_test=y_test, num_classes=len(classes), name=name)
