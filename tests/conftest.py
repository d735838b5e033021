"""Shared test fixtures: the original's outputs, a shared compilation cache,
a compilation counter, small models and dead trees, hypothesis profiles."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

# The tests, and the processes they start, compile with JAX's
# ``jax_disable_most_optimizations`` (XLA:CPU: LLVM at -O0, no expensive
# passes). Most of the suite's time is compiling hundreds of small programs
# that run for milliseconds, and unoptimized they compile in about two thirds
# of the time. Set in the environment before JAX is imported, so that every
# process of a run compiles alike (some tests compare a child process's run
# with an in-process one bit for bit). ``JAX_DISABLE_MOST_OPTIMIZATIONS=0
# python -m pytest ...`` runs everything at XLA's default optimization.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings

from _shared import CACHE_DIR, load_fixtures


@pytest.fixture(scope="session")
def reference():
  """The original implementation's outputs (``fixtures/stripping_reference.npz``)."""
  return load_fixtures()


# One persistent compilation cache for the whole session, set before the
# first compilation of each xdist worker (JAX opens its cache once per
# process): the workers and the processes the tests start (through
# ``CACHE_DIR``) compile each program once, and nothing is written to the
# user's cache.
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# In case JAX was imported before this file (it reads the variable then).
jax.config.update("jax_disable_most_optimizations", os.environ[
    "JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "t", "yes", "y",
                                                  "on"))


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


# Small models and dead trees.

#: The small model of the optimizer and stripping tests: a conv kernel
#: ``[3, 3, 2, 6]`` (6 neurons, fan-in 18), a dense kernel ``[12, 8]`` (8
#: neurons) and a head ``[8, 3]``, each with a bias.
SMALL_SHAPES = {"conv": (3, 3, 2, 6), "fc1": (12, 8), "head": (8, 3)}
#: Which leaves of a :func:`small_params` tree are stripped: every kernel but
#: the head's, never a bias.
SMALL_TARGETS = {"conv": {"kernel": True, "bias": False},
                 "fc1": {"kernel": True, "bias": False},
                 "head": {"kernel": False, "bias": False}}


Seed = Union[int, Sequence[int], jax.Array]


def host_rng(seed: Seed) -> np.random.Generator:
  """A NumPy generator seeded by ints or by a JAX key's data (test data is
  drawn on the host: an eager ``jax.random`` draw compiles a program per
  shape, about a second each on a small CPU)."""
  if isinstance(seed, jax.Array):
    if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
      seed = jax.random.key_data(seed)
    seed = np.asarray(seed).ravel().tolist()
  return np.random.default_rng(seed)


def init_key(seed: int = 0) -> jax.Array:
  """A typed RBG key for the tests' model inits (``model.init``,
  ``nnx.Rngs``), whose values are arbitrary: threefry's draws compile a
  program of seconds per parameter shape on a small CPU, RBG's do not."""
  return jax.random.key(seed, impl="rbg")


def fill_variables(abstract: Any, seed: Seed = 0) -> Any:
  """Concrete values for an abstract variables tree, drawn on the host.

  ``abstract``: a pytree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of
  a Linen ``init``) or an abstract NNX ``State``. By the leaf's name: kernels
  ``N(0, 1 / fan_in)``, biases ``N(0, 0.1^2)``, scales and variances 1,
  means 0, every other leaf (embeddings, tokens) ``N(0, 0.02^2)``. Arbitrary
  values of the model's shapes without compiling its initializers (seconds
  per model on a small CPU); :func:`init_key` runs the initializers (as
  needed for a model that keeps RNG keys). Integer and boolean leaves (e.g.
  the counts of sown statistics) are zeros.
  """
  rng = host_rng(seed)

  def leaf(path, a):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    name = [n for n in names if n != "value"][-1]
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      raise TypeError(f"fill_variables cannot make the RNG key "
                      f"{jax.tree_util.keystr(path)}: build a model that keeps "
                      f"RNG keys with init_key")
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.zeros(a.shape, a.dtype)
    if name in ("scale", "var"):
      return jnp.ones(a.shape, a.dtype)
    if name == "mean":
      return jnp.zeros(a.shape, a.dtype)
    scale = {"kernel": 1.0 / np.sqrt(np.prod(a.shape[:-1])),
             "bias": 0.1}.get(name, 0.02)
    return host_normal(rng, a.shape, a.dtype, scale)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def linen_variables(model: Any, seed: Seed, *args: Any, **kwargs: Any) -> Any:
  """``model.init(key, *args, **kwargs)``'s variables with
  :func:`fill_variables`' values (the init is only traced)."""
  return fill_variables(jax.eval_shape(
      lambda: model.init(init_key(), *args, **kwargs)), seed)


