"""Tests of the image-folder, Tiny ImageNet and corrupted-set datasets
(synstrip_vit/datasets.py) on small folders of real CIFAR-10 images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from _shared import shared_file_or_skip
from synstrip_vit import corruptions, datasets

Image = pytest.importorskip("PIL.Image")
#: Class folder names, deliberately not in sorted order.
CLASSES = ("n02", "n00", "n01")


@pytest.fixture(scope="module")
def cifar() -> np.ndarray:
  """18 real 32x32 CIFAR-10 images."""
  path = shared_file_or_skip("data", "cifar10_lossless_4k.npz")
  with np.load(path) as d:
    return d["x_train"][:18]


def _save(img: np.ndarray, path: Path, size=None) -> None:
  """Writes ``img`` (optionally resized to ``size`` (w, h), bicubic)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pil = Image.fromarray(img)
  if size is not None:
    pil = pil.resize(size, Image.BICUBIC)
  pil.save(path, quality=90)


def _expected(path: Path) -> np.ndarray:
  """What the original reads: ``convert("RGB")``, ``Resize(32)`` (bilinear,
  shorter side 32), then the centre 32x32, computed here with Pillow."""
  img = Image.open(path).convert("RGB")
  w, h = img.size
  nw, nh = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)
  img = img.resize((nw, nh), Image.BILINEAR)
  left, top = round((nw - 32) / 2), round((nh - 32) / 2)
  return np.asarray(img.crop((left, top, left + 32, top + 32)))


def _write_class_folder(root: Path, cifar: np.ndarray, start: int) -> list:
  """Three class folders of 2 images each (PNG 32x32, JPEG 64x64, a nested
  48x64 PNG for class n01). Returns ``[(path, class name)]``."""
  files = []
  for k, c in enumerate(CLASSES):
    a, b = cifar[start + 2 * k], cifar[start + 2 * k + 1]
    files.append((root / c / "a.png", c))
    _save(a, files[-1][0])
    files.append((root / c / "b.JPEG", c))
    _save(b, files[-1][0], size=(64, 64))
    if c == "n01":
      files.append((root / c / "deep" / "c.png", c))
      _save(a, files[-1][0], size=(48, 64))
  (root / "n00" / "notes.txt").write_text("not an image")
  return files


def _check(x, y, files):
  """Images and labels in class order (sorted names), then file order."""
  ordered = sorted(files, key=lambda f: (f[1], str(f[0])))
  np.testing.assert_array_equal(x, np.stack([_expected(p) for p, _ in
                                             ordered]))
  np.testing.assert_array_equal(y, [sorted(CLASSES).index(c) for _, c in
                                    ordered])
  assert x.dtype == np.uint8 and y.dtype == np.int32


def test_folder_with_train_and_test(tmp_path, cifar):
  train = _write_class_folder(tmp_path / "train", cifar, 0)
  test = _write_class_folder(tmp_path / "test", cifar, 6)
  ds = datasets.load_dataset(f"folder:{tmp_path}")
  assert ds.num_classes == 3 and ds.image_shape == (32, 32, 3)
  _check(ds.x_train, ds.y_train, train)
  _check(ds.x_test, ds.y_test, test)
  # A 32x32 PNG is read bit for bit.
  np.testing.assert_array_equal(ds.x_train[0], cifar[2])


def test_folder_without_train_is_test_only(tmp_path, cifar):
  files = _write_class_folder(tmp_path, cifar, 0)
  grey = tmp_path / "n02" / "g.png"
  Image.fromarray(cifar[12, :, :, 0]).save(grey)
  ds = datasets.load_dataset(f"folder:{tmp_path}")
  assert ds.num_train == 0 and ds.x_train.shape == (0, 32, 32, 3)
  _check(ds.x_test, ds.y_test, files + [(grey, "n02")])
  np.testing.assert_array_equal(ds.x_test[-1],
                                np.repeat(cifar[12, :, :, :1], 3, axis=-1))


def _write_tiny(root: Path, cifar: np.ndarray, reorganised: bool) -> list:
  """A 3-class ``tiny-imagenet-200`` (64x64 JPEGs) under ``root``; returns
  the validation files ``[(path, wnid)]``."""
  base = root / "tiny-imagenet-200"
  for k, c in enumerate(CLASSES):
    for j in range(2):
      _save(cifar[2 * k + j], base / "train" / c / "images" /
            f"{c}_{j}.JPEG", size=(64, 64))
    (base / "train" / c / f"{c}_boxes.txt").write_text("x\t0\t0\t1\t1\n")
  val, lines = [], []
  for i, c in enumerate(["n01", "n02", "n00", "n01"]):
    fname = f"val_{i}.JPEG"
    path = (base / "val" / c / "images" / fname if reorganised
            else base / "val" / "images" / fname)
    _save(cifar[8 + i], path, size=(64, 64))
    val.append((path, c))
    lines.append(f"{fname}\t{c}\t0\t0\t63\t63")
  if not reorganised:
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  return val


