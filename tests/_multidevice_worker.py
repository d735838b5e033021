"""Multi-device checks, run by ``tests/test_multidevice.py`` in a subprocess.

JAX reads ``XLA_FLAGS`` when it first initialises its backends, so the 8 fake
CPU devices (``--xla_force_host_platform_device_count=8``) need a fresh
process. Usage::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/_multidevice_worker.py [check ...]

Runs every check (or the named ones) and prints one JSON line
``{"devices": 8, "results": {name: {"ok": bool, "error": str}}}`` as the last
line of stdout. The exit status is 0 when that line was printed (whatever the
checks' outcome), non-zero when the worker itself crashed.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from _shared import assert_bitwise_equal
from conftest import random_dead, small_params

from synstrip_jax import activations as acts
from synstrip_jax.stripping import compile_strip, strip_params
from synstrip_jax.transform import get_masks, strip_event, with_stripping

NDEV = 8
Q = 0.5


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def probe_activations(seed=0, per_device=3, tokens=5, n=16, relu=True):
  """Integer-valued (post-ReLU) activations ``[8 * per_device, tokens, n]``.

  Features 2 and 7 are zero everywhere (dead); feature 11 is zero except one
  element on the last device's shard (alive only through that device).
  """
  rng = np.random.default_rng(seed)
  x = rng.integers(-3, 5, size=(NDEV * per_device, tokens, n)).astype(np.float32)
  if relu:
    x = np.maximum(x, 0)
  x[..., [2, 7, 11]] = 0
  x[-1, -1, 11] = 1.0
  return x


def float_relu_activations(seed=1, per_device=4, n=16):
  rng = np.random.default_rng(seed)
  x = np.maximum(rng.normal(size=(NDEV * per_device, n)), 0).astype(np.float32)
  x[:, [0, 5]] = 0
  x[3, 9] = 1e-30  # tiny but alive: the rule is exact
  return x


# Neuron counts divisible by the 8 devices (kernels are sharded over them).
SHAPES = {"fc": (16, 32), "conv": (3, 3, 4, 16), "head": (32, 8)}


def make_params(seed=0):
  """conftest's :func:`small_params` of ``SHAPES``, as host (numpy) arrays."""
  return jax.tree_util.tree_map(np.asarray, small_params(SHAPES, seed))


def make_dead(seed=0):
  """About 40 % of the fc and conv neurons dead, as host (numpy) arrays."""
  return jax.tree_util.tree_map(
      np.asarray, random_dead(jax.eval_shape(lambda: small_params(SHAPES)), 0.4,
                              seed + 100, ("fc", "conv")))


TARGETS = {"fc": {"kernel": True, "bias": False},
           "conv": {"kernel": True, "bias": False},
           "head": {"kernel": False, "bias": False}}


def param_specs():
  """Kernels sharded over their neuron axis, everything else replicated."""
  return {"fc": {"kernel": P(None, "data"), "bias": P()},
          "conv": {"kernel": P(None, None, None, "data"), "bias": P()},
          "head": {"kernel": P(), "bias": P()}}


def make_tx():
  return with_stripping(optax.adamw(1e-2, weight_decay=0.1), TARGETS)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def sharding_mismatches(tree, params, what):
  """Paths where a leaf of ``tree`` is not sharded like the aligned param."""
  bad = []
  flat_p = dict((jax.tree_util.keystr(p), x)
                for p, x in jax.tree_util.tree_leaves_with_path(params))
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    key = jax.tree_util.keystr(path)
    p = flat_p[key]
    if not x.sharding.is_equivalent_to(p.sharding, p.ndim):
      bad.append(f"{what}{key}: {x.sharding} (param: {p.sharding})")
  return bad


def _dead_masks(stats_tree):
  return jax.tree_util.tree_map(
      acts.dead_mask, stats_tree,
      is_leaf=lambda x: isinstance(x, acts.ActivationStats))


