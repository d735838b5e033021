"""CPU train-step throughput of this project's ViT against PyTorch, side by side.

Usage (from the repository root)::

    PYTHONPATH=. python bench/bench_torch.py [--torch-python PYTHON]
        [--model small|default] [--threads 2] [--reps 8] [--calls 3]
        [--arms jax,jax_ynn_off] [--no-augment] [--out bench/results/torch.jsonl]

Arms, timed alternately in ONE run (torch, jax, ..., then the reverse order
on the next repetition), each repetition ``--calls`` steps after a warm-up,
every JAX call closed by ``block_until_ready``:

* ``torch``: the PyTorch restatement of the original ViT in
  ``bench/torch_vit.py`` (AdamW, cross-entropy), run by a worker subprocess
  under ``--torch-python`` (default: this interpreter), with
  ``torch.set_num_threads(--threads)``. PyTorch is a bench-only dependency:
  when ``import torch`` fails under that interpreter the arm is skipped with
  a message and the JAX arms still run.
* ``jax``: ``synstrip_vit.steps.jit_train_step``, the step
  ``experiments/train_vit.py`` runs (sharded jit over every device, donated
  state, AdamW inside ``with_stripping`` with a keep-mask on every
  ``fc1``/``fc2`` kernel, ~5 % of it False, as after a few strip events),
  compiled with the XLA flags of this process (``XLA_FLAGS``; the training
  script's default flags are not applied here: see ``jax_ynn_off``).
* ``jax_ynn_off``: the same step compiled with
  ``xla_cpu_experimental_ynn_fusion_type=''`` (no YNNPACK fusions: what
  ``experiments/train_vit.py`` sets by default) as a per-compile option, so
  one process compares it with ``jax``;
* ``jax_ynn_dot``: YNNPACK for dots only (``LIBRARY_FUSION_TYPE_DOT``);
* ``jax_sdpa``: ``jax_ynn_off`` with the ViT's attention computed by
  ``jax.nn.dot_product_attention`` (``attention='jax'``) instead of Flax's.

Same work on both sides: batch ``--batch`` (128) of uint8 32x32x3 images,
random crop (zero padding 4) + horizontal flip + normalisation inside the
timed step (``--no-augment``: normalisation only on both sides), forward,
cross-entropy, backward, AdamW update. Dropout is 0 as in the original.
JAX's XLA:CPU uses every core of the machine (``os.cpu_count()``); pass
``--threads`` equal to it for a fair comparison (the default, 2, is the
core count of the reference machine).

Prints a table (median images/s per arm, ratio of medians to torch and the
median of the paired per-repetition ratios), the load average at start and
end, and appends one JSON line per arm to ``--out`` (``''`` for none).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

MODELS = {
    "small": dict(depth=4, hidden_size=128, num_heads=4, mlp_dim=512),
    "default": dict(depth=7, hidden_size=384, num_heads=8, mlp_dim=1536),
}
_YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
JAX_ARMS = {
    # name: (compiler options of the compiled step (None: the process's
    # flags), extra ViT fields)
    "jax": (None, {}),
    "jax_ynn_off": (_YNN_OFF, {}),
    "jax_ynn_dot": ({"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_DOT"}, {}),
    "jax_sdpa": (_YNN_OFF, {"attention": "jax"}),
}


class TorchWorker:
  """``bench/torch_vit.py`` in a subprocess, driven line by line."""

  def __init__(self, python: str, init: dict, threads: int):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)
    self.proc = subprocess.Popen(
        [python, str(HERE / "torch_vit.py")], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    self.info = self.ask(dict(init, cmd="init"))

  def ask(self, msg: dict) -> dict:
    try:
      self.proc.stdin.write(json.dumps(msg) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass
    line = self.proc.stdout.readline()
    if not line:
      err = self.proc.stderr.read().strip().splitlines()
      raise RuntimeError(err[-1] if err else "torch worker exited")
    reply = json.loads(line)
    if not reply.get("ok"):
      raise RuntimeError(reply.get("error"))
    return reply

  def close(self):
    try:
      self.ask({"cmd": "quit"})
    except (RuntimeError, ValueError):
      pass
    self.proc.wait(timeout=30)


def make_jax_arm(name, cfg, args, mesh, log):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import bench_train as bt
  from synstrip_vit import steps
  from synstrip_vit.models.vit import ViT

  opts, fields = JAX_ARMS[name]
  model = ViT(num_classes=10, patch_size=4, **cfg, **fields)
  schedule = steps.make_schedule(learning_rate=1e-3, min_learning_rate=1e-5,
                                 warmup_steps=100, total_steps=10_000)
  seen = {}

  def factory(targets):
    seen["targets"] = targets
    return steps.make_optimizer(schedule, weight_decay=5e-5, targets=targets,
                                strip=True)

  state, tx = steps.create_train_state(model, factory, (32, 32, 3), seed=0)
  state = bt.stripped_state(state, seen["targets"], seed=1)
  state = steps.replicate(state, mesh)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (args.batch,)).astype(np.int32)
  gx, gy = steps.global_batch((images, labels), mesh)
  augment = bt.augment if args.augment else (lambda key, x: bt.preprocess(x))
  fn = steps.jit_train_step(model, tx, augment, mesh)
  t0 = time.perf_counter()
  compiled = (fn.lower(state, gx, gy).compile(compiler_options=opts)
              if opts else fn.lower(state, gx, gy).compile())
  log(f"  {name}: compiled in {time.perf_counter() - t0:.1f} s")
  box = [state]

  def step(calls):
    t0 = time.perf_counter()
    metrics = None
    for _ in range(calls):
      box[0], metrics = compiled(box[0], gx, gy)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / calls

  return step, bt.cost(compiled)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch-python", default=sys.executable,
                      help="interpreter with torch for the torch arm")
  parser.add_argument("--model", default="small", choices=sorted(MODELS))
  parser.add_argument("--threads", type=int, default=2,
                      help="torch.set_num_threads (JAX uses every core)")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--reps", type=int, default=8)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--arms", default="jax",
                      help="comma-separated JAX arms: " + ",".join(JAX_ARMS))
  parser.add_argument("--no-augment", dest="augment", action="store_false",
                      help="no crop/flip on either side (normalise only)")
  parser.add_argument("--out", default="bench/results/torch.jsonl")
  args = parser.parse_args(argv)

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  cfg = MODELS[args.model]
  load_start = os.getloadavg()
  log(f"bench_torch: {args.model} ViT, batch {args.batch}, "
      f"augment={args.augment}, load {load_start}")
  timers, infos = {}, {}
  try:
    worker = TorchWorker(args.torch_python, dict(
        depth=cfg["depth"], hidden=cfg["hidden_size"],
        heads=cfg["num_heads"], mlp=cfg["mlp_dim"], batch=args.batch,
        threads=args.threads, augment=args.augment), args.threads)
    infos["torch"] = worker.info
    timers["torch"] = lambda calls: worker.ask(
        {"cmd": "time", "calls": calls})["s_per_call"]
    log(f"  torch {worker.info['torch']} under {args.torch_python}, "
        f"{worker.info['threads']} threads, {worker.info['params']} params")
  except (RuntimeError, OSError, ValueError) as e:
    worker = None
    log(f"SKIPPED the torch arm: no usable torch under {args.torch_python} "
        f"({e}); pass --torch-python /path/to/python-with-torch")

  import jax
  from synstrip_vit import steps
  import bench_train as bt
  mesh = steps.make_mesh()
  info = bt.machine_info()
  costs = {}
  for name in args.arms.split(","):
    timers[name], costs[name] = make_jax_arm(name, cfg, args, mesh, log)
  for name, fn in timers.items():  # warm-up
    fn(args.warmup)

  names = list(timers)
  times = {k: [] for k in names}
  t0 = time.perf_counter()
  for r in range(args.reps):
    for k in (names if r % 2 == 0 else names[::-1]):
      times[k].append(timers[k](args.calls))
    log(f"  rep {r}: " + ", ".join(
        f"{k} {args.batch / times[k][-1]:.0f}" for k in names) + " img/s")
  wall = time.perf_counter() - t0
  load_end = os.getloadavg()
  if worker:
    worker.close()

  rows = []
  for k in names:
    med = statistics.median(times[k])
    row = dict(arm=k, step_s_median=med, step_s_min=min(times[k]),
               step_s_all=times[k], images_per_s=args.batch / med, **costs.get(k, {}))
    if "torch" in times:
      row["vs_torch"] = statistics.median(times["torch"]) / med
      row["vs_torch_paired"] = statistics.median(
          a / b for a, b in zip(times["torch"], times[k]))
    rows.append(row)

  print(f"| arm | median ms/step | images/s | vs torch (ratio of medians; "
        f"median of paired ratios) |\n|---|---:|---:|---:|")
  for r in rows:
    vs = (f"{r['vs_torch']:.2f}x; {r['vs_torch_paired']:.2f}x"
          if "vs_torch" in r else "(torch skipped)")
    print(f"| {r['arm']} | {1e3 * r['step_s_median']:.0f} | "
          f"{r['images_per_s']:.0f} | {vs} |")
  print(f"\n{args.model} ViT {cfg}, batch {args.batch}, augment="
        f"{args.augment}, {args.reps} reps x {args.calls} steps; torch "
        f"threads {args.threads}, {os.cpu_count()} CPUs; load average start "
        f"{load_start}, end {load_end}; {wall:.0f} s; "
        f"XLA_FLAGS={info['xla_flags']!r}")

  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    with out.open("a") as f:
      for r in rows:
        f.write(json.dumps(dict(
            bench="torch", time=stamp, model=args.model, batch=args.batch,
            augment=args.augment, reps=args.reps, calls=args.calls,
            threads=args.threads, load_start=load_start, load_end=load_end,
            torch=infos.get("torch", {}).get("torch"), **info, **r)) + "\n")
    log(f"appended {len(rows)} rows to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
