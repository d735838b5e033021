"""Train/eval step throughput of ``synstrip_vit.steps``, stripping on vs off.

Usage, with the package installed (``pip install -e ".[test]"``)::

    python bench/bench_train.py [--quick] [--reps N]
        [--models small,default] [--out bench/results/train.jsonl]

For each ViT ('small': depth 4, hidden 128, 4 heads, MLP 512; 'default': the
original's depth 7, hidden 384, 8 heads, MLP 1536; both patch 4 on 32x32x3
images, 10 classes) it times, in one process, with interleaved repetitions
after a warm-up, every call closed by ``block_until_ready``:

* ``jit_train_step`` (the path ``experiments/train_vit.py`` runs: sharded
  jit over the mesh of every device, donated state, random crop + flip +
  normalisation inside the step) at ``--batch`` (128), with stripping **off**
  (``make_optimizer(strip=False)``: no mask) and **on** (masks on every
  ``fc1``/``fc2`` kernel with ~5 % of the entries False and those weights at
  0, as after a few strip events);
* ``jit_eval_step`` plain vs with the activation statistics (``probe``);
* the optimizer update alone (``tx.update`` + ``apply_updates``), strip on
  vs off: the only code stripping adds to a step, so its extra time over a
  whole train step is a low-noise estimate of the stripping overhead;
* one jitted ``strip_event`` with ~30 % dead neurons per stripped kernel,
  against one epoch of training (``50,000 // batch`` steps of the measured
  strip-on step time).

It also counts, in the optimised HLO of each compiled step, the ``is-finite``
ops over activation-shaped arrays (the per-example statistics that ActDense
computes): 0 in the train step and plain eval shows XLA dropped that work.

Prints a markdown table (medians; overhead = median(on) / median(off) - 1)
with the original PyTorch figures for reference, and appends one JSON line
per row with machine info to ``--out`` (``''`` for none). ``--quick``: small
model only, fewer repetitions (< 2 min on a 2-core CPU).
"""

from __future__ import annotations

import functools
import os
import re
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import append_jsonl, machine_info, make_parser
from synstrip_jax.transform import get_masks, set_masks, strip_event
from synstrip_vit import steps
from synstrip_vit.augment import random_crop_flip
from synstrip_vit.input_pipeline import normalize
from synstrip_vit.models.vit import ViT

MODELS = {
    "small": dict(depth=4, hidden_size=128, num_heads=4, mlp_dim=512),
    "default": dict(depth=7, hidden_size=384, num_heads=8, mlp_dim=1536),
}
#: The original (PyTorch) training throughput on a 2-core CPU at batch 128.
TORCH_IMAGES_PER_S = {"small": 415.0, "default": 37.0}
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
EPOCH_IMAGES = 50_000
STRIPPED_FRACTION = 0.05
DEAD_FRACTION = 0.30
CIFAR_MEAN = np.array([125.3, 123.0, 113.9], np.float32)
CIFAR_STD = np.array([63.0, 62.1, 66.7], np.float32)


def preprocess(images):
  """CIFAR-normalised float32 images."""
  return normalize(images, CIFAR_MEAN, CIFAR_STD)


def augment(key, images):
  """Random crop + flip, then :func:`preprocess`."""
  return preprocess(random_crop_flip(key, images))


def stat_isfinite_ops(compiled_text: str, widths: set[int]) -> int:
  """``is-finite`` ops whose result's last dim is a layer width."""
  n = 0
  for m in re.finditer(r"= pred\[([0-9,]*)\][^=]*? is-finite\(", compiled_text):
    dims = [int(d) for d in m.group(1).split(",") if d]
    n += bool(dims) and dims[-1] in widths and len(dims) >= 2
  return n