def device_put_tree(tree, mesh, specs):
  return jax.tree_util.tree_map(
      lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------

CHECKS = {}


def check(fn):
  CHECKS[fn.__name__] = fn
  return fn


@check
def pmap_batch_stats():
  """Per-device ``batch_stats(shard, axis_name='d')`` under ``jax.pmap``
  equals the single-device statistics of the full batch, bit for bit, on
  every device; so do ``merge_stats`` over two probe batches, the
  ``example_stats``/``reduce_examples`` path and ``where`` padding; the dead
  masks agree (including a neuron alive on one device only)."""
  x = probe_activations()
  x2 = probe_activations(seed=5)
  full = acts.batch_stats(x)
  shards = x.reshape(NDEV, -1, *x.shape[1:])
  shards2 = x2.reshape(NDEV, -1, *x2.shape[1:])
  where = (np.arange(x.shape[0]) % 3 != 1).reshape(NDEV, -1)

  @functools.partial(jax.pmap, axis_name="d")
  def probe(xs, xs2, w):
    s = acts.batch_stats(xs, axis_name="d")
    acc = acts.merge_stats(acts.init_stats(xs.shape[-1]),
                           acts.batch_stats(xs, axis_name="d"))
    acc = acts.merge_stats(acc, acts.batch_stats(xs2, axis_name="d"))
    per_ex = acts.reduce_examples(acts.example_stats(xs), axis_name="d")
    padded = acts.batch_stats(xs, axis_name="d", where=w)
    return s, acc, per_ex, padded, acts.dead_mask(s), acts.dead_mask(acc)

  s, acc, per_ex, padded, dead, dead_acc = probe(shards, shards2, where)
  ref_acc = acts.merge_stats(full, acts.batch_stats(x2))
  ref_pad = acts.batch_stats(x[where.reshape(-1)])
  expected_dead = np.all(x.reshape(-1, x.shape[-1]) == 0, axis=0)
  assert expected_dead.tolist() == [i in (2, 7) for i in range(16)]
  s, acc, per_ex, padded, dead, dead_acc = jax.device_get(
      (s, acc, per_ex, padded, dead, dead_acc))  # compared on the host
  for d in range(NDEV):
    take = lambda t: jax.tree_util.tree_map(lambda a: a[d], t)
    assert_bitwise_equal(take(s), full, f"device {d} batch_stats")
    assert_bitwise_equal(take(acc), ref_acc, f"device {d} update_stats")
    assert_bitwise_equal(take(per_ex), full, f"device {d} reduce_examples")
    assert_bitwise_equal(take(padded), ref_pad, f"device {d} where")
    assert_bitwise_equal(dead[d], acts.dead_mask(full),
                         f"device {d} dead_mask")
    assert_bitwise_equal(dead[d], expected_dead,
                         f"device {d} dead_mask (numpy)")
    assert_bitwise_equal(dead_acc[d], acts.dead_mask(ref_acc),
                         f"device {d} dead acc")


@check
def sharded_jit_batch_stats():
  """``jit`` with the batch sharded ``P('data')`` over 8 devices:
  ``batch_stats`` bit-identical to the 1-device result (integer-valued
  activations), dead masks identical (integer and float ReLU outputs)."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch = NamedSharding(mesh, P("data"))
  x, xf = probe_activations(), float_relu_activations()
  xs, xfs = jax.device_put(x, batch), jax.device_put(xf, batch)
  assert len(xs.sharding.device_set) == NDEV

  @jax.jit
  def probe(a, b):
    stats = {"mlp": {"fc1": acts.batch_stats(a)}, "fc2": acts.batch_stats(b)}
    return stats, _dead_masks(stats)

  stats, dead = probe(xs, xfs)
  ref_stats = {"mlp": {"fc1": acts.batch_stats(x)}, "fc2": acts.batch_stats(xf)}
  ref_dead = _dead_masks(ref_stats)
  assert_bitwise_equal(stats["mlp"], ref_stats["mlp"], "int batch_stats")
  assert_bitwise_equal(dead, ref_dead, "dead masks")
  np.testing.assert_allclose(stats["fc2"].total, ref_stats["fc2"].total, rtol=1e-6)
  assert_bitwise_equal(stats["fc2"].count, ref_stats["fc2"].count, "count")
  assert np.flatnonzero(np.asarray(dead["fc2"])).tolist() == [0, 5]


@check
def probe_dead_over_devices():
  """``probe_dead`` of an unmodified Linen MLP over 3 batches with padding:
  sharded ``jit`` (global batches over 8 devices) and ``pmap`` (leading
  device axis) give the 1-device dead tree and the same statistics."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import synstrip_jax as ss  # pylint: disable=import-outside-toplevel
  from synstrip_jax import linen as ss_linen  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(16, name="fc")(x))
      return nn.Dense(3, name="head")(h)

  model = Net()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, NDEV * 2, 5)).astype(np.float32)
  valid = np.ones((3, NDEV * 2), bool)
  valid[-1, -5:] = False               # padding rows of the last batch
  params = model.init(jax.random.key(0), x[0])["params"]
  params = jax.tree.map(np.array, params)
  params["fc"]["bias"][:4] = -50.0   # force some dead neurons
  # Padding rows that would revive neuron 0 if they were counted.
  x[-1, -5:] = 1000.0 * np.sign(params["fc"]["kernel"][:, 0])
  stats_fn = lambda p, b: ss_linen.capture_stats(
      model, {"params": p}, b["x"], select="fc")[1]
  where_fn = lambda b: b["valid"]
  batches = [{"x": x[i], "valid": valid[i]} for i in range(3)]
  ref = ss.probe_dead(stats_fn, params, batches, where_fn=where_fn)
  ref_stats = ss.probe_stats(stats_fn, params, batches, where_fn=where_fn)
  assert int(np.sum(ref["fc"]["kernel"])) >= 4
  unmasked = ss.probe_dead(stats_fn, params, batches)  # padding counted
  assert int(np.sum(unmasked["fc"]["kernel"])) < int(np.sum(ref["fc"]["kernel"]))

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches]
  got = ss.probe_dead(stats_fn, params, sharded, where_fn=where_fn)
  got_stats = ss.probe_stats(stats_fn, params, sharded, where_fn=where_fn)
  assert_bitwise_equal(got, ref, "sharded jit dead")
  np.testing.assert_allclose(
      got_stats["fc"]["post_act"].total,
      ref_stats["fc"]["post_act"].total, rtol=1e-6)

  per_device = [jax.tree.map(lambda a: a.reshape((NDEV, -1) + a.shape[1:]), b)
                for b in batches]
  pm = ss.probe_dead(stats_fn, params, per_device, where_fn=where_fn,
                     axis_name="d")
  assert_bitwise_equal(pm, ref, "pmap dead")


