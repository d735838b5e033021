"""Tests of synstrip_vit.datasets, .input_pipeline and .augment (offline, fast)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _shared import shared_file_or_skip
from synstrip_vit import augment, datasets
from synstrip_vit import input_pipeline as pipeline


def _good_arrays(n_train=12, n_test=5, shape=(6, 5, 3), num_classes=4):
  rng = np.random.default_rng(0)
  return dict(
      x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
      y_train=(np.arange(n_train) % num_classes).astype(np.int64),
      x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
      y_test=(np.arange(n_test) % num_classes).astype(np.int64),
  )


def _write_npz(tmp_path: Path, fname="d.npz", **arrays) -> Path:
  path = tmp_path / fname
  np.savez(path, **arrays)
  return path


# --------------------------------------------------------------------------
# digits / load_dataset dispatch
# --------------------------------------------------------------------------


def test_digits_shapes_values_and_split():
  from sklearn.datasets import load_digits
  ds = datasets.load_dataset("digits")
  assert ds.name == "digits" and ds.num_classes == 10
  assert ds.x_train.shape == (1438, 8, 8, 1)
  assert ds.x_test.shape == (359, 8, 8, 1)
  assert ds.image_shape == (8, 8, 1) == datasets.image_shape(ds)
  assert ds.num_train == 1438 and ds.num_test == 359
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
  assert ds.x_train.max() == 255 and ds.x_train.min() == 0
  allowed = set(np.rint(np.arange(17) * 255 / 16).astype(int).tolist())
  assert set(np.unique(ds.x_test).tolist()) <= allowed
  # The split is a permutation of the original data.
  bunch = load_digits()
  perm = np.random.default_rng(0).permutation(1797)
  ref = np.rint(bunch.images * 255 / 16).astype(np.uint8)[..., None]
  np.testing.assert_array_equal(ds.x_test, ref[perm[-359:]])
  np.testing.assert_array_equal(ds.y_train, bunch.target[perm[:-359]])


def test_digits_csv_read_equals_sklearn_fallback(monkeypatch):
  """The CSV read without importing scikit-learn gives load_digits' arrays."""
  assert datasets._digits_csv() is not None
  images, target = datasets._sklearn_digits()
  monkeypatch.setattr(datasets, "_digits_csv", lambda: None)
  ref_images, ref_target = datasets._sklearn_digits()  # sklearn's loader
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(target, ref_target)
  assert images.dtype == ref_images.dtype and images.shape == (1797, 8, 8)


def test_digits_deterministic():
  a, b = datasets.load_dataset("digits"), datasets.load_dataset("digits")
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)


@pytest.mark.parametrize("name", ["mnist", "cifar10x", "npz", "tfds:cifar10",
                                  "", "DIGITS"])
def test_unknown_dataset_lists_supported(name):
  with pytest.raises(ValueError, match="supported") as e:
    datasets.load_dataset(name)
  assert "digits" in str(e.value) and "cifar10" in str(e.value)


def test_dataset_name_must_be_str():
  with pytest.raises(ValueError, match="str"):
    datasets.load_dataset(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------


def _dataset(**overrides):
  a = _good_arrays()
  kw = dict(x_train=a["x_train"], y_train=a["y_train"].astype(np.int32),
            x_test=a["x_test"], y_test=a["y_test"].astype(np.int32),
            num_classes=4, name="t")
  kw.update(overrides)
  return datasets.ArrayDataset(**kw)


def test_array_dataset_frozen_and_properties():
  ds = _dataset()
  assert ds.image_shape == (6, 5, 3)
  with pytest.raises(dataclasses.FrozenInstanceError):
    ds.num_classes = 3  # type: ignore[misc]


@pytest.mark.parametrize("overrides,match", [
    (dict(x_train=np.zeros((12, 6, 5, 3), np.float32)), "x_train"),
    (dict(x_test=np.zeros((5, 6, 5), np.uint8)), "x_test"),
    (dict(y_train=np.zeros(12, np.int64)), "y_train"),
    (dict(y_test=np.zeros(4, np.int32)), "y_test"),
    (dict(x_test=np.zeros((5, 6, 6, 3), np.uint8)), "image shape"),
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=2), r"outside \[0, 2\)"),
])
def test_array_dataset_validation(overrides, match):
  with pytest.raises(ValueError, match=match):
    _dataset(**overrides)


# --------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------


def test_npz_roundtrip_nhwc(tmp_path):
  arrays = _good_arrays()
  path = _write_npz(tmp_path, **arrays)
  ds = datasets.load_dataset(f"npz:{path}")
  assert ds.name == f"npz:{path}"
  np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
  np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 4
  assert ds.image_shape == (6, 5, 3)