def cost(compiled) -> dict:
  """XLA's static cost estimate of a compiled step (noise-free)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return {"hlo_gflops": c.get("flops", float("nan")) / 1e9,
          "hlo_gbytes": c.get("bytes accessed", float("nan")) / 1e9}


def paired_overhead_pct(on: list[float], off: list[float]) -> float:
  """Median over repetitions of ``on / off - 1`` (each pair timed back to
  back, so a change of load between repetitions cancels), in %."""
  return 100 * (statistics.median(a / b for a, b in zip(on, off)) - 1)


def time_calls(fn, n: int) -> float:
  """Seconds per call of ``fn`` over ``n`` calls (ended by a sync)."""
  t0 = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def interleaved(arms: dict, reps: int, calls: int) -> dict[str, list[float]]:
  """``{name: [seconds per call] * reps}``, arms alternating order per rep."""
  names = list(arms)
  times = {k: [] for k in names}
  for r in range(reps):
    for k in (names if r % 2 == 0 else names[::-1]):
      times[k].append(time_calls(arms[k], calls))
  return times


def stripped_state(state, targets, seed: int):
  """``state`` with ~5 % of every target kernel masked and zeroed."""
  rng = np.random.default_rng(seed)
  masks = get_masks(state.opt_state)
  flat_p, treedef = jax.tree_util.tree_flatten(state.params)
  flat_t = treedef.flatten_up_to(targets)
  flat_m = treedef.flatten_up_to(masks)
  new_p, new_m = [], []
  for p, t, m in zip(flat_p, flat_t, flat_m):
    if t:
      keep = rng.random(p.shape) >= STRIPPED_FRACTION
      new_p.append(jnp.where(keep, p, 0.0))
      new_m.append(jnp.asarray(keep))
    else:
      new_p.append(p)
      new_m.append(m)
  params = jax.tree_util.tree_unflatten(treedef, new_p)
  masks = jax.tree_util.tree_unflatten(treedef, new_m)
  return state.replace(params=params,
                       opt_state=set_masks(state.opt_state, masks))


def dead_tree(params, targets, seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p, t: (jnp.asarray(rng.random(p.shape[-1]) < DEAD_FRACTION)
                    if t else None), params, targets)


def bench_model(name: str, args, mesh, log) -> list[dict]:
  cfg = MODELS[name]
  model = ViT(num_classes=NUM_CLASSES, patch_size=4, **cfg)
  widths = {cfg["hidden_size"], cfg["mlp_dim"]}
  batch = args.batch
  schedule = steps.make_schedule(learning_rate=1e-3, min_learning_rate=1e-5,
                                    warmup_steps=100, total_steps=10_000)
  seen = {}

  def factory(strip):
    def make(targets):
      seen["targets"] = targets
      return steps.make_optimizer(schedule, weight_decay=0.05,
                                     targets=targets, strip=strip)
    return make

  states, step_fns, hlo, updates, costs = {}, {}, {}, {}, {}
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)
  valid = np.ones((batch,), bool)
  gx, gy, gv = steps.global_batch((images, labels, valid), mesh)
  for arm, strip in (("strip_off", False), ("strip_on", True)):
    state, tx = steps.create_train_state(model, factory(strip), IMAGE_SHAPE,
                                            seed=0)
    if strip:
      state = stripped_state(state, seen["targets"], seed=1)
    states[arm] = steps.replicate(
        jax.tree.map(lambda a: jnp.array(a, copy=True), state), mesh)
    step_fns[arm] = steps.jit_train_step(model, tx, augment, mesh)
    # The optimizer update alone (the only code stripping changes), on
    # gradient-like values: a low-noise measure of the stripping overhead.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
    updates[arm] = functools.partial(
        lambda f, s, g: f(s.params, s.opt_state, g),
        jax.jit(lambda p, o, g, tx=tx: optax.apply_updates(
            p, tx.update(g, o, p)[0])),
        jax.tree.map(lambda a: jnp.array(a, copy=True), state), grads)
    t0 = time.perf_counter()
    compiled = step_fns[arm].lower(states[arm], gx, gy).compile()
    log(f"  {name} {arm}: compiled in {time.perf_counter() - t0:.1f} s")
    hlo[arm] = stat_isfinite_ops(compiled.as_text(), widths)
    costs[arm] = cost(compiled)
  targets = seen["targets"]

  def train_arm(arm):
    def call():
      states[arm], metrics = step_fns[arm](states[arm], gx, gy)
      return metrics
    return call

  train_arms = {arm: train_arm(arm) for arm in ("strip_off", "strip_on")}
  for arm in train_arms:  # warm-up
    time_calls(train_arms[arm], 2)

  evals = {}
  for arm, flag in (("eval", False), ("eval_probe", True)):
    fn = steps.jit_eval_step(model, preprocess, mesh, collect_stats=flag)
    compiled = fn.lower(states["strip_on"].params, gx, gy, gv).compile()
    hlo[arm] = stat_isfinite_ops(compiled.as_text(), widths)
    costs[arm] = cost(compiled)
    evals[arm] = functools.partial(
        lambda f: f(states["strip_on"].params, gx, gy, gv), fn)
    time_calls(evals[arm], 2)

  strip_fn = jax.jit(strip_event, static_argnames="stripping_factor")
  dead = dead_tree(states["strip_on"].params, targets, seed=2)
  strip_call = functools.partial(
      lambda: strip_fn(states["strip_on"].params, states["strip_on"].opt_state,
                       dead, stripping_factor=0.05))
  time_calls(strip_call, 2)

  for arm in updates:
    time_calls(updates[arm], 2)

  reps = args.reps_by_model[name]
  log(f"  {name}: timing ({reps} reps)")
  t_update = interleaved(updates, reps, 5)
  t_update = {f"update_{k}": v for k, v in t_update.items()}
  t_train = interleaved(train_arms, reps, args.calls[name])
  t_eval = interleaved(evals, reps, args.calls[name])
  t_strip = interleaved({"strip_event": strip_call}, reps, 1)

  timings = (t_train, t_eval, t_strip, t_update)
  med = {k: statistics.median(v) for d in timings for k, v in d.items()}
  mins = {k: min(v) for d in timings for k, v in d.items()}
  epoch_steps = EPOCH_IMAGES // batch
  epoch_s = epoch_steps * med["strip_on"]
  common = dict(model=name, batch=batch, reps=reps,
                calls_per_rep=args.calls[name], **cfg)
  rows = []
  for arm in ("strip_off", "strip_on"):
    rows.append(dict(
        common, row=f"train_{arm}", step_s_median=med[arm],
        step_s_min=mins[arm], step_s_all=t_train[arm],
        images_per_s=batch / med[arm],
        overhead_pct=(100 * (med[arm] / med["strip_off"] - 1)),
        paired_overhead_pct=paired_overhead_pct(t_train[arm],
                                                t_train["strip_off"]),
        torch_images_per_s=TORCH_IMAGES_PER_S[name],
        stat_isfinite_ops_in_hlo=hlo[arm], **costs[arm]))
  for arm in ("update_strip_off", "update_strip_on"):
    rows.append(dict(
        common, row=arm, step_s_median=med[arm], step_s_min=mins[arm],
        step_s_all=t_update[arm],
        # Extra time of the stripped update, relative to a whole train step.
        overhead_pct=100 * (med[arm] - med["update_strip_off"])
        / med["strip_off"]))
  for arm in ("eval", "eval_probe"):
    rows.append(dict(
        common, row=arm, step_s_median=med[arm], step_s_min=mins[arm],
        step_s_all=t_eval[arm], images_per_s=batch / med[arm],
        overhead_pct=100 * (med[arm] / med["eval"] - 1),
        paired_overhead_pct=paired_overhead_pct(t_eval[arm], t_eval["eval"]),
        stat_isfinite_ops_in_hlo=hlo[arm], **costs[arm]))
  rows.append(dict(
      common, row="strip_event", step_s_median=med["strip_event"],
      step_s_min=mins["strip_event"], step_s_all=t_strip["strip_event"],
      dead_fraction=DEAD_FRACTION, epoch_steps=epoch_steps, epoch_s=epoch_s,
      pct_of_epoch=100 * med["strip_event"] / epoch_s))
  return rows


def markdown(rows: list[dict]) -> str:
  out = ["| model | measure | median ms | images/s | vs baseline: ratio of "
         "medians; median of paired ratios | HLO GFLOP / GB | "
         "PyTorch 2-core images/s |",
         "|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    ms = 1e3 * r["step_s_median"]
    if r["row"].startswith("update"):
      base = ("(baseline)" if r["row"] == "update_strip_off" else
              f"{r['overhead_pct']:+.2f} % of a train step")
      out.append(f"| {r['model']} | {r['row']} (optimizer only) | {ms:.2f} | "
                 f"| {base} | | |")
    elif r["row"].startswith("train") or r["row"].startswith("eval"):
      base = {"train_strip_off": "(baseline)", "eval": "(baseline)"}.get(
          r["row"], f"{r['overhead_pct']:+.1f} %; "
          f"{r['paired_overhead_pct']:+.1f} %")
      torch = (f"{r['torch_images_per_s']:.0f}" if "torch_images_per_s" in r
               else "")
      out.append(f"| {r['model']} | {r['row']} | {ms:.1f} | "
                 f"{r['images_per_s']:.0f} | {base} | "
                 f"{r['hlo_gflops']:.2f} / {r['hlo_gbytes']:.2f} | {torch} |")
    else:
      out.append(f"| {r['model']} | strip_event ({100 * r['dead_fraction']:.0f}"
                 f" % dead) | {ms:.1f} | | {r['pct_of_epoch']:.3f} % of an "
                 f"epoch ({r['epoch_steps']} steps, {r['epoch_s']:.0f} s) | "
                 "| |")
  return "\n".join(out)


def main(argv=None) -> int:
  parser = make_parser(
      __doc__, "train.jsonl", quick="small model only, fewer repetitions",
      reps="interleaved repetitions (default: 15 small, 7 default; quick: 5, "
      "3)")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset of " + ",".join(MODELS))
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args(argv)
  models = (args.models.split(",") if args.models
            else ["small"] if args.quick else list(MODELS))
  # Repetitions (each a back-to-back pair of arms) and calls per repetition:
  # short pairs so that the load of a shared machine changes little within
  # one; a call lasts 0.3 s (small) to several s (default) on a 2-core CPU.
  args.reps_by_model = {
      "small": args.reps or (5 if args.quick else 15),
      "default": args.reps or (3 if args.quick else 7)}
  args.calls = {"small": 2, "default": 1}

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  mesh = steps.make_mesh()
  steps.check_batch_size(args.batch, mesh)
  info = dict(machine_info(), flax=flax.__version__, optax=optax.__version__)
  load_start = os.getloadavg()
  log(f"bench_train: {info['backend']} ({info['device_kind']}), "
      f"{info['cpu_count']} CPUs, jax {info['jax']}, load {load_start}, "
      f"XLA_FLAGS={info['xla_flags']!r}")
  t0 = time.perf_counter()
  rows = []
  for name in models:
    rows += bench_model(name, args, mesh, log)
  wall = time.perf_counter() - t0
  load_end = os.getloadavg()

  print(markdown(rows))
  print(f"\nOriginal PyTorch, 2-core CPU, batch 128, training: "
        f"~{TORCH_IMAGES_PER_S['small']:.0f} images/s (small), "
        f"~{TORCH_IMAGES_PER_S['default']:.0f} images/s (default).")
  print(f"Load average at start {load_start}, end {load_end}; {wall:.0f} s; "
        f"XLA_FLAGS={info['xla_flags']!r}.")
  for r in rows:
    if r["row"] == "train_strip_on":
      ok = r["paired_overhead_pct"] <= 3
      print(f"{r['model']}: stripping overhead {r['paired_overhead_pct']:+.1f}"
            f" % paired ({r['overhead_pct']:+.1f} % of medians) "
            f"(target <= 3 %: {'met' if ok else 'NOT met'})")
    if r["row"] == "update_strip_on":
      print(f"{r['model']}: stripped optimizer update costs "
            f"{r['overhead_pct']:+.2f} % of a train step (isolated)")
    if r["row"] == "eval_probe":
      ok = r["paired_overhead_pct"] <= 5
      print(f"{r['model']}: probe overhead {r['paired_overhead_pct']:+.1f} % "
            f"paired ({r['overhead_pct']:+.1f} % of medians) "
            f"(target <= 5 %: {'met' if ok else 'NOT met'})")
    if r.get("stat_isfinite_ops_in_hlo") and r["row"] != "eval_probe":
      print(f"WARNING {r['model']} {r['row']}: "
            f"{r['stat_isfinite_ops_in_hlo']} activation-statistics ops "
            "survived in the compiled step")

  if args.out:
    n = append_jsonl(args.out, (
        dict(bench="train", time=info["date"], quick=args.quick,
             load_start=load_start, load_end=load_end, **info, **r)
        for r in rows))
    log(f"appended {n} rows to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
