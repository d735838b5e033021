"""Synaptic stripping on several devices: ``pmap``, ``shard_map`` and sharded ``jit``.

One probe-and-strip step for a tiny Flax Linen MLP
(``synstrip_vit.models.create_model('mlp', ...)``) computed four ways:

(a) ``jax.pmap(..., axis_name='batch')``: each device gets a slice of the
    probe batch, reduces its own statistics and sums them across devices with
    ``reduce_stats_tree(..., axis_name='batch')`` (a ``psum``); then
    ``dead_tree`` and ``strip_params`` run on every device;
(b) ``jax.shard_map`` over a 1-D mesh ``('batch',)``: params replicated
    (``P()``), batch sharded (``P('batch')``), same function as (a);
(c) plain ``jax.jit`` on a batch sharded over the mesh: no axis name at all,
    the reduction over the batch axis is already global;
(d) a one-device reference on the whole (unpadded) batch.

It then checks that (a)-(d) agree, and shows the optax path
(``with_stripping(optax.adamw(...))`` + ``strip_event``) inside ``pmap``.

Only the *statistics* need an ``axis_name`` (they are sums over the batch,
which is split across devices). ``strip_params`` needs none: given the same
params and the same (replicated) dead masks, it is a per-kernel computation
that every device does identically.

The probe batch (60 examples) is padded to a multiple of the device count and
the padding is dropped with ``where=``, so the result does not depend on the
number of devices. Run it on 8 fake CPU devices with::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python docs/examples/pmap_and_shard_map.py

(or without ``XLA_FLAGS`` on however many devices you have).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import synstrip_jax as ss
from synstrip_jax import linen as ss_linen, probe
from synstrip_jax.transform import init_masks
from synstrip_vit.models import create_model

STRIPPING_FACTOR = 0.05
NUM_EXAMPLES = 60  # not a multiple of most device counts: padding is exercised
IN_FEATURES, WIDTH, DEPTH, NUM_CLASSES = 16, 32, 2, 4
# Neurons made dead on purpose (a bias of -100: ReLU outputs 0 for every input).
KILLED = {"fc0": [1, 5, 9], "fc1": [0, 7, 20, 31]}

model = create_model("mlp", num_classes=NUM_CLASSES, width=WIDTH, depth=DEPTH)


def make_params():
  params = model.init(jax.random.key(0), jnp.zeros((1, IN_FEATURES)),
                      train=False)["params"]
  for layer, ids in KILLED.items():
    bias = params[layer]["bias"].at[jnp.asarray(ids)].set(-100.0)
    params = {**params, layer: {**params[layer], "bias": bias}}
  return params


def make_batch(num_devices):
  """The probe batch, padded to a multiple of ``num_devices``.

  Returns ``(x, y, x_padded, y_padded, valid)``; ``valid`` is False on the
  padding rows, which ``where=`` removes from the statistics.
  """
  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_EXAMPLES, IN_FEATURES)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, size=NUM_EXAMPLES).astype(np.int32)
  padded = -(-NUM_EXAMPLES // num_devices) * num_devices
  pad = padded - NUM_EXAMPLES
  valid = np.arange(padded) < NUM_EXAMPLES
  x_pad = np.concatenate([x, np.zeros((pad, IN_FEATURES), np.float32)])
  y_pad = np.concatenate([y, np.zeros((pad,), np.int32)])
  return x, y, x_pad, y_pad, valid


def probe_and_strip(params, masks, x, valid, *, axis_name=None):
  """Probe pass -> per-layer statistics -> dead masks -> stripped params.

  ``axis_name`` names the device axis (pmap/shard_map) the batch is split
  over; ``None`` for one device or sharded ``jit`` (global arrays).
  """
  _, state = model.apply({"params": params}, x, train=False,
                         mutable=[ss_linen.ACTIVATIONS])
  # Sown statistics are per example ([B, n]): sum them over this device's
  # valid examples, then (axis_name) over the devices.
  stats = probe.reduce_stats_tree(ss_linen.linen_stats(state),
                                       where=valid, axis_name=axis_name)
  dead = probe.dead_tree(params, stats)  # [n] bool at fc*/kernel
  # No axis_name here: params and dead are the same on every device.
  new_params, new_masks = ss.strip_params(params, dead, masks,
                                          stripping_factor=STRIPPING_FACTOR)
  return stats, dead, new_params, new_masks


def first_replica(tree):
  """Device 0's copy of a pmap output, after checking all copies are equal."""
  def one(a):
    a = np.asarray(a)
    for i in range(1, a.shape[0]):
      np.testing.assert_array_equal(a[i], a[0])
    return a[0]
  return jax.tree.map(one, tree)


