"""Shared test fixtures: the original's outputs, a shared compilation cache,
a compilation counter, small models and dead trees, hypothesis profiles."""

from __future__ import annotations

import jax
import pytest
from hypothesis import settings

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


class CompileCounter:
  """Counts XLA backend compilations (``jax.monitoring`` duration events)
  while it is entered; ``names`` holds each compiled function's name."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.names: list[str] = []

  @property
  def count(self) -> int:
    return len(self.names)

  def count_of(self, fragment: str) -> int:
    """Compilations whose function name contains ``fragment``."""
    return sum(fragment in name for name in self.names)

  def _listen(self, event, duration, **kwargs):
    del duration
    if event == self.EVENT:
      self.names.append(str(kwargs.get("fun_name", "?")))

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.fixture
def count_compiles():
  """``with count_compiles() as c: ...`` then ``c.count``."""
  return CompileCounter


# Hypothesis: a quarter of each property's examples by default, all of them
# when the slow tests are selected (``-m slow``).
settings.register_profile("quick", max_examples=25)
settings.register_profile("full", max_examples=100)


def pytest_configure(config):
  markexpr = config.getoption("markexpr", "") or ""
  full = "slow" in markexpr and "not slow" not in markexpr
  settings.load_profile("full" if full else "quick")


def examples(n: int) -> int:
  """``n`` examples scaled by the loaded profile (all of them under
  ``-m slow``, a quarter by default, at least 3)."""
  return max(n * settings.default.max_examples // 100, 3)
