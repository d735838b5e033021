"""Tables and figures from the study results (``experiments/study.py``).

  python -m experiments.report        (or: python experiments/report.py)

Reads ``<results>/<study>/<run>.jsonl`` (+ ``.config.json``, and for
``cifar_vit`` ``.robustness.json``) and writes ``<out>/tables.md`` and PNGs
under ``<out>/figures/``; the tables are also printed. Missing runs are
skipped: every value is mean +- sample std (ddof=1) over the seeds found,
with n shown, so the script can be rerun as more results arrive.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from experiments import stress_report
from experiments.design import (ABLATION_ARMS, ABLATION_SHAPES, ARMS,
                                CORRUPTIONS, REDO_ARM, SEEDS, SEVERITIES)
from experiments.plotting import band, plt, save_figure
from experiments.tables import (ARM_LABELS, ARM_STYLE, Run, arm_rows,
                                column, curve, fmt, hidden_neurons, load_arms,
                                load_run, md_table, mean_std, number,
                                runs_found_line)

REPO = Path(__file__).resolve().parents[1]
CORRUPTION_LABELS = {"gaussian_noise": "Gaussian noise",
                     "gaussian_blur": "Gaussian blur", "contrast": "contrast"}


# ------------------------------------------------------------------ loading

def load_ablation(results: Path, seeds=SEEDS):
  """``{(depth, width, arm): [Run]}`` over the seeds found."""
  out = {}
  for depth, width in ABLATION_SHAPES:
    for arm in ABLATION_ARMS:
      runs = [load_run(results / "ablation", f"d{depth}_w{width}_{arm}_s{s}")
              for s in seeds]
      runs = [r for r in runs if r is not None]
      if runs:
        out[(depth, width, arm)] = runs
  return out


def dead_fraction(run: Run, depth: int, width: int, final=True) -> float:
  dead = run.final("dead_neurons") if final else run.max("dead_neurons")
  return dead / hidden_neurons(run, depth, width)


# ------------------------------------------------------------------- tables

def main_table(title: str, arms: dict, expected: int) -> str:
  out = [f"## {title}", ""]
  if not arms:
    return "\n".join(out + ["_No runs found yet._", ""])
  header = ["arm", "n", "final test acc (%)", "best test acc (%)",
            "final dead neurons", "max dead neurons", "final active params",
            "final sparsity (%)", "final stripped weights"]
  rows = arm_rows(arms, [
      column(lambda r: r.final("test_acc"), 100),
      column(lambda r: r.max("test_acc"), 100),
      column(lambda r: r.final("dead_neurons"), digits=1),
      column(lambda r: r.max("dead_neurons"), digits=1),
      column(lambda r: r.final("active_params"), digits=0),
      column(lambda r: r.final("sparsity"), 100, digits=3),
      column(lambda r: r.final("stripped_weights"), digits=0),
  ])
  out += [md_table(header, rows), "", runs_found_line(arms, expected), ""]
  return "\n".join(out)


def _rob(run: Run, key: str) -> float:
  return number((run.robustness or {}).get(key))


def _mean_corrupted(run: Run) -> float:
  vals = [_rob(run, f"{k}_{s}") for k in CORRUPTIONS for s in SEVERITIES]
  vals = [v for v in vals if math.isfinite(v)]
  return float(np.mean(vals)) if vals else math.nan


def robustness_tables(arms: dict, expected: int) -> str:
  out = ["## cifar_vit: robustness to corruptions (test accuracy, %)", ""]
  arms = {a: [r for r in rs if r.robustness] for a, rs in arms.items()}
  arms = {a: rs for a, rs in arms.items() if rs}
  if not arms:
    return "\n".join(out + ["_No robustness results found yet._", ""])
  cols = [f"{k}_{s}" for k in CORRUPTIONS for s in SEVERITIES]
  short = {"gaussian_noise": "noise", "gaussian_blur": "blur",
           "contrast": "contrast"}
  col_names = [f"{short[k]} {s}" for k in CORRUPTIONS for s in SEVERITIES]
  header = ["arm", "n", "clean"] + col_names + ["mean corrupted"]
  rows = []
  for arm, runs in arms.items():
    rows.append([ARM_LABELS.get(arm, arm), len(runs),
                 fmt([_rob(r, "clean") for r in runs], 100)]
                + [fmt([_rob(r, c) for r in runs], 100) for c in cols]
                + [fmt([_mean_corrupted(r) for r in runs], 100)])
  out += [md_table(header, rows), "", runs_found_line(arms, expected), ""]

  out += ["## cifar_vit: relative accuracy drop vs clean "
          "(%, (clean - corrupted) / clean, per seed)", ""]
  rows = []
  for arm, runs in arms.items():

    def drop(r, acc):
      clean = _rob(r, "clean")
      return (clean - acc) / clean if clean > 0 else math.nan

    rows.append([ARM_LABELS.get(arm, arm), len(runs)]
                + [fmt([drop(r, _rob(r, c)) for r in runs], 100)
                   for c in cols]
                + [fmt([drop(r, _mean_corrupted(r)) for r in runs], 100)])
  out += [md_table(["arm", "n"] + col_names + ["mean corrupted"], rows), "",
          runs_found_line(arms, expected), ""]
  return "\n".join(out)


def ablation_table(groups: dict, expected: int) -> str:
  out = ["## ablation: MLP depth / width (MNIST, 10k training images)", ""]
  if not groups:
    return "\n".join(out + ["_No runs found yet._", ""])
  header = ["depth", "width", "arm", "n", "hidden neurons",
            "final dead neurons", "final dead fraction (%)",
            "max dead neurons", "final test acc (%)", "final sparsity (%)"]
  rows = []
  for (d, w, arm), runs in groups.items():
    rows.append([
        d, w, ARM_LABELS.get(arm, arm), len(runs), d * w,
        fmt([r.final("dead_neurons") for r in runs], digits=1),
        fmt([dead_fraction(r, d, w) for r in runs], 100),
        fmt([r.max("dead_neurons") for r in runs], digits=1),
        fmt([r.final("test_acc") for r in runs], 100),
        fmt([r.final("sparsity") for r in runs], 100, digits=3),
    ])
  out += [md_table(header, rows), "", runs_found_line(groups, expected), ""]
  return "\n".join(out)


# ------------------------------------------------------------------ figures

def curves_figure(arms: dict, title: str, path: Path, written: list):
  if not arms:
    return
  panels = (("test_acc", "test accuracy (%)", 100.0),
            ("dead_neurons", "dead neurons", 1.0),
            ("active_params", "active parameters", 1.0))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, (key, ylabel, scale) in zip(axes, panels):
    for arm, runs in arms.items():
      x, m, s = curve(runs, key)
      color, ls = ARM_STYLE.get(arm, (None, "-"))
      band(ax, x, m * scale, s * scale,
            f"{ARM_LABELS.get(arm, arm)} (n={len(runs)})", color, ls)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[2].ticklabel_format(axis="y", style="plain", useOffset=False)
  fig.suptitle(f"{title} (mean ± std over seeds)")
  save_figure(fig, path, written)


def robustness_figure(arms: dict, path: Path, written: list):
  arms = {a: [r for r in rs if r.robustness] for a, rs in arms.items()}
  arms = {a: rs for a, rs in arms.items() if rs}
  if not arms:
    return
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
  x = np.array((0,) + SEVERITIES)
  for ax, kind in zip(axes, CORRUPTIONS):
    for arm, runs in arms.items():
      keys = ["clean"] + [f"{kind}_{s}" for s in SEVERITIES]
      stats = [mean_std([_rob(r, k) * 100 for r in runs]) for k in keys]
      m = np.array([st[0] for st in stats])
      s = np.array([st[1] if st[2] > 1 else 0.0 for st in stats])
      color, ls = ARM_STYLE.get(arm, (None, "-"))
      band(ax, x, m, s, f"{ARM_LABELS.get(arm, arm)} (n={len(runs)})",
            color, ls, marker="o")
    ax.set_title(CORRUPTION_LABELS[kind])
    ax.set_xlabel("severity (0 = clean)")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("test accuracy (%)")
  fig.suptitle("cifar_vit: accuracy under corruptions (mean ± std over seeds)")
  save_figure(fig, path, written)


def ablation_sweep_figure(groups: dict, vary: str, path: Path, written: list):
  """Final dead fraction vs depth (width 128) or width (depth 4)."""
  if vary == "depth":
    shapes = [(d, w) for d, w in ABLATION_SHAPES if w == 128]
    xval, fixed = (lambda dw: dw[0]), "width 128"
  else:
    shapes = sorted({(d, w) for d, w in ABLATION_SHAPES if d == 4},
                    key=lambda dw: dw[1])
    xval, fixed = (lambda dw: dw[1]), "depth 4"
  fig, ax = plt.subplots(figsize=(6, 4.2))
  plotted = False
  for arm in ABLATION_ARMS:
    xs, ms, ss, ns = [], [], [], []
    for d, w in shapes:
      runs = groups.get((d, w, arm))
      if not runs:
        continue
      m, s, n = mean_std([dead_fraction(r, d, w) * 100 for r in runs])
      if n == 0:
        continue
      xs.append(xval((d, w)))
      ms.append(m)
      ss.append(s if n > 1 else 0.0)
      ns.append(n)
    if not xs:
      continue
    plotted = True
    color, ls = ARM_STYLE.get(arm, (None, "-"))
    band(ax, np.array(xs), np.array(ms), np.array(ss),
          f"{ARM_LABELS.get(arm, arm)} (n={min(ns)}-{max(ns)})"
          if min(ns) != max(ns) else
          f"{ARM_LABELS.get(arm, arm)} (n={ns[0]})", color, ls, marker="o")
  if not plotted:
    plt.close(fig)
    return
  ax.set_xscale("log", base=2)
  ax.set_xticks([xval(dw) for dw in shapes])
  ax.set_xticklabels([str(xval(dw)) for dw in shapes])
  ax.set_xlabel(f"{vary} (hidden layers)" if vary == "depth"
                else "width (neurons per hidden layer)")
  ax.set_ylabel("final dead neurons (% of hidden neurons)")
  ax.set_title(f"ablation: dead fraction vs {vary} ({fixed})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save_figure(fig, path, written)


def ablation_training_figure(groups: dict, path: Path, written: list):
  """Dead neurons vs epoch per depth (width 128); strip dashed."""
  depths = [d for d, w in ABLATION_SHAPES if w == 128]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  plotted = False
  for i, d in enumerate(depths):
    for arm, ls in (("relu", "-"), ("strip", "--")):
      runs = groups.get((d, 128, arm))
      if not runs:
        continue
      plotted = True
      x, m, s = curve(runs, "dead_neurons")
      band(ax, x, m, s, f"depth {d}, {ARM_LABELS.get(arm, arm)} "
            f"(n={len(runs)})", f"C{i}", ls, alpha=0.12)
  if not plotted:
    plt.close(fig)
    return
  ax.set_xlabel("epoch")
  ax.set_ylabel("dead neurons")
  ax.set_title("ablation: dead neurons during training (width 128)\n"
               "solid = ReLU, dashed = ReLU + stripping")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  save_figure(fig, path, written)


# --------------------------------------------------------------------- main

def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default=str(REPO / "experiments" /
                                               "results"))
  parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
  args = parser.parse_args()
  results, out = Path(args.results), Path(args.out)
  fig_dir = out / "figures"

  cifar = load_arms(results, "cifar_vit", ARMS)
  mnist = load_arms(results, "mnist_mlp", ARMS, extra_study="redo",
                    extra_arm=REDO_ARM)
  ablation = load_ablation(results)
  n_seeds = len(SEEDS)

  sections = [
      "# Study results",
      "",
      "Mean ± sample std (ddof=1) over the seeds found (n); `–` where "
      "undefined (std with n = 1). Generated by `experiments/report.py`.",
      "",
      main_table("cifar_vit: ViT on the CIFAR-10 subset", cifar,
                 len(ARMS) * n_seeds),
      robustness_tables(cifar, len(ARMS) * n_seeds),
      main_table("mnist_mlp: MLP on MNIST (+ ReDo arm from study `redo`)",
                 mnist, (len(ARMS) + 1) * n_seeds),
      ablation_table(ablation, len(ABLATION_SHAPES) * len(ABLATION_ARMS)
                     * n_seeds),
  ]
  written = []
  sections += stress_report.sections_and_figures(results, fig_dir, written)
  text = "\n".join(sections).rstrip() + "\n"
  out.mkdir(parents=True, exist_ok=True)
  (out / "tables.md").write_text(text, encoding="utf-8")

  curves_figure(cifar, "cifar_vit", fig_dir / "cifar_vit_curves.png",
                written)
  curves_figure(mnist, "mnist_mlp", fig_dir / "mnist_mlp_curves.png",
                written)
  robustness_figure(cifar, fig_dir / "cifar_vit_robustness.png", written)
  ablation_sweep_figure(ablation, "depth", fig_dir / "ablation_depth.png",
                        written)
  ablation_sweep_figure(ablation, "width", fig_dir / "ablation_width.png",
                        written)
  ablation_training_figure(ablation,
                           fig_dir / "ablation_dead_over_training.png",
                           written)

  print(text)
  print(f"Wrote {out / 'tables.md'}")
  print("Figures written:" if written else "Figures written: none")
  for p in written:
    print(f"  {p}")


if __name__ == "__main__":
  main()
