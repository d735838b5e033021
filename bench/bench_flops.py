"""FLOPs per training image, images/s, model FLOP utilisation, projection.

Usage::

    python bench/bench_flops.py [--steps 4] [--batch 128] [--smoke]
        [--out bench/results/flops.jsonl]

For the paper config (``experiments/configs/paper.py:cifar10``: ViT 7 x 384,
MLP 1536, patch 4, AutoAugment on, stripping on) on random 32x32x3 images,
in one process:

* **FLOPs per training image**: XLA's cost analysis of the compiled train
  step (``jit(step).lower(...).compile().cost_analysis()['flops']``, forward
  + backward + AdamW + AutoAugment) divided by the batch; the same for the
  probe step (evaluation with the activation statistics);
* **images/s**: ``--steps`` optimizer steps in one dispatch
  (``lax.scan``, data resident on the device), timed after a warm-up
  dispatch, closed by ``block_until_ready``;
* **utilisation**: FLOPs/s over the device's peak (:data:`PEAK_FLOPS` by
  ``device_kind``; unknown on CPU);
* **projection**: the wall time of a 200-epoch CIFAR-10 run (50,000
  images per epoch) on one H100 at 40 % of its bf16 peak, and what the host
  side adds: the Python time of one chunk's dispatch (measured: the call
  returns before the device finishes), the probe pass over the 10,000 test
  images (its FLOPs at the same utilisation), a strip event and a
  checkpoint (measured here, each after a warm-up call; their cost hardly
  depends on the device). ``probe_pass_s`` is the measured pass over this
  run's test images.

``--smoke`` shrinks the model (1 block x 16) so the script itself can be
tested in seconds. Prints one JSON object and appends it to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from synstrip_vit import checkpointing, loop, startup, steps  # noqa: E402

#: Dense peak FLOP/s per chip by ``device_kind`` prefix: (bf16, float32).
#: Vendor figures without sparsity (H100/H200 SXM; A100 SXM: float32 is
#: its TF32 tensor-core rate's non-tensor counterpart, 19.5 TFLOP/s).
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "NVIDIA H100": (989e12, 67e12),
    "NVIDIA H200": (989e12, 67e12),
    "NVIDIA A100": (312e12, 19.5e12),
    "TPU v4": (275e12, 275e12 / 2),
    "TPU v5 lite": (197e12, 197e12 / 2),
    "TPU v5e": (197e12, 197e12 / 2),
}
#: The projection's device and utilisation.
H100_BF16_PEAK = PEAK_FLOPS["NVIDIA H100"][0]
PROJECTED_UTILISATION = 0.4
PAPER_EPOCHS, CIFAR10_TRAIN, CIFAR10_TEST = 200, 50_000, 10_000
#: The paper run's batch and chunk (paper.py), whatever the bench measured.
PAPER_BATCH, PAPER_STEPS_PER_DISPATCH = 128, 65
SMOKE_MODEL = {"depth": 1, "hidden_size": 16, "num_heads": 2, "mlp_dim": 32,
               "patch_size": 8}


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """The peak of :data:`PEAK_FLOPS` for ``device_kind`` (None: unknown)."""
  for prefix, (bf16, f32) in PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return bf16 if dtype == "bfloat16" else f32
  return None


def paper_config(smoke: bool, dataset: str, batch: int = 128,
                 steps_per: Optional[int] = None):
  """``paper.py:cifar10`` on ``dataset`` (shrunk when ``smoke``; the data
  resident; ``steps_per`` None: the paper config's chunk size)."""
  spec = importlib.util.spec_from_file_location(
      "paper_config", REPO / "experiments" / "configs" / "paper.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("cifar10")
  c.data.update(dataset=dataset, on_device="yes")
  c.run.update(batch_size=batch, eval_batch_size=batch, num_epochs=1,
               steps_per_dispatch=steps_per or c.run.steps_per_dispatch,
               progress_bar=False)
  if smoke:
    c.model.update(SMOKE_MODEL)
  return c


def random_npz(path: Path, n_train: int, n_test: int) -> str:
  """A random 32x32x3 uint8 data set (10 classes); returns its ``npz:``."""
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (n_train, 32, 32, 3), np.uint8),
           y_train=rng.integers(0, 10, n_train).astype(np.int32),
           x_test=rng.integers(0, 256, (n_test, 32, 32, 3), np.uint8),
           y_test=rng.integers(0, 10, n_test).astype(np.int32))
  return f"npz:{path}"