@check
def sharded_jit_strip_params_replicated():
  """``strip_params`` under ``jit`` with params and dead vectors replicated
  on the 8-device mesh: params and masks bit-identical to the 1-device call;
  a second call with the masks too."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  rep = NamedSharding(mesh, P())
  params, dead = make_params(), make_dead()
  ref_p, ref_m = strip_params(params, dead, stripping_factor=Q)
  ref_p2, ref_m2 = strip_params(ref_p, make_dead(1), ref_m, stripping_factor=Q)
  put = lambda t: jax.tree_util.tree_map(lambda a: jax.device_put(a, rep), t)
  fn = jax.jit(strip_params, static_argnames="stripping_factor")
  got_p, got_m = fn(put(params), put(dead), stripping_factor=Q)
  got_p2, got_m2 = fn(got_p, put(make_dead(1)), got_m, stripping_factor=Q)
  assert_bitwise_equal((got_p, got_m), (ref_p, ref_m), "first strip")
  assert_bitwise_equal((got_p2, got_m2), (ref_p2, ref_m2), "second strip")
  assert np.asarray(ref_m["fc"]["kernel"]).sum() < ref_m["fc"]["kernel"].size


@check
def sharded_jit_strip_params_sharded_kernel():
  """``strip_params`` under ``jit`` with kernels sharded over their neuron
  axis (``P(None, 'data')``, default Auto mesh axes): bit-identical to the
  1-device call, outputs sharded like the inputs."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  params, dead = make_params(), make_dead()
  ref = strip_params(params, dead, stripping_factor=Q)
  sp = device_put_tree(params, mesh, param_specs())
  got_p, got_m = jax.jit(strip_params, static_argnames="stripping_factor")(
      sp, dead, stripping_factor=Q)
  assert_bitwise_equal((got_p, got_m), ref, "sharded kernels")
  bad = sharding_mismatches(got_p, sp, "params") + sharding_mismatches(
      {"fc": {"kernel": got_m["fc"]["kernel"]}}, {"fc": {"kernel": sp["fc"]["kernel"]}},
      "masks")
  assert not bad, "\n".join(bad)