def nnx_model(ctor: Any, seed: Seed) -> Any:
  """The NNX module ``ctor()`` with :func:`fill_variables`' values (built
  abstractly: its initializers are only traced)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(nnx.eval_shape(ctor))
  return nnx.merge(graphdef, fill_variables(state, seed))


def host_normal(rng: np.random.Generator, shape: Sequence[int],
                dtype: Any = jnp.float32, scale: float = 1.0) -> jax.Array:
  """``scale * N(0, 1)`` of ``shape`` from ``rng``, as a ``dtype`` array."""
  return jnp.asarray((scale * rng.standard_normal(tuple(shape))).astype(
      np.float32).astype(jnp.dtype(dtype)))


def normal(shape: Sequence[int], seed: Seed = 0,
           dtype: Any = jnp.float32) -> jax.Array:
  """``N(0, 1)`` of ``shape`` drawn on the host (:func:`host_rng`)."""
  return host_normal(host_rng(seed), shape, dtype)


def small_params(shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 seed: Seed = 0,
                 dtype: Any = jnp.float32) -> dict:
  """``{layer: {"kernel": N(0, 1) [shape], "bias": 0.1 N(0, 1) [shape[-1]]}}``.

  ``shapes`` maps layer names to kernel shapes (default
  :data:`SMALL_SHAPES`); ``seed`` is an int or a JAX key (:func:`host_rng`).
  """
  shapes = SMALL_SHAPES if shapes is None else shapes
  rng = host_rng(seed)
  return {name: {"kernel": host_normal(rng, s, dtype),
                 "bias": host_normal(rng, (s[-1],), dtype, 0.1)}
          for name, s in shapes.items()}


def dead_tree(params: dict, dead: Mapping[str, Any]) -> dict:
  """A dead tree aligned with ``{layer: {leaf: array}}`` params:
  ``dead[layer]`` as given (so tests can pass bad values) at the layer's
  kernel, ``None`` at every other leaf."""
  unknown = set(dead) - set(params)
  if unknown:
    raise ValueError(f"dead names layers {sorted(unknown)} not in the params "
                     f"({sorted(params)})")
  return {name: {leaf: dead.get(name) if leaf == "kernel" else None
                 for leaf in layer}
          for name, layer in params.items()}


#: The dead neurons of :func:`small_dead`: 3 of the conv layer's 6 and 3 of
#: fc1's 8.
SMALL_DEAD = {"conv": [True, False, False, True, False, True],
              "fc1": [True, False, True, False, False, False, False, True]}


def small_dead(**dead: Any) -> dict:
  """A :func:`dead_tree` of :func:`small_params` (default shapes):
  ``small_dead(fc1=..., conv=...)`` sets the named layers' dead neurons (the
  others None); ``small_dead()`` is :data:`SMALL_DEAD`."""
  if not dead:
    dead = {name: jnp.asarray(d) for name, d in SMALL_DEAD.items()}
  return dead_tree(jax.eval_shape(small_params), dead)


def random_dead(params: dict, frac: float, seed: Seed,
                layers: Optional[Sequence[str]] = None) -> dict:
  """A :func:`dead_tree` with each neuron of ``layers`` (default: every
  layer) dead with probability ``frac``; ``seed``: int or JAX key."""
  layers = list(params) if layers is None else list(layers)
  rng = host_rng(seed)
  return dead_tree(params, {
      name: jnp.asarray(rng.random(params[name]["kernel"].shape[-1]) < frac)
      for name in layers})


# Hypothesis: a twentieth of each property's examples by default (each new
# shape compiles), all of them when the slow tests are selected (``-m slow``).
settings.register_profile("quick", max_examples=5)
settings.register_profile("full", max_examples=100)


def _full_examples(config) -> bool:
  markexpr = config.getoption("markexpr", "") or ""
  return "slow" in markexpr and "not slow" not in markexpr


def pytest_configure(config):
  settings.load_profile("full" if _full_examples(config) else "quick")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Under ``-m slow`` the hypothesis properties run their full example
  count, so they are slow tests then (and selected by ``-m slow``)."""
  if _full_examples(config):
    for item in items:
      if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        item.add_marker(pytest.mark.slow)


def examples(n: int) -> int:
  """``n`` examples scaled by the loaded profile (all of them under
  ``-m slow``, a twentieth by default, at least 2)."""
  return max(n * settings.default.max_examples // 100, 2)
