"""The public API: its size, ``__all__`` everywhere, README's list, lazy NNX."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import synstrip_jax
from _shared import REPO

MAX_TOP_LEVEL = 20


def test_top_level_is_small_and_every_module_has_all():
  assert len(synstrip_jax.__all__) <= MAX_TOP_LEVEL, synstrip_jax.__all__
  assert len(set(synstrip_jax.__all__)) == len(synstrip_jax.__all__)
  for name in synstrip_jax.__all__:
    assert hasattr(synstrip_jax, name), name
  for info in pkgutil.iter_modules(synstrip_jax.__path__):
    module = importlib.import_module(f"synstrip_jax.{info.name}")
    assert isinstance(getattr(module, "__all__", None), list), info.name
    for name in module.__all__:
      assert hasattr(module, name), f"{info.name}.{name}"


def test_readme_api_list_is_all():
  text = (REPO / "README.md").read_text()
  block = re.search(r"<!-- api:begin -->(.*?)<!-- api:end -->", text, re.S)
  assert block, "README.md has no <!-- api:begin --> ... <!-- api:end --> block"
  # Every `name` in backticks, but the package and its module names.
  names = set(re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", block.group(1)))
  names.discard("synstrip_jax")
  assert names == set(synstrip_jax.__all__), (
      sorted(names - set(synstrip_jax.__all__)),
      sorted(set(synstrip_jax.__all__) - names))


def test_import_does_not_load_flax_nnx():
  code = ("import sys, synstrip_jax, synstrip_jax.linen; "
          "assert 'flax.nnx' not in sys.modules, 'flax.nnx imported'; "
          "synstrip_jax.nnx; assert 'flax.nnx' in sys.modules")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("name", ["find_dead", "dead_masks", "psum_stats",
                                  "update_stats", "strip_kernel"])
def test_removed_top_level_names_warn(name):
  with pytest.warns(DeprecationWarning, match=f"synstrip_jax.{name}"):
    getattr(synstrip_jax, name)
  with pytest.raises(AttributeError):
    getattr(synstrip_jax, "no_such_name")


def test_path_format_is_slash_joined_keys():
  tree = {"enc": [{"fc1": {"kernel": np.zeros((2, 3))}}]}
  (path, _), = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert synstrip_jax.trees.path_str(path) == "enc/0/fc1/kernel"


def test_second_identical_pmap_probe_compiles_nothing(count_compiles):
  """probe_stats with axis_name reuses its pmapped step across calls."""
  stats_fn = _relu_stats
  batches = [np.ones((jax.local_device_count(), 4, 3), np.float32)]
  synstrip_jax.probe_stats(stats_fn, None, batches, axis_name="d")
  with count_compiles() as counter:
    jax.block_until_ready(synstrip_jax.probe_stats(stats_fn, None, batches,
                                                   axis_name="d"))
  assert counter.count == 0, counter.names


def _relu_stats(_, batch):
  return {"fc": {"post_act": synstrip_jax.activations.example_stats(
      jax.nn.relu(batch))}}
