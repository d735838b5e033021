"""Benchmark: jitted ``strip_params`` against the original's per-neuron loop.

Builds the original ViT's stripped kernels (7 blocks, fc1 ``[384, 1536]`` and
fc2 ``[1536, 384]`` in Flax layout, 13,440 neurons), and for dead fractions
0, 10, 50 and 100 % times, side by side with interleaved repetitions:

* ``jax``: ``strip_params`` called eagerly (one compiled program per
  distinct kernel shape, compiled at the first event);
* ``jit``: ``jax.jit(strip_params, static_argnames="stripping_factor")`` (the
  traced path: same-shape kernels stacked under one ``lax.map``);
* ``numpy``: the original's algorithm as a numpy loop over the dead neurons
  (``v = row[row != 0]``, ``t = np.quantile(v, q)``, prune ``row < t``), on
  the weights in PyTorch's ``[out, in]`` layout (rows contiguous, its most
  favourable layout), the reference baseline;
* ``sort``: one jitted full ``jnp.sort`` along the fan-in of every kernel
  (what a naive vectorised quantile costs);
* ``pass``: one jitted compare-and-count pass ``sum(k < t[None, :])`` over
  every kernel (a lower bound: stripping must at least read every weight).

Cold start (``--cold``, the default; ``--no-cold`` skips it): in fresh
processes (one per measurement, so nothing is compiled yet), the first strip
event (trace + compile + run) on the default ViT kernels at 50 % dead, the
warm event, and a second event with a new ``stripping_factor``, for the
eager call, the eager call after ``compile_strip`` (the ahead-of-time
compile an application hides in its start-up, timed apart as
``aot_compile_s``), ``jax.jit(strip_params)``, and the application's call
(``jax.jit(partial(strip_event, stripping_factor=q), out_shardings=
replicated, donate_argnums=(0, 1))``, and ``strip_event`` called eagerly),
each beside the numpy loop timed in the same process; and the compile time
(first call minus warm call, and XLA's backend compile seconds) for the first
1, 3 and 14 kernels (eager, jit). ``--src DIR`` runs these processes on another checkout's
``synstrip_jax`` (e.g. the previous version, for before/after figures).

It checks that ``jax`` and ``numpy`` give the same masks (and counts
threshold mismatches: numpy's lerp rounds twice where PyTorch's and XLA's
fused multiply-add rounds once, so a threshold may differ by an ulp; the
exact reference is the test suite's oracle), that eager and jitted calls
agree bit for bit, counts
the XLA compilations over a run of strip events with changing dead sets,
prints a markdown table and appends one JSON line per row to ``--out``.

With the package installed (``pip install -e ".[test]"``)::

  python bench/bench_strip.py [--quick] [--no-cold] [--cold-reps N]
      [--cold-only] [--src DIR --label NAME] [--out bench/results/strip.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import functools
import statistics
import subprocess
import sys
import time

import numpy as np

import jax
import jax.numpy as jnp

from _common import append_jsonl, machine_info, make_parser
from synstrip_jax.stripping import compile_strip, strip_kernel, strip_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

D, HIDDEN, BLOCKS = 384, 1536, 7
FACTOR = 0.05
DEAD_PERCENTS = (0, 10, 50, 100)


# ----------------------------------------------------------------------------
# Inputs.

def make_params(seed: int = 0):
  """``{'block_i': {'fc1': {kernel, bias}, 'fc2': {kernel, bias}}}``, float32."""
  rng = np.random.default_rng(seed)
  params = {}
  for i in range(BLOCKS):
    params[f"block_{i}"] = {
        "fc1": {"kernel": rng.standard_normal((D, HIDDEN), np.float32),
                "bias": np.zeros((HIDDEN,), np.float32)},
        "fc2": {"kernel": rng.standard_normal((HIDDEN, D), np.float32),
                "bias": np.zeros((D,), np.float32)},
    }
  return params


def make_dead(params, percent: float, seed: int):
  """Random dead neurons, ``round(percent% * n)`` per kernel."""
  rng = np.random.default_rng(seed)
  dead = {}
  for b, layers in params.items():
    dead[b] = {}
    for name, leaf in layers.items():
      n = leaf["kernel"].shape[-1]
      vec = np.zeros((n,), bool)
      vec[rng.choice(n, size=int(round(percent / 100 * n)), replace=False)] = True
      dead[b][name] = {"kernel": vec, "bias": None}
  return dead


def make_masks(params):
  return {b: {name: {"kernel": np.ones(leaf["kernel"].shape, bool),
                     "bias": None}
              for name, leaf in layers.items()}
          for b, layers in params.items()}


def kernel_list(tree):
  return [tree[b][name]["kernel"] for b in sorted(tree)
          for name in ("fc1", "fc2") if name in tree[b]]


# ----------------------------------------------------------------------------
# The numpy baseline: the original's loop over dead neurons.

def numpy_strip(weights_oi, masks_oi, deads, q: float):
  """Per-neuron loop over ``[out, in]`` weights (rows = neurons).

  Returns the new weights, masks and thresholds (NaN for rows not stripped).
  """
  out_w, out_m, out_t = [], [], []
  for w, mask, dead in zip(weights_oi, masks_oi, deads):
    eff = w * mask
    new_mask = mask.copy()
    thr = np.full((w.shape[0],), np.nan, np.float32)
    for j in np.flatnonzero(dead):
      row = eff[j]
      v = row[row != 0]
      if v.size == 0:  # the original raises; synstrip_jax leaves it alone
        continue
      t = np.quantile(v, q)
      thr[j] = t
      new_mask[j] &= ~(row < t)
    out_w.append(w * new_mask)
    out_m.append(new_mask)
    out_t.append(thr)
  return out_w, out_m, out_t


# ----------------------------------------------------------------------------
# Context: full sort and one compare-and-count pass.

@jax.jit
def full_sort(kernels):
  return [jnp.sort(k, axis=0) for k in kernels]


@jax.jit
def one_pass(kernels, thresholds):
  return sum(jnp.sum(k < t[None, :]) for k, t in zip(kernels, thresholds))


# ----------------------------------------------------------------------------

class CompileCounter:
  """Counts XLA backend compilations per function name (jax.monitoring)."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.by_name = {}
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def close(self):
    jax.monitoring.unregister_event_duration_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if event == self.EVENT:
      name = kwargs.get("fun_name", "?")
      self.by_name[name] = self.by_name.get(name, 0) + 1

  def count(self, name="jit(strip_params)"):
    return self.by_name.get(name, 0)

  def total(self):
    return sum(self.by_name.values())


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) * 1e3, out