def test_npz_nhw_gets_channel_axis_and_class_names(tmp_path):
  arrays = _good_arrays(shape=(7, 7, 1))
  arrays = {k: (v[..., 0] if k.startswith("x") else v)
            for k, v in arrays.items()}
  path = _write_npz(tmp_path, **arrays,
                    class_names=np.array([f"c{i}" for i in range(9)]),
                    extra=np.arange(3))
  ds = datasets.load_dataset(f"npz:{path}")
  assert ds.x_train.shape == (12, 7, 7, 1) and ds.x_test.shape == (5, 7, 7, 1)
  assert ds.num_classes == 9  # From class_names, not max label + 1.


def test_npz_missing_file(tmp_path):
  path = tmp_path / "nope.npz"
  with pytest.raises(datasets.DataNotFoundError, match="nope.npz") as e:
    datasets.load_dataset(f"npz:{path}")
  assert isinstance(e.value, ValueError)
  assert isinstance(e.value, FileNotFoundError)


def test_npz_not_an_archive(tmp_path):
  path = tmp_path / "junk.npz"
  path.write_text("not a zip")
  with pytest.raises(ValueError, match="junk.npz"):
    datasets.load_dataset(f"npz:{path}")


def test_npz_missing_keys_are_listed(tmp_path):
  arrays = _good_arrays()
  del arrays["y_test"], arrays["x_train"]
  path = _write_npz(tmp_path, **arrays)
  with pytest.raises(ValueError, match="missing keys") as e:
    datasets.load_dataset(f"npz:{path}")
  msg = str(e.value)
  assert "'x_train'" in msg and "'y_test'" in msg and str(path) in msg


_BAD_NPZ = {
    "x_float": (lambda a: a.update(x_train=a["x_train"].astype(np.float32)),
                "x_train must be uint8"),
    "x_2d": (lambda a: a.update(x_test=a["x_test"].reshape(5, -1)),
             "x_test must be NHWC"),
    "x_5d": (lambda a: a.update(x_train=a["x_train"][..., None]),
             "x_train must be NHWC"),
    "y_float": (lambda a: a.update(y_train=a["y_train"].astype(np.float32)),
                "y_train must be integer"),
    "y_2d": (lambda a: a.update(y_test=a["y_test"][:, None]),
             "y_test must be 1-D"),
    "length": (lambda a: a.update(y_train=a["y_train"][:-1]),
               "x_train has 12 images but y_train has 11"),
    "negative": (lambda a: a.update(y_test=a["y_test"] - 2),
                 "negative label -2"),
    "shapes": (lambda a: a.update(x_test=np.zeros((5, 6, 6, 3), np.uint8)),
               "image shape"),
    "class_names": (lambda a: a.update(class_names=np.array(["a", "b"])),
                    r"len\(class_names\)"),
}


@pytest.mark.parametrize("case", sorted(_BAD_NPZ))
def test_npz_malformed(tmp_path, case):
  mutate, match = _BAD_NPZ[case]
  arrays = _good_arrays()
  mutate(arrays)
  path = _write_npz(tmp_path, f"{case}.npz", **arrays)
  with pytest.raises(ValueError, match=match) as e:
    datasets.load_dataset(f"npz:{path}")
  assert str(path) in str(e.value)


