"""Benchmark proposed variants of the stripping kernel against the library.

Checks first that each variant in ``bench/strip_variants.py`` is bit-exact:
the original's fixtures (``stripping_reference.npz``, if found) and a random
stress test against ``synstrip_jax.stripping.strip_kernel`` (ties, zeros,
``-0.0``, tiny and empty columns, several factors, Conv-shaped kernels).
Then times ``jit(strip_params)`` and each variant on the default ViT kernels
(interleaved repetitions, median and min ms).

  PYTHONPATH=. python bench/bench_strip_variants.py [--reps 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_strip import (DEAD_PERCENTS, machine_info, make_dead,  # noqa
                               make_masks, make_params)
from bench.strip_variants import strip_kernel_variant, strip_params_variant  # noqa
from synstrip_jax.stripping import strip_kernel, strip_params  # noqa

VARIANTS = {
    "topk+full": dict(select="topk", full=True),
    "bisect+full": dict(select="bisect", full=True),
    "bisect+full+barrier": dict(select="bisect", full=True, barrier=True),
}


def find_fixtures():
  here = os.path.dirname(os.path.abspath(__file__))
  for root in (os.environ.get("SYNSTRIP_SHARED"),
               os.path.join(here, "..", "..", "shared"), "/work/shared"):
    if root:
      p = os.path.join(root, "fixtures", "stripping_reference.npz")
      if os.path.exists(p):
        return p
  return None


def check_fixtures(kw):
  path = find_fixtures()
  if path is None:
    return "fixtures not found"
  ref = np.load(path)
  cases = sorted({k.split("__")[0] for k in ref.files
                  if k.endswith("__weight0") and not k.startswith("active")})
  for case in cases:
    g = lambda name: ref[f"{case}__{name}"]
    w = g("weight0").T.copy()
    mask = np.ones_like(w, bool)
    q = float(g("factor"))
    for k in range(1, int(g("iterations")) + 1):
      if f"{case}__noise_{k}" in ref.files:
        w = w + g(f"noise_{k}").T * mask
      w, mask, thr = (np.asarray(x) for x in strip_kernel_variant(
          jnp.asarray(w), jnp.asarray(g("dead")), jnp.asarray(mask),
          stripping_factor=q, **kw))
      assert np.array_equal(mask, g(f"mask_{k}").T), (case, k)
      assert np.array_equal(w, g(f"weight_{k}").T), (case, k)
      assert np.array_equal(thr, g(f"thresholds_{k}"), equal_nan=True), (case, k)
  return f"{len(cases)} fixture cases exact"


def check_random(kw, trials):
  rng = np.random.default_rng(123)
  shapes = [(1, 3), (2, 5), (7, 16), (64, 32), (3, 3, 4, 6), (384, 96),
            (100, 9)]
  n = 0
  for t in range(trials):
    shape = shapes[t % len(shapes)]
    kind = t % 4
    w = rng.standard_normal(shape).astype(np.float32)
    if kind == 1:  # heavy ties
      w = np.round(w * 2) / 2
    elif kind == 2:  # many zeros, some -0.0, some tiny values
      w[rng.random(shape) < 0.6] = 0.0
      w[rng.random(shape) < 0.1] = -0.0
      w[rng.random(shape) < 0.05] = 1e-40
    elif kind == 3:  # wide range, inf
      w = w * np.float32(10.0) ** rng.integers(-30, 30, shape)
      w.flat[0] = np.inf
    dead = rng.random(shape[-1]) < rng.choice([0.0, 0.3, 0.7, 1.0])
    mask = rng.random(shape) < 0.9
    for q in (0.0, 0.05, 0.2, 0.5, 0.77, 1.0):
      args = (jnp.asarray(w), jnp.asarray(dead), jnp.asarray(mask))
      a = [np.asarray(x) for x in strip_kernel(*args, stripping_factor=q)]
      b = [np.asarray(x) for x in strip_kernel_variant(
          *args, stripping_factor=q, **kw)]
      assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), \
          (shape, kind, q)
      assert np.array_equal(a[2], b[2], equal_nan=True), (shape, kind, q)
      n += 1
  return f"{n} random cases equal to strip_kernel"


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--trials", type=int, default=28)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  for name, kw in VARIANTS.items():
    print(f"{name}: {check_fixtures(kw)}; {check_random(kw, args.trials)}",
          flush=True)

  q = 0.05
  params_np = make_params(0)
  params = jax.tree_util.tree_map(jnp.asarray, params_np)
  masks = jax.tree_util.tree_map(jnp.asarray, make_masks(params_np))
  fns = {"library": jax.jit(strip_params, static_argnames="stripping_factor")}
  for name, kw in VARIANTS.items():
    fns[name] = jax.jit(lambda p, d, m, kw=kw: strip_params_variant(
        p, d, m, stripping_factor=q, **kw))
  call = {name: (lambda f=f, name=name: (lambda d: f(params, d, masks, stripping_factor=q)
                                         if name == "library" else f(params, d, masks)))()
          for name, f in fns.items()}

  info = machine_info()
  print()
  print("| dead % | " + " | ".join(f"{n} ms" for n in fns) + " |")
  print("|---:|" + "---:|" * len(fns))
  rows = []
  for pct in DEAD_PERCENTS:
    dead = jax.tree_util.tree_map(jnp.asarray, make_dead(params_np, pct, 100 + pct))
    ref = call["library"](dead)
    for name, c in call.items():  # warm-up + exactness on the big kernels
      out = c(dead)
      for x, y in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), (name, pct)
    times = {n: [] for n in call}
    for _ in range(args.reps):
      for name, c in call.items():
        t0 = time.perf_counter()
        jax.block_until_ready(c(dead))
        times[name].append((time.perf_counter() - t0) * 1e3)
    cells = [f"{statistics.median(v):.1f} ({min(v):.1f})" for v in times.values()]
    print(f"| {pct} | " + " | ".join(cells) + " |", flush=True)
    rows.append({"bench": "strip_variants", "dead_percent": pct,
                 "reps": args.reps,
                 **{f"{n}_ms_median": round(statistics.median(v), 3)
                    for n, v in times.items()},
                 **{f"{n}_ms_min": round(min(v), 3) for n, v in times.items()},
                 **info})
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as fh:
      for r in rows:
        fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
