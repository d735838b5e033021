"""Multi-device tests on 8 fake CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
initialises, and this pytest process has already imported JAX, so the checks
run once in a subprocess (``tests/_multidevice_worker.py``, one JAX start for
all of them, ~15 s) that prints a JSON verdict per check; each test below
asserts one verdict and shows the worker's traceback (and stderr) on failure.

What is checked (details in each check's docstring in the worker):
* ``jax.pmap`` with ``axis_name='d'``: per-device ``batch_stats`` (also
  ``update_stats``, ``reduce_examples``, ``where``) equals the single-device
  statistics of the full batch bit for bit; dead masks agree;
* sharded ``jit`` (batch over ``P('data')``): ``batch_stats`` and
  ``dead_masks`` identical to 1 device; ``strip_params`` with replicated
  params, and with kernels sharded over their neurons, identical to 1 device;
* ``strip_params`` inside ``jax.pmap``: the 1-device result on every device;
* the state of ``with_stripping(optax.adamw(...))`` keeps the params'
  shardings (masks and Adam moments) through jitted update steps and
  ``strip_event`` under jit, also for eager ``tx.init`` and under explicit
  mesh axes (``jax.make_mesh``'s default, ``jax.set_mesh``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _shared import json_verdict, start_python

WORKER = Path(__file__).with_name("_multidevice_worker.py")
NUM_DEVICES = 8
TIMEOUT_S = 180


#: The worker check each test asserts (test function name -> check name).
CHECK_OF: dict[str, str] = {}


def runs(name: str):
  """Marks a test as the one asserting the worker check ``name``."""
  def mark(fn):
    CHECK_OF[fn.__name__] = name
    return fn
  return mark


@pytest.fixture(scope="module")
def worker(request):
  """Run the checks of this module's selected tests (``-m``, ``-k``) once
  on 8 fake CPU devices; ``{name: result}``."""
  names = sorted({CHECK_OF[item.originalname] for item in request.session.items
                  if item.path == Path(__file__)})
  out = json_verdict(start_python([WORKER, *names], NUM_DEVICES), TIMEOUT_S,
                     "the multi-device worker")
  assert out["devices"] == NUM_DEVICES, out
  return out


def check(worker, request):
  """Assert the worker's verdict on the calling test's check."""
  name = CHECK_OF[request.node.originalname]
  result = worker["results"][name]
  assert result["ok"], (f"{name} failed in the worker:\n{result['error']}\n"
                        f"worker stderr (tail):\n{worker['stderr'][-2000:]}")


@runs("pmap_batch_stats")
def test_pmap_batch_stats_equal_single_device(worker, request):
  """pmap + axis_name: every device's statistics and dead mask = 1 device."""
  check(worker, request)


@runs("sharded_jit_batch_stats")
def test_sharded_jit_batch_stats_and_dead_masks(worker, request):
  """Batch sharded P('data') under jit: statistics and dead masks = 1 device."""
  check(worker, request)


@runs("sharded_jit_strip_params_replicated")
def test_sharded_jit_strip_params_replicated(worker, request):
  """strip_params under jit, params replicated: masks/params = 1 device."""
  check(worker, request)


@pytest.mark.slow
@runs("sharded_jit_strip_params_sharded_kernel")
def test_sharded_jit_strip_params_sharded_kernel(worker, request):
  """strip_params under jit, kernels sharded over neurons (Auto axes)."""
  check(worker, request)


@pytest.mark.slow
@runs("eager_strip_params_keeps_shardings")
def test_eager_strip_params_keeps_shardings(worker, request):
  """Eager strip_params on sharded arrays: the 1-device bits, the params'
  placement."""
  check(worker, request)


@runs("eager_strip_event_then_sharded_step")
def test_eager_strip_event_then_sharded_step(worker, request):
  """After compile_strip, an eager strip_event on mesh-sharded params
  compiles nothing and keeps the shardings: a jitted step with a sharded
  batch runs on its outputs."""
  check(worker, request)


@runs("pmap_strip_params")
def test_pmap_strip_params(worker, request):
  """strip_params inside pmap: the 1-device result on every device."""
  check(worker, request)


@runs("opt_state_sharding_jit_update_auto")
def test_opt_state_keeps_param_shardings_through_jitted_steps(worker, request):
  """jit(tx.init), jitted update, jit(strip_event), update: masks and Adam
  moments sharded like their params after each step."""
  check(worker, request)


@pytest.mark.slow
@runs("opt_state_sharding_eager_init_auto")
def test_eager_init_masks_sharded_like_params(worker, request):
  """Eager tx.init (Auto axes): masks and moments sharded like the params."""
  check(worker, request)


@pytest.mark.slow
@runs("explicit_mesh_jit_init")
def test_explicit_mesh_jit_init_keeps_sharding_types(worker, request):
  """Explicit axes: jit(tx.init) masks/moments have the params' types."""
  check(worker, request)


@runs("explicit_mesh_update_and_strip_event")
def test_explicit_mesh_update_and_strip_event(worker, request):
  """Explicit axes: jitted update and strip_event run, keep shardings, and
  match the 1-device masks and params bit for bit."""
  check(worker, request)


@runs("probe_dead_over_devices")
def test_probe_dead_over_devices(worker, request):
  """ss.probe_dead over sharded-jit and pmap batches = the 1-device result."""
  check(worker, request)