@pytest.mark.parametrize("reorganised", [False, True])
def test_tiny_imagenet_layouts(tmp_path, cifar, reorganised):
  val = _write_tiny(tmp_path, cifar, reorganised)
  for root in (tmp_path, tmp_path / "tiny-imagenet-200"):
    ds = datasets.load_dataset(f"tinyimagenet:{root}")
    assert ds.num_classes == 3 and ds.num_train == 6 and ds.num_test == 4
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 1, 2, 2])
    _check(ds.x_test, ds.y_test, val)
  first = tmp_path / "tiny-imagenet-200/train/n00/images/n00_0.JPEG"
  np.testing.assert_array_equal(ds.x_train[0], _expected(first))


def test_folder_errors(tmp_path, cifar):
  missing = tmp_path / "nowhere"
  with pytest.raises(datasets.DataNotFoundError, match=str(missing)):
    datasets.load_dataset(f"folder:{missing}")
  with pytest.raises(datasets.DataNotFoundError, match="no train/"):
    datasets.load_dataset(f"tinyimagenet:{tmp_path}")
  (tmp_path / "flat").mkdir()
  with pytest.raises(ValueError, match="no class sub-folders"):
    datasets.load_dataset(f"folder:{tmp_path / 'flat'}")
  _write_class_folder(tmp_path / "f", cifar, 0)
  (tmp_path / "f" / "n03").mkdir()
  with pytest.raises(ValueError, match=r"class folder .*n03.* no image"):
    datasets.load_dataset(f"folder:{tmp_path / 'f'}")
  shutil.rmtree(tmp_path / "f" / "n03")
  bad = tmp_path / "f" / "n01" / "broken.jpg"
  bad.write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
    datasets.load_dataset(f"folder:{tmp_path / 'f'}")


def test_tiny_imagenet_val_errors(tmp_path, cifar):
  _write_tiny(tmp_path, cifar, reorganised=False)
  notes = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
  notes.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
  with pytest.raises(ValueError, match="line 1"):
    datasets.load_dataset(f"tinyimagenet:{tmp_path}")
  shutil.rmtree(tmp_path / "tiny-imagenet-200" / "val")
  with pytest.raises(datasets.DataNotFoundError, match="no val/"):
    datasets.load_dataset(f"tinyimagenet:{tmp_path}")


def test_released_corruption_dataset(tmp_path, cifar):
  x = np.concatenate([np.roll(cifar[:4], s, axis=0) for s in range(5)])
  np.save(tmp_path / "snow.npy", x)
  np.save(tmp_path / "labels.npy", np.tile(np.array([3, 1, 4, 1], np.uint8),
                                           5))
  ds = datasets.load_dataset(f"npy_c:{tmp_path}/snow_2")
  np.testing.assert_array_equal(ds.x_test, np.roll(cifar[:4], 1, axis=0))
  assert list(ds.y_test) == [3, 1, 4, 1] and ds.num_classes == 5
  assert ds.num_train == 0
  with pytest.raises(datasets.DataNotFoundError, match="fog.npy"):
    datasets.load_dataset(f"npy_c:{tmp_path}/fog_2")
  with pytest.raises(ValueError, match="severity 1..5"):
    datasets.load_dataset(f"npy_c:{tmp_path}/snow_6")


def test_generated_corruption_dataset(tmp_path, cifar):
  path = tmp_path / "d.npz"
  np.savez(path, x_train=cifar[:10], y_train=np.arange(10) % 4,
           x_test=cifar[10:], y_test=np.arange(8) % 4)
  ds = datasets.load_dataset(f"corrupted:shot_noise_3:npz:{path}")
  assert ds.num_train == 0 and ds.num_classes == 4
  np.testing.assert_array_equal(ds.y_test, np.arange(8) % 4)
  split = corruptions.corrupted_split(cifar[10:], np.arange(8) % 4,
                                      ("shot_noise",), (3,), seed=0)
  np.testing.assert_array_equal(ds.x_test, split.x)
  with pytest.raises(ValueError, match="expected 'corrupted:"):
    datasets.load_dataset("corrupted:shot_noise_3")
  with pytest.raises(ValueError, match="unknown dataset"):
    datasets.load_dataset("corrupted:shot_noise_3:nope")
