"""Does stripping work? The study of RESULTS.md, as named groups of runs.

  python -m experiments.study --study=cifar_vit      # ViT, CIFAR-10 JPEG subset
  python -m experiments.study --study=mnist_mlp      # MLP, MNIST
  python -m experiments.study --study=ablation       # MLP depth/width, MNIST
  python -m experiments.study --study=redo           # ReDo arm (MNIST MLP)
  python -m experiments.study --study=stress_regime  # where neurons die
  python -m experiments.study --study=stress_mlp     # (experiments/stress.py)
  python -m experiments.study --study=stress_vit
  python -m experiments.study --study=stress_sensitivity
  python -m experiments.study --study=stress_deadinit

Runs execute one after the other in this process (``runs/study/<study>/
<run>/``: checkpoints, resumable: rerun the same command after a kill); each
finished run's per-epoch metrics are copied to ``experiments/results/
<study>/<run>.jsonl`` (committed), and for ``cifar_vit`` the final model's
accuracy under corruptions to ``<run>.robustness.json``. A finished run is
skipped. ``<run>.wall.json`` records the wall time of the call that
finished the run (and whether it resumed one). ReLU runs of the stress
groups also get ``<run>.probe_overlap.json`` (see ``experiments/stress.py``).
``python -m experiments.report`` turns the results into tables/figures.

Scale (chosen to fit a 2-core CPU in a few hours, see RESULTS.md): far
fewer epochs and a smaller ViT than the paper.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from experiments import stress
from experiments.corruptions import apply_corruption
from experiments.design import (ABLATION_ARMS, ABLATION_SHAPES, ARMS,
                                CORRUPTIONS, REDO_ARM, SEEDS, SEVERITIES)
from synstrip_vit import evaluation, loop, resume, writers
from synstrip_vit.config import base_config
from synstrip_vit.paths import shared_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_dir() / "data"

_STUDY = flags.DEFINE_enum(
    "study", None,
    ["cifar_vit", "mnist_mlp", "ablation", "redo", *stress.STUDIES],
    "which group of runs")
_SEEDS = flags.DEFINE_list("seeds", [str(s) for s in SEEDS], "seeds")
_RUNS_DIR = flags.DEFINE_string("runs_dir", str(REPO / "runs" / "study"),
                                "where checkpoints go (not committed)")
_OUT = flags.DEFINE_string("out", str(REPO / "experiments" / "results"),
                           "where per-run metrics go (committed)")
_ONLY = flags.DEFINE_string("only", "", "run only runs whose name contains "
                            "this string")


# ------------------------------------------------------------------ configs

def cifar_vit_base():
  """A small ViT on the 20k-image CIFAR-10 JPEG subset (full test set)."""
  c = base_config()
  c.data.dataset = f"npz:{SHARED / 'cifar10_jpeg_q75.npz'}"
  # 8x8 patches: a 4x4 patch grid, 4x fewer tokens than the paper.
  c.model.update(patch_size=8, hidden_size=128, depth=4, num_heads=4,
                 mlp_dim=512)
  c.optimizer.warmup_epochs = 2
  c.run.update(num_epochs=15, eval_batch_size=500, progress_bar=False)
  return c


def mnist_mlp_base():
  """The plain MLP (3 x 256) on MNIST, no augmentation."""
  c = base_config("mlp")
  c.data.update(dataset=f"npz:{SHARED / 'mnist.npz'}", augment=False)
  c.model.update(width=256, depth=3)
  c.optimizer.warmup_epochs = 1
  c.run.update(num_epochs=10, eval_batch_size=1000, progress_bar=False)
  return c


def runs_for(study: str, seeds: list[int]):
  """``[(name, config)]`` of a study."""
  out = []
  if study in ("cifar_vit", "mnist_mlp"):
    base = cifar_vit_base if study == "cifar_vit" else mnist_mlp_base
    for arm, fields in ARMS.items():
      for seed in seeds:
        c = base()
        c.update_from_flattened_dict(fields)
        c.run.seed = seed
        out.append((f"{arm}_s{seed}", c))
  elif study == "ablation":
    for depth, width in ABLATION_SHAPES:
      for arm in ABLATION_ARMS:
        for seed in seeds:
          c = mnist_mlp_base()
          c.data.train_limit = 10000
          c.model.update(depth=depth, width=width)
          c.stripping.enabled, c.run.seed = arm == "strip", seed
          out.append((f"d{depth}_w{width}_{arm}_s{seed}", c))
  elif study in stress.STUDIES:
    out = stress.runs_for(study, seeds, mnist_mlp_base, cifar_vit_base)
  elif study == "redo":
    for seed in seeds:
      c = mnist_mlp_base()
      c.update_from_flattened_dict({"model.activation": "relu",
                                    "stripping.enabled": False,
                                    "remedy.name": "redo"})
      c.run.seed = seed
      out.append((f"{REDO_ARM}_s{seed}", c))
  else:
    raise ValueError(f"unknown study {study!r}")
  return out


# --------------------------------------------------------------- robustness

def robustness(config, workdir) -> dict:
  """Test accuracy of the run's final model on corrupted test images."""
  _, run_data, evaluate = evaluation.final_evaluator(config, workdir,
                                               collect_stats=False)
  out = {}

  def accuracy(images):
    r = evaluate(images, run_data.y_test)
    return float(r["correct"]) / float(r["count"])

  out["clean"] = accuracy(run_data.x_test)
  for kind in CORRUPTIONS:
    for sev in SEVERITIES:
      out[f"{kind}_{sev}"] = accuracy(
          apply_corruption(run_data.x_test, kind, sev, seed=0))
  return out


def analyses(study: str, name: str):
  """``[(file suffix, fn(config, workdir) -> dict)]`` run after ``name``."""
  if study == "cifar_vit":
    return [("robustness", robustness)]
  if study in stress.ARM_STUDIES and name.startswith("relu_s"):
    return [("probe_overlap", stress.probe_overlap)]
  return []


# --------------------------------------------------------------------- main

def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  study = _STUDY.value
  if study is None:
    raise app.UsageError("--study is required")
  seeds = [int(s) for s in _SEEDS.value]
  out_dir = Path(_OUT.value) / study
  out_dir.mkdir(parents=True, exist_ok=True)
  for name, config in runs_for(study, seeds):
    if _ONLY.value and _ONLY.value not in name:
      continue
    result = out_dir / f"{name}.jsonl"
    extra = [(out_dir / f"{name}.{suffix}.json", fn)
             for suffix, fn in analyses(study, name)]
    done = (len(writers.read_jsonl(result)) == config.run.num_epochs
            and all(path.exists() for path, _ in extra))
    if done:
      print(f"[{study}] {name}: done, skipped", flush=True)
      continue
    workdir = Path(_RUNS_DIR.value) / study / name
    resumed = (workdir / writers.METRICS_FILE).exists()
    t0 = time.time()
    print(f"[{study}] {name}: training in {workdir}", flush=True)
    loop.train_and_evaluate(config, workdir,
                            log=lambda m: print(f"  {m}", flush=True))
    wall = time.time() - t0
    shutil.copyfile(workdir / writers.METRICS_FILE, result)
    (out_dir / f"{name}.config.json").write_text(
        (workdir / resume.CONFIG_FILE).read_text())
    if not (out_dir / f"{name}.wall.json").exists() or not resumed:
      (out_dir / f"{name}.wall.json").write_text(json.dumps(
          {"wall_s": round(wall, 2), "resumed": resumed}))
    for path, fn in extra:
      path.write_text(json.dumps(fn(config, workdir), indent=1))
    print(f"[{study}] {name}: finished in {wall:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
