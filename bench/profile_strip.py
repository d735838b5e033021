"""Stage-by-stage timing of strip_params on the ViT kernels (each stage jitted).

  PYTHONPATH=. python bench/profile_strip.py [DEAD_PERCENT]   (default 50)
"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from bench.bench_strip import make_params, make_dead, kernel_list  # noqa
from bench.strip_variants import bucket_sizes  # noqa
from synstrip_jax.stripping import _interpolation_table, column_thresholds

pct = float(sys.argv[1]) if len(sys.argv) > 1 else 50
reps = 7
q = 0.05
P = make_params(0)
ks = [jnp.asarray(k) for k in kernel_list(P)]
ds = [jnp.asarray(d) for d in kernel_list(make_dead(P, pct, 150))]
ms = [jnp.ones(k.shape, bool) for k in ks]


def size_for(k, d):
  n = k.shape[-1]
  nd = int(d.sum())
  sizes = bucket_sizes(n)
  return [s for s in sizes if s >= nd][0]


SIZES = tuple(size_for(k, d) for k, d in zip(ks, ds))


def bench(name, f, *a):
  f = jax.jit(f)
  jax.block_until_ready(f(*a))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*a))
    ts.append((time.perf_counter() - t0) * 1e3)
  print(f"{name:40s} median {statistics.median(ts):8.2f}  min {min(ts):8.2f} ms")


def gather_cols(ks, ds):
  out = []
  for k, d, s in zip(ks, ds, SIZES):
    n = k.shape[-1]
    idx = jnp.nonzero(d, size=s, fill_value=n)[0]
    out.append(jnp.take(k, idx, axis=1, mode="clip").T)
  return out


def gather_rows_of_T(ks, ds):
  out = []
  for k, d, s in zip(ks, ds, SIZES):
    n = k.shape[-1]
    idx = jnp.nonzero(d, size=s, fill_value=n)[0]
    out.append(jnp.take(k.T, idx, axis=0, mode="clip"))
  return out


cols = jax.jit(gather_cols)(ks, ds)
print("pct", pct, "bucket sizes", SIZES)
bench("effective where(mask,k,0) all", lambda ks, ms: [jnp.where(m, k, 0.) for k, m in zip(ks, ms)], ks, ms)
bench("nonzero idx", lambda ds: [jnp.nonzero(d, size=s, fill_value=d.shape[0])[0] for d, s in zip(ds, SIZES)], ds)
bench("gather cols + .T", gather_cols, ks, ds)
bench("k.T then gather rows", gather_rows_of_T, ks, ds)
bench("transpose only", lambda ks: [k.T + 0 for k in ks], ks)
bench("where(!=0, inf) on cols", lambda cs: [jnp.where(c != 0, c, jnp.inf) for c in cs], cols)


def topk(cs):
  out = []
  for c in cs:
    k = _interpolation_table(c.shape[-1], q)[3]
    out.append(jax.lax.top_k(-c, k)[0])
  return out


def sortk(cs):
  out = []
  for c in cs:
    k = _interpolation_table(c.shape[-1], q)[3]
    out.append(jnp.sort(c, axis=-1)[:, :k])
  return out


bench("top_k on cols", topk, cols)
bench("sort on cols", sortk, cols)
bench("column_thresholds on cols", lambda cs: [column_thresholds(c, q) for c in cs], cols)


def scatter(ks, ds, cs):
  out = []
  for k, d, c in zip(ks, ds, cs):
    n = k.shape[-1]
    idx = jnp.nonzero(d, size=c.shape[0], fill_value=n)[0]
    out.append(jnp.full((n,), jnp.nan).at[idx].set(c[:, 0], mode="drop"))
  return out


bench("scatter thr", scatter, ks, ds, cols)
thr = [jnp.zeros(k.shape[-1]) for k in ks]


def finish(ks, ms, ts):
  out = []
  for k, m, t in zip(ks, ms, ts):
    e = jnp.where(m, k, 0.)
    nm = m & ~(e < t)
    out.append((jnp.where(nm, k, 0.), nm))
  return out


bench("final compare + where (all kernels)", finish, ks, ms, thr)
from synstrip_jax.stripping import strip_kernel
bench("strip_kernel x14", lambda ks, ds, ms: [strip_kernel(k, d, m, stripping_factor=q) for k, d, m in zip(ks, ds, ms)], ks, ds, ms)
