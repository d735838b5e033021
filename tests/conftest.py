"""Shared test fixtures: the original's outputs, a shared compilation cache."""

import jax
import pytest

from _shared import CACHE_DIR, load_fixtures


@pytest.fixture(scope="session")
def reference():
  """The original implementation's outputs (``fixtures/stripping_reference.npz``)."""
  return load_fixtures()


@pytest.fixture(scope="module")
def compilation_cache():
  """Share compiled programs between the many tiny runs of a module (and its
  subprocesses, through ``CACHE_DIR``); restores JAX's settings after."""
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
