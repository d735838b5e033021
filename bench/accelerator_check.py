"""One check of an accelerator (under 8 minutes on one GPU): bench, a short
paper-config run, and the eager-vs-jit strip parity on the device.

Usage::

    python bench/accelerator_check.py --out /tmp/accel
        [--data /path/to/cifar10_lossless_4k.npz] [--epochs 3] [--smoke]

1. :mod:`bench_flops` (paper config, ``model.dtype=bfloat16`` on an
   accelerator, float32 on CPU): FLOPs per training image, images/s,
   utilisation against the device's peak, the projected 200-epoch CIFAR-10
   wall time on one H100 and the host side's share.
2. A short run of ``experiments/configs/paper.py:cifar10`` on ``--data``
   (default: ``cifar10_jpeg_q75.npz`` of the shared data folder, else the
   lossless 4k subset) for ``--epochs`` epochs: AutoAugment on, stripping on
   (factor 0.05 after every epoch), probe on the test set, data resident,
   ``steps_per_dispatch`` chunks; its per-epoch records and wall time.
3. The strip parity: ``strip_params`` called eagerly and inside
   ``jax.jit`` on the device, on the trained parameters with a random half
   of the neurons of every stripped kernel marked dead, compared bit for
   bit (parameters and masks).

Writes ``summary.json`` (and the run's workdir) into ``--out``.
``--smoke`` shrinks the model and the data (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_flops  # noqa: E402
from synstrip_jax import strip_params  # noqa: E402
from synstrip_jax.transform import get_masks  # noqa: E402
from synstrip_vit import evaluation, loop, paths  # noqa: E402


def default_data() -> Path:
  """The shared folder's JPEG CIFAR-10 (or its lossless 4k subset)."""
  data = paths.shared_dir() / "data"
  jpeg = data / "cifar10_jpeg_q75.npz"
  return jpeg if jpeg.is_file() else data / "cifar10_lossless_4k.npz"


def short_run(args, out: Path) -> dict[str, Any]:
  """Step 2: the paper config for ``args.epochs`` epochs on ``args.data``."""
  c = bench_flops.paper_config(args.smoke, f"npz:{args.data}")
  c.data.on_device = "auto"
  c.run.num_epochs = args.epochs
  c.model.dtype = args.dtype
  c.optimizer.warmup_epochs = 1
  if args.smoke:
    c.data.update(train_limit=256, test_limit=128)
    c.run.update(steps_per_dispatch=2, batch_size=16, eval_batch_size=16)
  workdir = out / "paper_run"
  t0 = time.perf_counter()
  records = loop.train_and_evaluate(c, workdir, log=print)
  wall = time.perf_counter() - t0
  return {"config": c.to_dict(), "workdir": str(workdir), "wall_s": wall,
          "records": records}, c


def strip_parity(config, workdir: Path, seed: int = 0) -> dict[str, Any]:
  """Step 3: eager vs jitted ``strip_params`` on the device, bit for bit."""
  state, _, _ = evaluation.final_state(config, workdir)
  masks = get_masks(state.opt_state)
  rng = np.random.default_rng(seed)
  dead = jax.tree.map(lambda m: None if m is None else
                      jax.device_put(rng.random(m.shape[-1]) < 0.5),
                      masks, is_leaf=lambda x: x is None)
  strip = functools.partial(strip_params,
                            stripping_factor=config.stripping.factor)
  eager = strip(state.params, dead, masks)
  jitted = jax.jit(strip)(state.params, dead, masks)
  leaves = zip(jax.tree.leaves(jax.device_get(eager)),
               jax.tree.leaves(jax.device_get(jitted)))
  differing = sum(int(not np.array_equal(a.view(np.uint8), b.view(np.uint8)))
                  for a, b in leaves)
  pruned = sum(int(np.sum(~np.asarray(m)))
               for m in jax.tree.leaves(jax.device_get(eager[1])))
  return {"identical": differing == 0, "differing_leaves": differing,
          "pruned_weights": pruned,
          "device": jax.devices()[0].device_kind}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--data", default=None, help="a 32x32x3 .npz")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny model and data (tests the script on CPU)")
  args = parser.parse_args(argv)
  args.data = Path(args.data) if args.data else default_data()
  accelerator = jax.default_backend() != "cpu"
  args.dtype = "bfloat16" if accelerator else "float32"
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  bench = bench_flops.main(
      ["--out", "", "--dtype", args.dtype]
      + (["--smoke", "--batch", "16", "--steps", "2"] if args.smoke
         else ["--steps", "65"]))
  run, config = short_run(args, out)
  parity = strip_parity(config, Path(run["workdir"]))
  summary = {"device": jax.devices()[0].device_kind,
             "backend": jax.default_backend(), "smoke": args.smoke,
             "data": str(args.data), "bench": bench, "paper_run": run,
             "strip_parity": parity,
             "total_s": time.perf_counter() - t0}
  (out / "summary.json").write_text(json.dumps(summary, indent=1,
                                               default=str) + "\n")
  print(json.dumps({k: summary[k] for k in ("device", "total_s")}
                   | {"images_per_s": bench["images_per_s"],
                      "utilisation": bench["utilisation"],
                      "projected_h100_total_h":
                          bench["projected_h100_total_h"],
                      "strip_parity": parity["identical"],
                      "run_wall_s": run["wall_s"]}))
  return summary


if __name__ == "__main__":
  main()