# ----------------------------------------------------------------------------
# Cold start: each measurement in a fresh process.

COLD_MODES = ("eager", "eager_aot", "jit", "event_jit", "event_eager")
COMPILE_MODES = ("eager", "jit")
COMPILE_KERNEL_COUNTS = (1, 3, 14)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def _first_kernels(tree, count):
  """The first ``count`` kernels (fc1, fc2, fc1, ...), as a params-like tree."""
  keys = [(b, name) for b in sorted(tree) for name in ("fc1", "fc2")][:count]
  out = {}
  for b, name in keys:
    out.setdefault(b, {})[name] = tree[b][name]
  return out


def cold_child(mode: str, kernels: int, seed: int) -> dict:
  """One fresh-process measurement (see ``run_cold``); returns a JSON row."""
  durations = {e: 0.0 for e in COMPILE_EVENTS}
  compiles = [0]

  def listen(event, duration, **kwargs):
    if event in durations:
      durations[event] += duration
      if event == COMPILE_EVENTS[-1]:
        compiles[0] += 1
  jax.monitoring.register_event_duration_secs_listener(listen)

  q, q_new = FACTOR, 0.07
  params_np = _first_kernels(make_params(seed), kernels)
  deads_np = [_first_kernels(make_dead(make_params(seed), 50, seed + 1 + e),
                             kernels) for e in range(6)]
  params = jax.tree_util.tree_map(jnp.asarray, params_np)
  deads = [jax.tree_util.tree_map(jnp.asarray, d) for d in deads_np]

  # The numpy loop on the same kernels, same dead set (before and after).
  kernels_oi = [np.ascontiguousarray(k.T) for k in kernel_list(params_np)]
  masks_oi = [np.ones(k.shape, bool) for k in kernels_oi]
  loop = lambda: numpy_strip(kernels_oi, masks_oi, kernel_list(deads_np[0]), q)

  # XLA's one-time start-up (any first compile pays it): not the strip's.
  t0 = time.perf_counter()
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(3)))
  xla_startup_s = time.perf_counter() - t0
  for e in durations:
    durations[e] = 0.0
  compiles[0] = 0

  aot_s = 0.0
  if mode == "eager_aot":  # what an application's start-up compiles
    t0 = time.perf_counter()
    compile_strip(jax.eval_shape(lambda: params),
                  jax.tree_util.tree_map(lambda x: x.ndim == 2, params))
    aot_s = time.perf_counter() - t0
    for e in durations:
      durations[e] = 0.0
    compiles[0] = 0
  if mode in ("eager", "eager_aot", "jit"):
    fn = (jax.jit(strip_params, static_argnames="stripping_factor")
          if mode == "jit" else strip_params)
    state = {"p": params, "m": None}

    def event(dead, factor):
      # Masks None at every event (as the issue measured): the jitted call
      # would compile a second program for masks given. The eager call
      # makes the missing masks on the host and uses one program for both.
      state["p"], masks = fn(state["p"], dead, state["m"],
                             stripping_factor=factor)
      if mode != "jit":
        state["m"] = masks
      return masks
  else:
    import optax  # pylint: disable=import-outside-toplevel
    from synstrip_jax.transform import (  # pylint: disable=import-outside-toplevel
        strip_event, with_stripping)
    targets = jax.tree_util.tree_map(lambda x: x.ndim == 2, params)
    opt_state = with_stripping(optax.sgd(0.1), targets).init(params)
    jax.block_until_ready(opt_state)
    for e in durations:  # init compiled its own small programs
      durations[e] = 0.0
    compiles[0] = 0
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Replicated over the mesh, as the application's train state is.
    state = {"p": jax.device_put(params, repl),
             "s": jax.device_put(opt_state, repl)}
    deads = [jax.device_put(d, repl) for d in deads]
    if mode == "event_jit":
      jitted = {}

      def get(factor):  # as synstrip_vit/loop.py builds it (one per factor)
        if factor not in jitted:
          jitted[factor] = jax.jit(
              functools.partial(strip_event, stripping_factor=factor),
              out_shardings=repl, donate_argnums=(0, 1))
        return jitted[factor]
    else:
      get = lambda factor: functools.partial(strip_event,
                                             stripping_factor=factor)

    def event(dead, factor):
      state["p"], state["s"] = get(factor)(state["p"], state["s"], dead)
      return state["s"]

  t0 = time.perf_counter()
  jax.block_until_ready(event(deads[0], q))
  first_s = time.perf_counter() - t0
  first_compile = dict(durations)
  first_compiles = compiles[0]
  warm = []
  for e in range(1, 5):
    t0 = time.perf_counter()
    jax.block_until_ready(event(deads[e], q))
    warm.append(time.perf_counter() - t0)
  c0 = compiles[0]
  t0 = time.perf_counter()
  jax.block_until_ready(event(deads[5], q_new))
  new_factor_s = time.perf_counter() - t0
  new_factor_compiles = compiles[0] - c0
  loops = []
  for _ in range(3):
    t0 = time.perf_counter()
    loop()
    loops.append(time.perf_counter() - t0)
  jax.monitoring.unregister_event_duration_listener(listen)
  warm_s = statistics.median(warm)
  loop_s = statistics.median(loops)
  return {
      "bench": "strip_cold", "mode": mode, "kernels": kernels,
      "dead_percent": 50, "stripping_factor": q,
      "xla_startup_s": round(xla_startup_s, 4), "aot_compile_s": round(aot_s, 4),
      "first_event_s": round(first_s, 4), "warm_event_s": round(warm_s, 4),
      "warm_events_s": [round(x, 4) for x in warm],
      "compile_s": round(first_s - warm_s, 4),
      "trace_s": round(first_compile[COMPILE_EVENTS[0]], 4),
      "lower_s": round(first_compile[COMPILE_EVENTS[1]], 4),
      "backend_compile_s": round(first_compile[COMPILE_EVENTS[2]], 4),
      "first_event_compiles": first_compiles,
      "new_factor_s": round(new_factor_s, 4),
      "new_factor_compiles": new_factor_compiles,
      "numpy_loop_s": round(loop_s, 4),
      "numpy_loops_s": [round(x, 4) for x in loops],
      "first_event_over_loop": round(first_s / loop_s, 3),
  }