def test_shared_mnist():
  path = shared_file_or_skip("data", "mnist.npz")
  ds = datasets.load_dataset(f"npz:{path}")
  assert ds.x_train.shape == (60000, 28, 28, 1)
  assert ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.y_train[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
  np.testing.assert_array_equal(ds.y_test[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
  mean, std = pipeline.channel_stats(ds.x_train)
  np.testing.assert_allclose(mean, [33.32], atol=0.01)
  np.testing.assert_allclose(std, [78.57], atol=0.01)


def test_shared_cifar10_lossless():
  path = shared_file_or_skip("data", "cifar10_lossless_4k.npz")
  ds = datasets.load_dataset(f"npz:{path}")
  assert ds.x_train.shape == (3200, 32, 32, 3)
  assert ds.x_test.shape == (800, 32, 32, 3)
  assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(ds.y_train[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
  np.testing.assert_array_equal(
      np.bincount(ds.y_test, minlength=10),
      [77, 64, 83, 76, 94, 81, 84, 71, 80, 90])


# --------------------------------------------------------------------------
# split_holdout
# --------------------------------------------------------------------------


def test_split_holdout_partition_and_determinism():
  x = np.arange(100)[:, None] * np.ones((1, 3), np.int64)
  y = np.arange(100)
  xt, yt, xh, yh = pipeline.split_holdout(x, y, fraction=0.1, seed=3)
  assert len(yh) == 10 and len(yt) == 90
  assert sorted(np.concatenate([yt, yh]).tolist()) == list(range(100))
  np.testing.assert_array_equal(xt[:, 0], yt)  # Rows stay aligned.
  assert np.all(np.diff(yt) > 0) and np.all(np.diff(yh) > 0)  # Order kept.
  again = pipeline.split_holdout(x, y, fraction=0.1, seed=3)
  np.testing.assert_array_equal(again[3], yh)
  other = pipeline.split_holdout(x, y, fraction=0.1, seed=4)
  assert not np.array_equal(other[3], yh)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, True, "0.1"])
def test_split_holdout_bad_fraction(fraction):
  with pytest.raises(ValueError, match="fraction"):
    pipeline.split_holdout(np.zeros(10), np.zeros(10), fraction=fraction, seed=0)


def test_split_holdout_other_errors():
  with pytest.raises(ValueError, match="empty part"):
    pipeline.split_holdout(np.zeros(10), np.zeros(10), fraction=0.01, seed=0)
  with pytest.raises(ValueError, match="rows"):
    pipeline.split_holdout(np.zeros(10), np.zeros(9), fraction=0.5, seed=0)
  with pytest.raises(ValueError, match="seed"):
    pipeline.split_holdout(np.zeros(10), np.zeros(10), fraction=0.5, seed=-1)


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def test_epoch_permutation():
  p = pipeline.epoch_permutation(50, seed=1, epoch=2)
  assert sorted(p.tolist()) == list(range(50))
  np.testing.assert_array_equal(p, pipeline.epoch_permutation(50, seed=1, epoch=2))
  assert not np.array_equal(p, pipeline.epoch_permutation(50, seed=1, epoch=3))
  assert not np.array_equal(p, pipeline.epoch_permutation(50, seed=2, epoch=2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_examples=0, seed=0, epoch=0), "num_examples"),
    (dict(num_examples=5, seed=-1, epoch=0), "seed"),
    (dict(num_examples=5, seed=0, epoch=-1), "epoch"),
    (dict(num_examples=5, seed=0.5, epoch=0), "seed"),
])
def test_epoch_permutation_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pipeline.epoch_permutation(**kwargs)


def test_batch_indices_drop_remainder():
  idx = pipeline.batch_indices(103, 10, seed=0, epoch=5)
  assert idx.shape == (10, 10) and np.issubdtype(idx.dtype, np.integer)
  assert len(np.unique(idx)) == 100  # No repeats within an epoch.
  perm = pipeline.epoch_permutation(103, seed=0, epoch=5)
  np.testing.assert_array_equal(idx.reshape(-1), perm[:100])
  np.testing.assert_array_equal(idx, pipeline.batch_indices(103, 10, seed=0,
                                                        epoch=5))
  plain = pipeline.batch_indices(103, 10, seed=0, epoch=5, shuffle=False)
  np.testing.assert_array_equal(plain.reshape(-1), np.arange(100))


def test_batch_indices_union_independent_of_process_count():
  ref = pipeline.batch_indices(1000, 64, seed=7, epoch=3)
  for count in (2, 4, 8, 16):
    parts = [pipeline.batch_indices(1000, 64, seed=7, epoch=3, process_index=p,
                                process_count=count) for p in range(count)]
    assert all(part.shape == (15, 64 // count) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), ref)


def test_batch_indices_padded_when_not_dropping():
  idx = pipeline.batch_indices(10, 4, seed=0, epoch=0, drop_remainder=False)
  perm = pipeline.epoch_permutation(10, seed=0, epoch=0)
  assert idx.shape == (3, 4)
  np.testing.assert_array_equal(idx.reshape(-1)[:10], perm)
  np.testing.assert_array_equal(idx.reshape(-1)[10:], [0, 0])


@pytest.mark.parametrize("args,kwargs,match", [
    ((10, 4), dict(process_count=3), "not divisible"),
    ((10, 12), dict(), "global_batch_size=12 > num_examples=10"),
    ((10, 4), dict(process_index=2, process_count=2), "process_index"),
    ((10, 4), dict(process_index=-1), "process_index"),
    ((10, 0), dict(), "global_batch_size"),
    ((0, 4), dict(), "num_examples"),
    ((10, 4), dict(process_count=0), "process_count"),
    ((10, 4), dict(seed=-3), "seed"),
    ((10, 4), dict(shuffle=False, epoch=-1), "epoch"),
])
def test_batch_indices_errors(args, kwargs, match):
  kw = dict(seed=0, epoch=0)
  kw.update(kwargs)
  with pytest.raises(ValueError, match=match):
    pipeline.batch_indices(*args, **kw)


def test_batch_larger_than_dataset_ok_without_drop():
  ev = pipeline.eval_batches(3, 8)
  assert ev.indices.shape == (1, 8)
  assert ev.valid.sum() == 3


@pytest.mark.parametrize("n,gbs,count", [(10, 4, 1), (10, 4, 2), (10, 4, 4),
                                         (64, 16, 4), (1, 8, 8), (17, 6, 3)])
def test_eval_batches_cover_each_example_once(n, gbs, count):
  counts = np.zeros(n, np.int64)
  parts = []
  for p in range(count):
    ev = pipeline.eval_batches(n, gbs, process_index=p, process_count=count)
    assert ev.indices.shape == ev.valid.shape == (-(-n // gbs), gbs // count)
    assert ev.valid.dtype == np.bool_
    assert np.all(ev.indices[~ev.valid] == 0)  # Padding is a real row.
    np.add.at(counts, ev.indices[ev.valid], 1)
    parts.append(ev.indices)
  np.testing.assert_array_equal(counts, np.ones(n))
  # Same global batches whatever the process count.
  np.testing.assert_array_equal(np.concatenate(parts, axis=1),
                                pipeline.eval_batches(n, gbs).indices)


def test_eval_batches_errors():
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.eval_batches(10, 5, process_count=2)


# --------------------------------------------------------------------------
# Preprocessing / augmentation
# --------------------------------------------------------------------------


def test_channel_stats_matches_numpy():
  x = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
  mean, std = pipeline.channel_stats(x)
  assert mean.shape == std.shape == (3,) and mean.dtype == np.float32
  np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-6)


@pytest.mark.parametrize("x", [np.zeros((2, 3, 3, 1), np.float32),
                               np.zeros((3, 3, 1), np.uint8),
                               np.zeros((0, 3, 3, 1), np.uint8)])
def test_channel_stats_errors(x):
  with pytest.raises(ValueError, match="channel_stats"):
    pipeline.channel_stats(x)


def test_normalize():
  x = np.array([[[[0, 255], [128, 64]]]], np.uint8)  # [1, 1, 2, 2]
  mean, std = np.array([10.0, 20.0]), np.array([2.0, 5.0])
  out = jax.jit(pipeline.normalize)(x, mean, std)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  np.testing.assert_allclose(np.asarray(out),
                             (x.astype(np.float32) - mean) / std, rtol=1e-6)


def _batch(b=16, h=8, w=6, c=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(
      1.0, 2.0, (b, h, w, c)).astype(np.float32))


def test_random_crop_flip_shape_dtype_determinism():
  x = _batch()
  key = jax.random.key(0)
  a = augment.random_crop_flip(key, x)
  b = augment.random_crop_flip(key, x)
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = augment.random_crop_flip(jax.random.key(1), x)
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  # Raw uint8 keys and uint8 images work too, and it composes under jit.
  u8 = jnp.asarray(np.asarray(x * 100).astype(np.uint8))
  out = jax.jit(lambda k, im: augment.random_crop_flip(k, im, padding=2))(
      jax.random.PRNGKey(3), u8)
  assert out.dtype == jnp.uint8 and out.shape == u8.shape


def test_random_crop_flip_identity_without_padding_and_flip():
  x = _batch()
  out = augment.random_crop_flip(jax.random.key(5), x, padding=0, flip=False)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_random_flip_only_mirrors():
  x = np.asarray(_batch(b=64))
  out = np.asarray(augment.random_crop_flip(jax.random.key(2), jnp.asarray(x),
                                         padding=0, flip=True))
  same = np.all(out == x, axis=(1, 2, 3))
  mirrored = np.all(out == x[:, :, ::-1, :], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)
  assert 10 < mirrored.sum() < 54  # p = 0.5 per example.


@pytest.mark.parametrize("fill", [{}, {"fill": 0}])
def test_random_crop_is_a_shift_of_the_grey_padded_image(fill):
  pad = 2
  x = np.asarray(_batch(b=32))
  out = np.asarray(augment.random_crop_flip(jax.random.key(4), jnp.asarray(x),
                                         padding=pad, flip=False, **fill))
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                  constant_values=fill.get("fill", 128))
  offsets = set()
  for i in range(len(x)):
    matches = [(dy, dx) for dy in range(2 * pad + 1)
               for dx in range(2 * pad + 1)
               if np.array_equal(out[i], padded[i, dy:dy + h, dx:dx + w])]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) > 5  # Offsets vary per example.


@pytest.mark.parametrize("kwargs,shape,match", [
    (dict(padding=-1), (2, 4, 4, 1), "padding"),
    (dict(), (4, 4, 1), r"\[B, H, W, C\]"),
])
def test_random_crop_flip_errors(kwargs, shape, match):
  with pytest.raises(ValueError, match=match):
    augment.random_crop_flip(jax.random.key(0), jnp.zeros(shape), **kwargs)


# --------------------------------------------------------------------------
# TFDS (mocked, and a real on-disk ArrayRecord dataset built offline)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name,num_classes,has_train", [
    ("cifar10", 10, True),
    ("cifar100", 100, True),
    ("svhn_cropped", 10, True),
    ("cifar10_corrupted/gaussian_noise_3", 10, False),
])
def test_tfds_mock(name, num_classes, has_train, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    ds = datasets.load_dataset(name, data_dir=str(tmp_path))
  assert ds.name == name and ds.num_classes == num_classes
  assert ds.x_test.shape == (6, 32, 32, 3) and ds.x_test.dtype == np.uint8
  assert ds.y_test.shape == (6,) and ds.y_test.dtype == np.int32
  assert ds.x_train.shape == ((6, 32, 32, 3) if has_train else (0, 32, 32, 3))
  assert ds.y_train.shape == ((6,) if has_train else (0,))
  assert ds.image_shape == (32, 32, 3)
  assert np.all((ds.y_test >= 0) & (ds.y_test < num_classes))


def test_tfds_not_prepared_raises_with_instructions(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(datasets.DataNotFoundError, match="tfds build cifar10") as e:
    datasets.load_dataset("cifar10", data_dir=str(tmp_path))
  assert str(tmp_path) in str(e.value)
  assert "array_record" in str(e.value)
  assert not any((tmp_path / "downloads").glob("*"))  # Nothing fetched.


def test_tfds_unknown_corruption_config():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="bogus_9"):
    datasets.load_dataset("cifar10_corrupted/bogus_9")


def test_tfds_real_array_record_roundtrip(tmp_path):
  """Builds a tiny real `cifar10` ArrayRecord dataset offline, then reads it.

  Exercises the non-mocked `tfds.data_source(..., download=False)` path
  (ArrayRecord reading + PNG decoding without TensorFlow).
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  pil = pytest.importorskip("PIL.Image")
  from tensorflow_datasets.image_classification import cifar

  rng = np.random.default_rng(0)
  images = {s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            for s, n in (("train", 30), ("test", 10))}

  class FakeCifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s, None) for s in images}

    def _generate_examples(self, split, filepaths):
      del filepaths
      for i, img in enumerate(images[split]):
        yield f"{split}_{i}", {"id": f"{split}_{i}",
                               "image": pil.fromarray(img), "label": i % 10}

  builder = FakeCifar10(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))

  ds = datasets.load_dataset("cifar10", data_dir=str(tmp_path))
  assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (10,
                                                                     32, 32, 3)
  assert ds.num_classes == 10 and ds.y_train.dtype == np.int32
  # TFDS shuffles at build time: compare as sets of (image, label) pairs.
  for split in ("train", "test"):
    got = getattr(ds, f"x_{split}")
    labels = getattr(ds, f"y_{split}")
    ref = images[split]
    order = [int(np.flatnonzero(np.all(ref == g, axis=(1, 2, 3)))[0])
             for g in got]
    assert sorted(order) == list(range(len(ref)))
    np.testing.assert_array_equal(labels, np.array(order) % 10)


def test_tfds_prepared_in_wrong_format_says_rebuild(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class _Prepared:
    data_dir = str(tmp_path / "cifar10" / "3.0.2")

    def is_prepared(self):
      return True

  def _fail(*args, **kwargs):
    raise NotImplementedError("file format FileFormat.TFRECORD")

  monkeypatch.setattr(tfds, "data_source", _fail)
  monkeypatch.setattr(tfds, "builder", lambda *a, **k: _Prepared())
  with pytest.raises(datasets.DataNotFoundError, match="rebuild it") as e:
    datasets.load_dataset("svhn_cropped", data_dir=str(tmp_path))
  assert "TFRECORD" in str(e.value)
  assert "tfds build svhn_cropped" in str(e.value)
