"""Per-event cost of each remedy on the application's default ViT.

Default ViT (``config.base_config()``: 7 blocks, hidden 384, MLP 1536,
CIFAR-10 32x32 input), ``with_stripping(adamw)`` targeting the layers that
sow statistics, statistics of one probe batch of 64 random images. Each
remedy is jitted over ``(params, opt_state, stats, key)``; reported: compile
seconds and the median of 5 timed events (``block_until_ready``), all in one
process so the ratios are comparable.

  PYTHONPATH=$PWD python bench/bench_remedies.py
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import synstrip_jax as ss
from synstrip_jax import linen as ss_linen, probe, remedies
from synstrip_vit import config as config_lib, models


def setup():
  c = config_lib.base_config()
  kw = {k: v for k, v in c.model.items() if k != "name"}
  model = models.create_model("vit", num_classes=10, **kw)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32, 32, 3)),
                  jnp.float32)
  params = jax.jit(lambda k: model.init(k, x[:1], train=False))(
      jax.random.key(0))["params"]
  _, state = jax.jit(lambda p: model.apply(
      {"params": p}, x, train=False, mutable=[ss_linen.ACTIVATIONS]))(params)
  stats = probe.reduce_stats_tree(ss_linen.linen_stats(state))
  targets = ss.target_tree(params, stats)
  opt_state = ss.with_stripping(optax.adamw(1e-3), targets).init(params)
  return model, params, opt_state, stats, x


def main():
  model, params, opt_state, stats, x = setup()
  outgoing = models.outgoing_map(params, "vit")
  found = remedies.find_outgoing(
      lambda p, x: model.apply({"params": p}, x, train=False), params, x[:2])
  assert {k: found.outgoing[k] for k in outgoing} == dict(outgoing)
  cstate = remedies.cbp_init(params, outgoing)
  events = {
      "strip": lambda p, o, s, k: remedies.strip(p, o, s, k)[:2],
      "redo": lambda p, o, s, k: remedies.redo(p, o, s, k, outgoing=outgoing,
                                                tau=0.1)[:2],
      "cbp": lambda p, o, s, k: remedies.cbp(
          p, o, cstate, s, k, outgoing=outgoing, replacement_rate=1e-4,
          maturity_threshold=100)[:2],
      "shrink_perturb": lambda p, o, s, k: remedies.shrink_perturb(
          p, o, s, k, shrink=0.8, sigma=0.01),
  }
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  print(f"default ViT: {n_params} params, {len(outgoing)} ReDo layers, "
        f"backend {jax.default_backend()}")
  for name, fn in events.items():
    f = jax.jit(fn) if name != "strip" else fn  # strip_event runs eagerly
    t0 = time.perf_counter()
    jax.block_until_ready(f(params, opt_state, stats, jax.random.key(1)))
    first = time.perf_counter() - t0
    times = []
    for i in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, opt_state, stats, jax.random.key(i)))
      times.append(time.perf_counter() - t0)
    print(f"{name:15s} first event (compile+run) {first:7.2f} s   "
          f"event {np.median(times) * 1e3:8.1f} ms")


if __name__ == "__main__":
  main()