def run_cold(args) -> list[dict]:
  """Fresh-process measurements: every mode on 14 kernels, and the compile
  scaling of the eager and jitted calls on 1, 3 and 14 kernels."""
  env = dict(os.environ)
  src = os.path.abspath(args.src) if args.src else REPO
  # The cold-start processes may import another checkout's synstrip_jax.
  env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
  plan = [(m, 14) for m in COLD_MODES]
  plan += [(m, k) for m in COMPILE_MODES for k in COMPILE_KERNEL_COUNTS
           if k != 14]
  rows = []
  for rep in range(args.cold_reps):
    for mode, k in plan:
      cmd = [sys.executable, os.path.abspath(__file__), "--child", mode,
             "--child-kernels", str(k), "--seed", str(args.seed)]
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
      if proc.returncode != 0:
        raise RuntimeError(f"cold child {mode} x{k} failed:\n{proc.stderr[-3000:]}")
      row = json.loads(proc.stdout.strip().splitlines()[-1])
      row.update(rep=rep, load_avg_1m=round(os.getloadavg()[0], 2))
      rows.append(row)
      print(f"  cold {mode:11s} x{k:2d} kernels: first event "
            f"{row['first_event_s']:.3f} s (numpy loop {row['numpy_loop_s']:.3f}"
            f" s, ratio {row['first_event_over_loop']:.2f}), warm "
            f"{row['warm_event_s'] * 1e3:.1f} ms, compile "
            f"{row['compile_s']:.3f} s, new factor {row['new_factor_s']:.3f} s "
            f"({row['new_factor_compiles']} compiles); load "
            f"{row['load_avg_1m']}", flush=True)
  return rows