def flops_per_image(run, state, batch: int) -> tuple[float, float]:
  """(train, probe) FLOPs per image from XLA's cost analysis."""
  image = tuple(run.data.image_shape)
  abstract = steps.abstract_replicated(state, run.mesh)
  train = run.train_step.lower(abstract, *steps.abstract_batch(
      [((batch,) + image, np.uint8), ((batch,), np.int32)], run.mesh))
  probe = run.probe_step.lower(abstract.params, *steps.abstract_batch(
      [((batch,) + image, np.uint8), ((batch,), np.int32),
       ((batch,), np.bool_)], run.mesh))
  out = []
  for lowered in (train, probe):
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out.append(float(cost["flops"]) / batch)
  return out[0], out[1]


def measure(config, workdir: Path) -> dict[str, Any]:
  """Every figure of the module docstring for ``config``."""
  run, state = startup.prepare(config, workdir, log=lambda _: None)
  batch, k = config.run.batch_size, config.run.steps_per_dispatch
  train_flops, probe_flops = flops_per_image(run, state, batch)
  rows = loop.epoch_order(run, 0)[:k]
  state = jax.block_until_ready(loop.run_steps(run, state, rows))  # compile
  t0 = time.perf_counter()
  state = loop.run_steps(run, state, rows)
  dispatch_s = time.perf_counter() - t0
  jax.block_until_ready(state)
  chunk_s = time.perf_counter() - t0
  loop.evaluate_and_probe(run, state.params)  # first call: warm-up
  t0 = time.perf_counter()
  (_, probed), dead = loop.evaluate_and_probe(run, state.params)
  probe_s = time.perf_counter() - t0
  stats = probed["stats"]
  loop.strip_or_recycle(run, state, stats, dead, 0)  # first event: warm-up
  t0 = time.perf_counter()
  state, _ = loop.strip_or_recycle(run, state, stats, dead, 0)
  strip_s = time.perf_counter() - t0
  manager = checkpointing.make_manager(workdir / "ckpt")
  checkpointing.save(manager, 1, state)  # first save: warm-up
  t0 = time.perf_counter()
  checkpointing.save(manager, 2, state)
  checkpoint_s = time.perf_counter() - t0
  manager.close()
  images_s = k * batch / chunk_s
  device = jax.devices()[0]
  dtype = config.model.dtype
  peak = peak_flops(device.device_kind, dtype)
  achieved = train_flops * images_s
  return project({
      "device_kind": device.device_kind, "platform": device.platform,
      "dtype": dtype, "batch": batch, "steps_per_dispatch": k,
      "train_gflop_per_image": train_flops / 1e9,
      "probe_gflop_per_image": probe_flops / 1e9,
      "images_per_s": images_s, "achieved_tflop_s": achieved / 1e12,
      "peak_tflop_s": None if peak is None else peak / 1e12,
      "utilisation": None if peak is None else achieved / peak,
      "dispatch_s": dispatch_s, "chunk_s": chunk_s,
      "probe_pass_s": probe_s, "probe_images": len(run.data.x_test),
      "strip_event_s": strip_s, "checkpoint_s": checkpoint_s})


def project(row: dict[str, Any]) -> dict[str, Any]:
  """``row`` plus the projected 200-epoch CIFAR-10 run on one H100 at 40 %
  of its bf16 peak (hours), split into compute and host side."""
  rate = PROJECTED_UTILISATION * H100_BF16_PEAK
  train_s = (PAPER_EPOCHS * CIFAR10_TRAIN * row["train_gflop_per_image"]
             * 1e9 / rate)
  probe_s = (PAPER_EPOCHS * CIFAR10_TEST * row["probe_gflop_per_image"]
             * 1e9 / rate)
  chunks = PAPER_EPOCHS * -(-(CIFAR10_TRAIN // PAPER_BATCH)
                            // PAPER_STEPS_PER_DISPATCH)
  host_s = (chunks * row["dispatch_s"]
            + PAPER_EPOCHS * (row["strip_event_s"] + row["checkpoint_s"]))
  return {**row, "projected_h100_train_compute_h": train_s / 3600,
          "projected_h100_probe_compute_h": probe_s / 3600,
          "projected_h100_host_side_h": host_s / 3600,
          "projected_h100_total_h": (train_s + probe_s + host_s) / 3600}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=4,
                      help="optimizer steps in the timed dispatch")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--dtype", default="float32",
                      help="model.dtype (bfloat16 on an accelerator)")
  parser.add_argument("--smoke", action="store_true",
                      help="a 1-block x 16 model (tests the script)")
  parser.add_argument("--out", default=str(REPO / "bench" / "results" /
                                           "flops.jsonl"),
                      help="JSON-lines file to append to ('' = none)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    dataset = random_npz(Path(tmp) / "d.npz", args.batch * args.steps,
                         args.batch)
    config = paper_config(args.smoke, dataset, args.batch, args.steps)
    config.model.dtype = args.dtype
    row = measure(config, Path(tmp) / "wd")
  row["smoke"] = args.smoke
  print(json.dumps(row, indent=1))
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
  return row


if __name__ == "__main__":
  main()