@check
def eager_strip_params_keeps_shardings():
  """Eager ``strip_params`` on arrays sharded over 8 devices equals the
  single-device result and the jitted call, and every output is placed like
  its input (kernels sharded over neurons, masks likewise)."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  params, dead = make_params(), make_dead()
  sp = device_put_tree(params, mesh, param_specs())
  want = strip_params(params, dead, stripping_factor=Q)
  got_p, got_m = strip_params(sp, dead, stripping_factor=Q)
  assert_bitwise_equal((got_p, got_m), want, "eager sharded vs one device")
  jitted = jax.jit(strip_params, static_argnames="stripping_factor")
  assert_bitwise_equal(jitted(sp, dead, stripping_factor=Q), want, "jit")
  bad = sharding_mismatches(got_p, sp, "params") + sharding_mismatches(
      {"fc": {"kernel": got_m["fc"]["kernel"]}},
      {"fc": {"kernel": sp["fc"]["kernel"]}}, "masks")
  assert not bad, "\n".join(bad)


@check
def eager_strip_event_then_sharded_step():
  """After ``compile_strip`` from shapes, an eager ``strip_event`` on
  mesh-sharded params compiles nothing and keeps every sharding, so a jitted
  step with a mesh-sharded batch runs on its outputs."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx = make_tx()
  params = device_put_tree(make_params(), mesh, param_specs())
  state = tx.init(params)  # eager: masks sharded like the kernels
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params)
  assert compile_strip(abstract, TARGETS) == 2  # fc and conv kernels
  dead = make_dead()  # host arrays, computed before counting compilations
  compiles = []
  listen = lambda event, _, **kw: compiles.append(kw.get("fun_name")) if event == (
      "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    new_params, new_state = strip_event(params, state, dead,
                                        stripping_factor=Q)
    jax.block_until_ready(new_params)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert not compiles, f"eager strip_event compiled {compiles}"
  errors = (sharding_mismatches(new_params, params, "params")
            + _opt_sharding_errors(new_params, new_state, "strip_event:"))
  assert not errors, "\n".join(errors)
  batch = jax.device_put(np.ones((16, 16), np.float32),
                         NamedSharding(mesh, P("data")))
  loss = jax.jit(lambda p, x: jax.numpy.sum(
      jax.nn.relu(x @ p["fc"]["kernel"]) @ p["head"]["kernel"]))
  grads = jax.grad(lambda p: loss(p, batch))(new_params)
  updates, _ = jax.jit(tx.update)(grads, new_state, new_params)
  assert np.isfinite(float(loss(optax.apply_updates(new_params, updates),
                                batch)))


@check
def pmap_strip_params():
  """``strip_params`` inside ``jax.pmap`` with the params replicated (one
  copy per device): every device returns the single-device result."""
  params, dead = make_params(), make_dead()
  ref = strip_params(params, dead, stripping_factor=Q)
  stack = lambda t: jax.tree_util.tree_map(
      lambda a: np.broadcast_to(a, (NDEV,) + a.shape), t)
  got = jax.pmap(functools.partial(strip_params, stripping_factor=Q))(
      stack(params), stack(dead))
  for d in range(NDEV):
    assert_bitwise_equal(jax.tree_util.tree_map(lambda a: a[d], got), ref,
                         f"device {d}")


def _opt_sharding_errors(params, state, what):
  masks = get_masks(state)
  mu = optax.tree_utils.tree_get(state, "mu")
  nu = optax.tree_utils.tree_get(state, "nu")
  masked = {k: {"kernel": params[k]["kernel"]} for k in ("fc", "conv")}
  masks = {k: {"kernel": masks[k]["kernel"]} for k in ("fc", "conv")}
  return (sharding_mismatches(masks, masked, f"{what} masks")
          + sharding_mismatches(mu, params, f"{what} mu")
          + sharding_mismatches(nu, params, f"{what} nu"))