def print_cold(rows, info) -> None:
  """Markdown tables of the cold-start rows (median over repetitions)."""
  def med(mode, k, key):
    vals = [r[key] for r in rows if r["mode"] == mode and r["kernels"] == k]
    return statistics.median(vals) if vals else float("nan")
  print()
  print(f"Cold start on the default ViT kernels (50 % dead, factor {FACTOR}),"
        f" each in a fresh process, median of {max(r['rep'] for r in rows) + 1};"
        f" {info['cpu_count']} CPUs, jax {info['jax']}, load (1 min) "
        f"{statistics.median(r['load_avg_1m'] for r in rows):.1f}")
  print()
  print("| call | ahead-of-time compile s | first event s | numpy loop s "
        "| first / loop | warm event ms | new factor s (compiles) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for mode in COLD_MODES:
    print(f"| {mode} | {med(mode, 14, 'aot_compile_s'):.3f} "
          f"| {med(mode, 14, 'first_event_s'):.3f} "
          f"| {med(mode, 14, 'numpy_loop_s'):.3f} "
          f"| {med(mode, 14, 'first_event_over_loop'):.2f} "
          f"| {med(mode, 14, 'warm_event_s') * 1e3:.1f} "
          f"| {med(mode, 14, 'new_factor_s'):.3f} "
          f"({med(mode, 14, 'new_factor_compiles'):.0f}) |")
  print()
  print("| kernels | " + " | ".join(f"{m} compile s (backend)"
                                   for m in COMPILE_MODES) + " |")
  print("|---:|" + "---:|" * len(COMPILE_MODES))
  for k in COMPILE_KERNEL_COUNTS:
    print(f"| {k} | " + " | ".join(
        f"{med(m, k, 'compile_s'):.3f} ({med(m, k, 'backend_compile_s'):.3f})"
        for m in COMPILE_MODES) + " |")



def main(argv=None):
  parser = make_parser(
      __doc__, "strip.jsonl", quick="fewer repetitions (smoke test)",
      reps="timed repetitions per method (default 9, quick 3; the 1 s full "
      "sort gets a third of them)")
  parser.add_argument("--cold", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="measure the cold start in fresh processes")
  parser.add_argument("--cold-reps", type=int, default=None,
                      help="fresh processes per cold measurement (default 3, "
                           "quick 1)")
  parser.add_argument("--src", default=None,
                      help="checkout whose synstrip_jax the cold-start "
                           "processes import (default: this repository)")
  parser.add_argument("--cold-only", action="store_true",
                      help="only the cold-start measurements")
  parser.add_argument("--label", default="working tree",
                      help="recorded in the cold-start rows (e.g. the --src "
                           "commit)")
  parser.add_argument("--child", choices=COLD_MODES, help=argparse.SUPPRESS)
  parser.add_argument("--child-kernels", type=int, default=14,
                      help=argparse.SUPPRESS)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(cold_child(args.child, args.child_kernels, args.seed)))
    return None
  args.cold_reps = args.cold_reps or (1 if args.quick else 3)
  reps = args.reps or (3 if args.quick else 9)
  sort_every = 3  # the full sort takes ~1 s: time it every third repetition
  q = FACTOR

  info = machine_info()
  cold_rows = []
  if args.cold:
    print(f"cold start (fresh processes, synstrip_jax from "
          f"{args.src or REPO}):", flush=True)
    cold_rows = [dict(r, label=args.label, **info) for r in run_cold(args)]
  rows = []
  if not args.cold_only:
    counter = CompileCounter()
    try:
      rows = _run(args, reps, sort_every, q, counter, info)
    finally:
      counter.close()
  if cold_rows:
    print_cold(cold_rows, info)
  if args.out and cold_rows:
    n = append_jsonl(args.out, cold_rows)
    print(f"appended {n} cold-start rows to {args.out}")
  return rows