def _is_stats(x):
  return isinstance(x, ss.ActivationStats)


def assert_same(name, got, want):
  """Stats totals up to float rounding; everything else bit for bit."""
  stats_g, dead_g, params_g, masks_g = got
  stats_w, dead_w, params_w, masks_w = want
  # The dead masks are exact whatever the summation order: a dead neuron's
  # total is a sum of zeros (exactly 0.0), a live one's a sum of non-negative
  # ReLU outputs with at least one > 0 (never rounds to 0).
  jax.tree.map(np.testing.assert_array_equal, dead_g, dead_w)
  # Stripping is elementwise per kernel given the dead masks, so the stripped
  # params and masks are bit-identical too.
  jax.tree.map(np.testing.assert_array_equal, params_g, params_w)
  jax.tree.map(np.testing.assert_array_equal, masks_g, masks_w)
  # The float32 totals are summed in a different order on N devices (per
  # device, then across devices) than on one: compare them with a tight
  # rtol. Counts and non-finite counts are integers: exact.
  for s_g, s_w in zip(jax.tree.leaves(stats_g, is_leaf=_is_stats),
                      jax.tree.leaves(stats_w, is_leaf=_is_stats)):
    np.testing.assert_allclose(s_g.total, s_w.total, rtol=1e-5, atol=0)
    np.testing.assert_allclose(s_g.abs_total, s_w.abs_total, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(s_g.nonfinite, s_w.nonfinite)
    np.testing.assert_array_equal(s_g.count, s_w.count)
  totals = [(np.asarray(g.total), np.asarray(w.total)) for g, w in zip(
      jax.tree.leaves(stats_g, is_leaf=_is_stats),
      jax.tree.leaves(stats_w, is_leaf=_is_stats))]
  if all(np.array_equal(g, w) for g, w in totals):
    how = "bit-identical"
  else:
    rel = max(float(np.max(np.abs(g - w) / np.maximum(np.abs(w), 1e-30)))
              for g, w in totals)
    how = f"equal up to float rounding, max rel. diff {rel:.1e}"
  print(f"{name}: agrees with the 1-device reference (statistics totals {how})")


def main():
  n = jax.device_count()
  params = make_params()
  x, y, x_pad, y_pad, valid = make_batch(n)
  per_device = x_pad.shape[0] // n
  shard = lambda a: a.reshape((n, per_device) + a.shape[1:])  # for pmap

  # Keep-masks (all True) at the kernels that feed sown activations.
  _, state = model.apply({"params": params}, x[:1], train=False,
                         mutable=[ss_linen.ACTIVATIONS])
  targets = probe.target_tree(params, ss_linen.linen_stats(state))
  masks = init_masks(params, targets)

  # (d) One device, whole batch, no padding.
  ref = jax.jit(probe_and_strip)(params, masks, x, None)

  # (a) pmap: params/masks broadcast (in_axes=None), batch split over devices.
  pmapped = jax.pmap(functools.partial(probe_and_strip, axis_name="batch"),
                     axis_name="batch", in_axes=(None, None, 0, 0))
  out_a = first_replica(pmapped(params, masks, shard(x_pad), shard(valid)))
  assert_same("(a) pmap", out_a, ref)

  # A 1-D mesh over all devices (make_mesh's default axis type is Explicit),
  # the batch laid out over it, params and masks left unsharded (replicated).
  mesh = jax.make_mesh((n,), ("batch",))
  with jax.set_mesh(mesh):
    x_s = jax.device_put(x_pad, NamedSharding(mesh, P("batch")))
    valid_s = jax.device_put(valid, NamedSharding(mesh, P("batch")))

    # (b) shard_map: same function as (a); the outputs are replicated (P())
    # because they only depend on params and psum'd statistics.
    smapped = jax.jit(jax.shard_map(
        functools.partial(probe_and_strip, axis_name="batch"), mesh=mesh,
        in_specs=(P(), P(), P("batch"), P("batch")), out_specs=P()))
    assert_same("(b) shard_map", smapped(params, masks, x_s, valid_s), ref)

    # (c) sharded jit: global arrays; the sum over the (sharded) batch axis
    # is already global (XLA inserts the cross-device reduction): no
    # axis_name.
    out_c = jax.jit(probe_and_strip)(params, masks, x_s, valid_s)
    assert_same("(c) sharded jit", out_c, ref)

  _, dead, stripped, new_masks = ref
  num_dead = {k: int(np.sum(dead[k]["kernel"])) for k in KILLED}
  pruned = {k: int(np.sum(~np.asarray(new_masks[k]["kernel"]))) for k in KILLED}
  for k, ids in KILLED.items():
    assert set(np.flatnonzero(dead[k]["kernel"])) == set(ids), (k, dead[k])
    assert pruned[k] > 0, f"nothing pruned in {k}"
    assert np.all(np.asarray(stripped[k]["kernel"])[~new_masks[k]["kernel"]] == 0)

  # The optax path: masks live in the optimizer state. Inside pmap, strip
  # (strip_event) then take one adamw step with gradients summed across
  # devices; pruned weights stay exactly 0.0 (weight decay included).
  tx = ss.with_stripping(optax.adamw(1e-3), targets)
  opt_state = tx.init(params)

  def strip_then_step(params, opt_state, x, y, valid):
    _, state = model.apply({"params": params}, x, train=False,
                           mutable=[ss_linen.ACTIVATIONS])
    stats = probe.reduce_stats_tree(ss_linen.linen_stats(state),
                                         where=valid, axis_name="batch")
    dead = probe.dead_tree(params, stats)
    params, opt_state = ss.strip_event(params, opt_state, dead,
                                       stripping_factor=STRIPPING_FACTOR)
    stripped = params

    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=False)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(jnp.where(valid, losses, 0.0))

    num_valid = jax.lax.psum(jnp.sum(valid), "batch")
    grads = jax.lax.psum(jax.grad(loss_fn)(params), "batch")
    grads = jax.tree.map(lambda g: g / num_valid, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return stripped, optax.apply_updates(params, updates), opt_state

  step = jax.pmap(strip_then_step, axis_name="batch",
                  in_axes=(None, None, 0, 0, 0))
  stripped_o, trained, opt_state = first_replica(
      step(params, opt_state, shard(x_pad), shard(y_pad), shard(valid)))
  # strip_event gives the same params and masks as strip_params above.
  jax.tree.map(np.testing.assert_array_equal, stripped_o, stripped)
  jax.tree.map(np.testing.assert_array_equal, ss.get_masks(opt_state),
               new_masks)
  kept_zero = sum(int(np.sum(np.asarray(trained[k]["kernel"])
                             [~new_masks[k]["kernel"]] == 0)) for k in KILLED)
  assert kept_zero == sum(pruned.values()), (kept_zero, pruned)
  moved = any(not np.array_equal(trained[k]["kernel"], stripped[k]["kernel"])
              for k in KILLED)
  assert moved, "the adamw step changed nothing"

  print(f"devices: {n}")
  print("dead neurons per layer: " +
        ", ".join(f"{k}={num_dead[k]}/{WIDTH}" for k in KILLED))
  print("pruned weights: " + ", ".join(
      f"{k}={pruned[k]}/{new_masks[k]['kernel'].size}" for k in KILLED))
  print(f"optax: strip_event + adamw step under pmap keep {kept_zero} pruned "
        "weights at 0.0")
  print("OK: (a) pmap, (b) shard_map, (c) sharded jit and (d) 1 device agree")


if __name__ == "__main__":
  main()
