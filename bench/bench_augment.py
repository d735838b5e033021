"""Augmentation throughput on this machine, and its share of a training step.

    python bench/bench_augment.py [--quick] [--reps N] [--batches 128,512]
        [--out bench/results/augment.jsonl]

Times :func:`synstrip_vit.augment.augment_batch` jitted on uint8 CIFAR-sized
batches (real CIFAR-10 images from ``../shared/data`` when present, random
pixels otherwise), with AutoAugment (the CIFAR-10 policy) and without (the
grey-fill crop and flip only), interleaved so both arms see the same machine
load; reports images per second (median over repetitions). It then times a
forward + backward pass (``jax.value_and_grad`` of the cross-entropy) of the
application's default ViT (``synstrip_vit.models.vit.ViT``, paper scale) at
the first batch size and states the augmentation's share of a step
``aug / (aug + fwd_bwd)``. ``--quick`` uses a 2-block ViT for the step.

The rate one accelerator needs is ``peak * utilisation / flops_per_image``:
printed for one H100 (989 TFLOP/s dense bf16) at 40 % and ~5 GFLOP per
training image (paper ViT, forward + backward).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common
from synstrip_vit import augment
from synstrip_vit.models.vit import ViT
from synstrip_vit.paths import shared_dir

H100_BF16_DENSE = 989e12
FLOP_PER_IMAGE = 5e9
UTILISATION = 0.4
MEAN, STD = np.array([125.3, 123.0, 113.9]), np.array([63.0, 62.1, 66.7])


def load_images(n: int) -> np.ndarray:
  """``n`` uint8 CIFAR-10 images (tiled), or random pixels without data."""
  path = shared_dir() / "data" / "cifar10_lossless_4k.npz"
  if path.exists():
    x = np.load(path)["x_train"]
    return np.resize(x, (n,) + x.shape[1:])
  return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), np.uint8)


def seconds_per_call(fn, args, calls: int) -> float:
  """Mean wall seconds of ``fn(*args)`` (blocked) over ``calls`` calls."""
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def bench_augment(batch: int, reps: int, calls: int) -> dict[str, float]:
  """Median images/s of ``augment_batch`` with and without AutoAugment."""
  x = jnp.asarray(load_images(batch))
  arms = {aa: jax.jit(lambda k, im, aa=aa: augment.augment_batch(
      k, im, mean=MEAN, std=STD, dataset="cifar10", autoaugment=aa))
          for aa in (False, True)}
  keys = jax.random.split(jax.random.key(0), calls)
  times = {aa: [] for aa in arms}
  for aa, fn in arms.items():
    jax.block_until_ready(fn(keys[0], x))  # compile
  for _ in range(reps):
    for aa, fn in arms.items():
      times[aa].append(seconds_per_call(fn, (keys[0], x), calls))
  return {("autoaugment" if aa else "crop_flip"): batch / statistics.median(t)
          for aa, t in times.items()}


def bench_step(batch: int, reps: int, depth: int | None) -> float:
  """Median seconds of one jitted forward + backward of the default ViT."""
  model = ViT(num_classes=10, **({"depth": depth} if depth else {}))
  x = jnp.asarray(augment.augment_batch(
      jax.random.key(1), jnp.asarray(load_images(batch)), mean=MEAN, std=STD,
      dataset="cifar10", autoaugment=False))
  y = jnp.zeros(batch, jnp.int32)
  params = model.init(jax.random.key(0), x[:1], train=False)["params"]

  @jax.jit
  def grad(p, key):
    def loss(p):
      logits = model.apply({"params": p}, x, train=True,
                           rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jax.value_and_grad(loss)(p)

  jax.block_until_ready(grad(params, jax.random.key(2)))
  return statistics.median(
      seconds_per_call(grad, (params, jax.random.key(2)), 1)
      for _ in range(reps))


def main(argv=None) -> int:
  parser = _common.make_parser(
      __doc__, "augment.jsonl", quick="2-block ViT for the step time",
      reps="repetitions per arm (default 5)")
  parser.add_argument("--batches", default="128,512")
  parser.add_argument("--calls", type=int, default=5)
  args = parser.parse_args(argv)
  reps = args.reps or 5
  batches = [int(b) for b in args.batches.split(",")]
  rows = []
  for batch in batches:
    rates = bench_augment(batch, reps, args.calls)
    rows.append({"bench": "augment", "batch": batch, **rates})
    print(f"batch {batch}: crop+flip {rates['crop_flip']:,.0f} img/s, "
          f"AutoAugment {rates['autoaugment']:,.0f} img/s")
  step = bench_step(batches[0], max(2, reps // 2), 2 if args.quick else None)
  aug = batches[0] / rows[0]["autoaugment"]
  share = aug / (aug + step)
  print(f"ViT fwd+bwd, batch {batches[0]}"
        f"{' (2 blocks)' if args.quick else ''}: {step * 1e3:.1f} ms; "
        f"AutoAugment {aug * 1e3:.1f} ms = {share:.1%} of aug + step")
  need = H100_BF16_DENSE * UTILISATION / FLOP_PER_IMAGE
  print(f"one H100 at {UTILISATION:.0%} of {H100_BF16_DENSE / 1e12:.0f} "
        f"TFLOP/s, {FLOP_PER_IMAGE / 1e9:.0f} GFLOP/image: {need:,.0f} "
        f"images/s to keep busy")
  rows.append({"bench": "step", "batch": batches[0], "fwd_bwd_s": step,
               "autoaugment_s": aug, "share": share, "quick": args.quick,
               "h100_images_per_s_needed": need})
  if args.out:
    info = _common.machine_info()
    _common.append_jsonl(args.out, ({**r, **info} for r in rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
