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


#: The worker's checks: name -> what it asserts (details in each check's
#: docstring in ``_multidevice_worker.py``). Those in :data:`SLOW` run under
#: ``-m slow``.
CHECKS = {
    "pmap_batch_stats": (
        "pmap + axis_name: every device's statistics and dead mask = 1 device."
    ),
    "sharded_jit_batch_stats": (
        "Batch sharded P('data') under jit: statistics and dead masks = 1 "
        "device."
    ),
    "sharded_jit_strip_params_replicated": (
        "strip_params under jit, params replicated: masks/params = 1 device."
    ),
    "sharded_jit_strip_params_sharded_kernel": (
        "strip_params under jit, kernels sharded over neurons (Auto axes)."
    ),
    "eager_strip_params_keeps_shardings": (
        "Eager strip_params on sharded arrays: the 1-device bits, the params' "
        "placement."
    ),
    "eager_strip_event_then_sharded_step": (
        "After compile_strip, an eager strip_event on mesh-sharded params "
        "compiles nothing and keeps the shardings: a jitted step with a sharded "
        "batch runs on its outputs."
    ),
    "pmap_strip_params": (
        "strip_params inside pmap: the 1-device result on every device."
    ),
    "opt_state_sharding_jit_update_auto": (
        "jit(tx.init), jitted update, jit(strip_event), update: masks and Adam "
        "moments sharded like their params after each step."
    ),
    "opt_state_sharding_eager_init_auto": (
        "Eager tx.init (Auto axes): masks and moments sharded like the params."
    ),
    "explicit_mesh_jit_init": (
        "Explicit axes: jit(tx.init) masks/moments have the params' types."
    ),
    "explicit_mesh_update_and_strip_event": (
        "Explicit axes: jitted update and strip_event run, keep shardings, and "
        "match the 1-device masks and params bit for bit."
    ),
    "probe_dead_over_devices": (
        "ss.probe_dead over sharded-jit and pmap batches = the 1-device result."
    ),
}
SLOW = {"sharded_jit_batch_stats", "sharded_jit_strip_params_sharded_kernel",
        "eager_strip_params_keeps_shardings", "pmap_strip_params",
        "opt_state_sharding_eager_init_auto", "explicit_mesh_jit_init",
        "explicit_mesh_update_and_strip_event", "probe_dead_over_devices"}


@pytest.fixture(scope="module")
def worker(request):
  """Run the checks of this module's selected tests (``-m``, ``-k``) once
  on 8 fake CPU devices; ``{name: result}``."""
  names = sorted({item.callspec.params["name"] for item in request.session.items
                  if item.path == Path(__file__)})
  out = json_verdict(start_python([WORKER, *names], NUM_DEVICES), TIMEOUT_S,
                     "the multi-device worker")
  assert out["devices"] == NUM_DEVICES, out
  return out


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
    for n in CHECKS])
def test_on_eight_devices(worker, name):
  """The worker's verdict on check ``name`` (:data:`CHECKS`)."""
  result = worker["results"][name]
  assert result["ok"], (f"{name} ({CHECKS[name]}) failed in the worker:\n"
                        f"{result['error']}\nworker stderr (tail):\n"
                        f"{worker['stderr'][-2000:]}")