@check
def opt_state_sharding_jit_update_auto():
  """Default (Auto) mesh axes, kernels sharded ``P(..., 'data')``:
  ``jax.jit(tx.init)`` then a jitted update step; afterwards the masks and
  Adam moments are sharded like their params, and ``strip_event`` under jit
  and a second step keep every sharding. (Right after ``jax.jit(tx.init)``
  nothing is checked: with Auto axes, XLA places constant outputs on one
  device, optax's own moments included.)"""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx = make_tx()
  params = device_put_tree(make_params(), mesh, param_specs())
  grads = device_put_tree(make_params(7), mesh, param_specs())

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  params, state = step(params, state, grads)
  errors = _opt_sharding_errors(params, state, "after step 1:")
  params, state = jax.jit(strip_event, static_argnames="stripping_factor")(
      params, state, make_dead(), stripping_factor=Q)
  errors += _opt_sharding_errors(params, state, "after strip_event:")
  params, state = step(params, state, grads)
  errors += _opt_sharding_errors(params, state, "after step 2:")
  assert not errors, "\n".join(errors)


@check
def opt_state_sharding_eager_init_auto():
  """Default (Auto) mesh axes: ``tx.init(params)`` (eager) gives masks and
  Adam moments sharded like their params. optax's moments are; the masks are
  created with ``jnp.ones(shape)`` and land on one device."""
  mesh = Mesh(np.array(jax.devices()), ("data",))
  params = device_put_tree(make_params(), mesh, param_specs())
  state = make_tx().init(params)
  errors = _opt_sharding_errors(params, state, "eager init:")
  assert not errors, "\n".join(errors)


def _explicit_mesh():
  return jax.make_mesh((NDEV,), ("data",), axis_types=(AxisType.Explicit,))


@check
def explicit_mesh_jit_init():
  """Explicit mesh axes (``jax.make_mesh``'s default in this JAX, with
  ``jax.set_mesh``): ``jax.jit(tx.init)(params)`` gives masks and Adam
  moments with the params' sharding types (``jax.typeof``)."""
  mesh = _explicit_mesh()
  host_params = make_params()
  with jax.set_mesh(mesh):
    params = device_put_tree(host_params, mesh, param_specs())
    state = jax.jit(make_tx().init)(params)
    errors = _opt_sharding_errors(params, state, "jit init:")
    masks = get_masks(state)
    for k in ("fc", "conv"):
      tm = jax.typeof(masks[k]["kernel"]).sharding.spec
      tp = jax.typeof(params[k]["kernel"]).sharding.spec
      if tm != tp:
        errors.append(f"masks[{k}] type spec {tm} != params spec {tp}")
  assert not errors, "\n".join(errors)


@check
def explicit_mesh_update_and_strip_event():
  """Explicit mesh axes: a jitted update step and ``strip_event`` under jit
  run, keep the params' shardings on masks and moments, and give the same
  params and masks as the 1-device computation (masks bit for bit)."""
  mesh = _explicit_mesh()
  tx = make_tx()
  host_params, host_grads, dead = make_params(), make_params(7), make_dead()
  ref_params = host_params
  ref_state = tx.init(ref_params)
  ref_params, ref_state = strip_event(ref_params, ref_state, dead,
                                      stripping_factor=Q)
  with jax.set_mesh(mesh):
    params = device_put_tree(host_params, mesh, param_specs())
    grads = device_put_tree(host_grads, mesh, param_specs())
    state = jax.jit(tx.init)(params)
    params, state = jax.jit(strip_event, static_argnames="stripping_factor")(
        params, state, dead, stripping_factor=Q)
    errors = _opt_sharding_errors(params, state, "after strip_event:")
    assert_bitwise_equal(get_masks(state), get_masks(ref_state), "masks")
    assert_bitwise_equal(params, ref_params, "params")

    @jax.jit
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params, state = step(params, state, grads)
    errors += _opt_sharding_errors(params, state, "after step:")
    for k in ("fc", "conv"):
      m = np.asarray(get_masks(state)[k]["kernel"])
      if not np.all(np.asarray(params[k]["kernel"])[~m] == 0):
        errors.append(f"{k}: stripped weight not 0 after the step")
  assert not errors, "\n".join(errors)


def main(names):
  results = {}
  for name in names or list(CHECKS):
    try:
      CHECKS[name]()
      results[name] = {"ok": True, "error": ""}
    except Exception:  # report every failure, run every check
      results[name] = {"ok": False, "error": traceback.format_exc(limit=6)}
  print(json.dumps({"devices": jax.device_count(), "results": results}))


if __name__ == "__main__":
  main(sys.argv[1:])