def _run(args, reps, sort_every, q, counter, info):
  params_np = make_params(args.seed)
  masks_np = make_masks(params_np)
  params = jax.tree_util.tree_map(jnp.asarray, params_np)
  masks = jax.tree_util.tree_map(jnp.asarray, masks_np)
  kernels = kernel_list(params)
  kernels_oi = [np.ascontiguousarray(k.T) for k in kernel_list(params_np)]
  masks_oi = [np.ascontiguousarray(m.T) for m in kernel_list(masks_np)]
  n_neurons = sum(k.shape[-1] for k in kernels)

  strip = jax.jit(strip_params, static_argnames="stripping_factor")
  run_jax = lambda dead: strip_params(params, dead, masks, stripping_factor=q)
  run_jit = lambda dead: strip(params, dead, masks, stripping_factor=q)

  # Warm-up / compile everything once (one program per kernel shape for the
  # eager call, one for the jitted call; neither depends on the dead set).
  dead0 = jax.tree_util.tree_map(jnp.asarray,
                                 make_dead(params_np, 50, args.seed + 1))
  c0 = counter.total()
  t0 = time.perf_counter()
  jax.block_until_ready(run_jax(dead0))
  compile_s = time.perf_counter() - t0
  compiles_first = counter.total() - c0
  jax.block_until_ready(run_jit(dead0))
  thr_ctx = [jnp.zeros((k.shape[-1],), jnp.float32) for k in kernels]
  jax.block_until_ready(full_sort(kernels))
  jax.block_until_ready(one_pass(kernels, thr_ctx))

  rows = []
  for pct in DEAD_PERCENTS:
    dead_np = make_dead(params_np, pct, args.seed + 100 + pct)
    dead = jax.tree_util.tree_map(jnp.asarray, dead_np)
    deads = kernel_list(dead_np)
    n_dead = int(sum(d.sum() for d in deads))

    # Warm-up this dead set (runs, caches) and check correctness.
    new_params, new_masks = run_jax(dead)
    jit_params, jit_masks = run_jit(dead)
    jax.block_until_ready((new_masks, jit_masks))
    jit_mismatch = sum(int((np.asarray(a) != np.asarray(b)).sum())
                       for a, b in zip(jax.tree_util.tree_leaves((new_params, new_masks)),
                                       jax.tree_util.tree_leaves((jit_params, jit_masks))))
    np_w, np_m, np_t = numpy_strip(kernels_oi, masks_oi, deads, q)
    jax_m = [np.asarray(m) for m in kernel_list(new_masks)]
    jax_w = [np.asarray(w) for w in kernel_list(new_params)]
    mask_mismatch = sum(int((a != b.T).sum()) for a, b in zip(jax_m, np_m))
    weight_mismatch = sum(int((a != b.T).sum()) for a, b in zip(jax_w, np_w))
    # Threshold-level comparison against numpy's (twice-rounded) quantile.
    thr_np_diff = 0
    for k, d, t_np in zip(kernels, deads, np_t):
      t_jax = np.asarray(strip_kernel(k, jnp.asarray(d), jnp.ones(k.shape, bool),
                                      stripping_factor=q)[2])
      thr_np_diff += int(np.sum(~((t_jax == t_np) |
                                  (np.isnan(t_jax) & np.isnan(t_np)))))

    times = {"jax": [], "jit": [], "numpy": [], "sort": [],
             "pass": []}
    thr_pass = [jnp.asarray(np.nan_to_num(t, nan=-np.inf)) for t in np_t]
    for rep in range(reps):
      times["jax"].append(timed(lambda: run_jax(dead))[0])
      times["jit"].append(timed(lambda: run_jit(dead))[0])
      times["numpy"].append(timed(
          lambda: numpy_strip(kernels_oi, masks_oi, deads, q))[0])
      if rep % sort_every == 0:
        times["sort"].append(timed(lambda: full_sort(kernels))[0])
      times["pass"].append(timed(lambda: one_pass(kernels, thr_pass))[0])

    med = {k: statistics.median(v) for k, v in times.items()}
    mn = {k: min(v) for k, v in times.items()}
    row = {
        "bench": "strip", "dead_percent": pct, "n_dead": n_dead,
        "n_neurons": n_neurons, "stripping_factor": q, "reps": reps,
        "quick": args.quick, "jax_call": "eager strip_params (compiled)",
        **{f"{k}_ms": [round(x, 3) for x in v] for k, v in times.items()},
        **{f"{k}_ms_median": round(v, 3) for k, v in med.items()},
        **{f"{k}_ms_min": round(v, 3) for k, v in mn.items()},
        "speedup_median": round(med["numpy"] / med["jax"], 2),
        "speedup_min": round(mn["numpy"] / mn["jax"], 2),
        "jit_speedup_median": round(med["numpy"] / med["jit"], 2),
        "mask_mismatches": mask_mismatch, "weight_mismatches": weight_mismatch,
        "eager_vs_jit_mismatches": jit_mismatch,
        "threshold_mismatches_vs_numpy": thr_np_diff,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **info,
    }
    rows.append(row)
    print(f"  {pct:3d}% dead: eager {med['jax']:.2f} ms, jit {med['jit']:.2f} ms,"
          f" numpy {med['numpy']:.2f} ms, masks differ at {mask_mismatch} "
          f"entries", flush=True)

  # Compile count over a run of strip events with changing dead sets and
  # factors (eager) or dead sets (jit, static factor), feeding each event's
  # output into the next, as training does.
  events = 4 if args.quick else 12
  rng = np.random.default_rng(args.seed + 7)
  dead_seq, factors = [], []
  for e in range(events):
    pct = float(rng.uniform(0, 100)) if e % 3 else float(rng.choice([0, 100]))
    dead_seq.append(jax.tree_util.tree_map(
        jnp.asarray, make_dead(params_np, pct, args.seed + 1000 + e)))
    factors.append(float(rng.choice([0.0, 0.01, 0.05, 0.2, 0.5, 1.0])))
  c0 = counter.total()
  p, m = params, masks
  for d, f in zip(dead_seq, factors):
    p, m = strip_params(p, d, m, stripping_factor=f)
  jax.block_until_ready(m)
  compiles_run = counter.total() - c0
  c0 = counter.total()
  p, m = params, masks
  for d in dead_seq:
    p, m = strip(p, d, m, stripping_factor=q)
  jax.block_until_ready(m)
  compiles_run_jit = counter.total() - c0

  print()
  print(f"strip_params on the default ViT kernels ({BLOCKS} blocks x "
        f"[{D},{HIDDEN}] + [{HIDDEN},{D}], {n_neurons} neurons), factor {q}, "
        f"{reps} interleaved reps (sort: {len(rows[0]['sort_ms'])}), median (min)"
        f" ms; {info['platform']}, "
        f"{info['cpu_count']} CPUs, jax {info['jax']}, load (1 min) "
        f"{statistics.median(r['load_avg_1m'] for r in rows):.1f}")
  print()
  print("| dead % | # dead | eager strip_params ms "
        "| jit(strip_params) ms | numpy loop ms | speed-up (numpy/eager) median "
        "(min) | full sort ms | one pass ms | mask mismatches |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    f = lambda k: f"{r[k + '_ms_median']:.2f} ({r[k + '_ms_min']:.2f})"
    print(f"| {r['dead_percent']} | {r['n_dead']} | {f('jax')} "
          f"| {f('jit')} "
          f"| {f('numpy')} "
          f"| {r['speedup_median']:.2f}x ({r['speedup_min']:.2f}x) "
          f"| {f('sort')} | {f('pass')} "
          f"| {r['mask_mismatches']} |")
  print()
  print(f"threshold mismatches jax vs np.quantile per row: "
        f"{[r['threshold_mismatches_vs_numpy'] for r in rows]};"
        f" eager vs jit: {[r['eager_vs_jit_mismatches'] for r in rows]}")
  print(f"XLA compilations: first eager strip_params {compiles_first} "
        f"({compile_s:.2f} s incl. the run, in a process that had compiled "
        f"other things); over {events} further strip events with changing "
        f"dead sets and factors {compiles_run} (eager), with changing dead "
        f"sets {compiles_run_jit} (jit, static factor)")

  if args.out:
    n = append_jsonl(args.out, (
        dict(r, compiles_first_call=compiles_first,
             compiles_over_events=compiles_run,
             compiles_over_events_jit=compiles_run_jit,
             strip_events=events, factors_over_events=factors) for r in rows))
    print(f"appended {n} rows to {args.out}")

  by_pct = {r["dead_percent"]: r for r in rows}
  for pct, target in ((50, 4.0), (10, 1.0)):
    r = by_pct[pct]
    ok = r["speedup_median"] >= target
    print(f"target at {pct}% dead: >= {target:g}x faster than the numpy loop: "
          f"{r['speedup_median']:.2f}x {'met' if ok else 'MISSED'}")
  mism = sum(r["mask_mismatches"] + r["weight_mismatches"] for r in rows)
  if mism:
    print(f"WARNING: jax and numpy masks/weights differ at {mism} entries "
          "(numpy's quantile rounds its lerp twice; see threshold mismatches)")
  assert sum(r["eager_vs_jit_mismatches"] for r in rows) == 0
  assert compiles_run == 0, f"{compiles_run} recompilations (eager)"
  assert compiles_run_jit == 0, f"{compiles_run_jit} recompilations (jit)"
  return rows


if __name__ == "__main__":
  main()
