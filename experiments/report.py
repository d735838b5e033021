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
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
ARMS = ("relu", "relu_strip", "gelu")
REDO_ARM = "relu_redo"
ARM_LABELS = {"relu": "ReLU", "relu_strip": "ReLU + stripping",
              "gelu": "GELU", "relu_redo": "ReLU + ReDo",
              "strip": "ReLU + stripping"}
ARM_STYLE = {"relu": ("C0", "-"), "relu_strip": ("C1", "-"),
             "gelu": ("C2", "-"), "relu_redo": ("C3", "-"),
             "strip": ("C1", "-")}
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast")
CORRUPTION_LABELS = {"gaussian_noise": "Gaussian noise",
                     "gaussian_blur": "Gaussian blur", "contrast": "contrast"}
SEVERITIES = (1, 3, 5)
ABLATION_SHAPES = ((1, 128), (2, 128), (4, 128), (8, 128), (4, 32), (4, 512))
ABLATION_ARMS = ("relu", "strip")


# ------------------------------------------------------------------ loading

def _num(v) -> float:
  """A metric value as float (NaN when missing or not a number)."""
  if v is None or isinstance(v, bool):
    return float(v) if isinstance(v, bool) else math.nan
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def read_records(path: Path) -> list[dict]:
  """Per-epoch records sorted by epoch (last wins on a duplicate epoch).

  Blank or malformed lines are skipped, so a partly written file never
  crashes the report.
  """
  if not path.exists():
    return []
  by_epoch = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(r, dict) and "epoch" in r:
      by_epoch[int(r["epoch"])] = r
  return [by_epoch[e] for e in sorted(by_epoch)]


def read_json(path: Path):
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError):
    return None


class Run:
  """One finished run: records, config and (maybe) robustness."""

  def __init__(self, name: str, records: list[dict], config, robustness):
    self.name = name
    self.records = records
    self.config = config or {}
    self.robustness = robustness

  def series(self, key: str) -> np.ndarray:
    """``key`` per epoch, indexed by the 0-based epoch (NaN where missing)."""
    n = max(int(r["epoch"]) for r in self.records) + 1
    out = np.full(n, np.nan)
    for r in self.records:
      out[int(r["epoch"])] = _num(r.get(key))
    return out

  def final(self, key: str) -> float:
    return _num(self.records[-1].get(key))

  def max(self, key: str) -> float:
    s = self.series(key)
    return float(np.nanmax(s)) if np.isfinite(s).any() else math.nan


def load_run(study_dir: Path, name: str):
  records = read_records(study_dir / f"{name}.jsonl")
  if not records:
    return None
  return Run(name, records, read_json(study_dir / f"{name}.config.json"),
             read_json(study_dir / f"{name}.robustness.json"))


def load_arms(results: Path, study: str, arms, seeds=SEEDS,
              extra_study: str | None = None, extra_arm: str | None = None):
  """``{arm: [Run]}`` over the seeds found (empty arms are dropped)."""
  out = {}
  for arm in arms:
    runs = [load_run(results / study, f"{arm}_s{s}") for s in seeds]
    out[arm] = [r for r in runs if r is not None]
  if extra_study and extra_arm:
    runs = [load_run(results / extra_study, f"{extra_arm}_s{s}")
            for s in seeds]
    out[extra_arm] = [r for r in runs if r is not None]
  return {a: rs for a, rs in out.items() if rs}


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


# --------------------------------------------------------------- statistics

def mean_std(values) -> tuple[float, float, int]:
  """Mean, sample std (ddof=1; NaN for n < 2) and n of the finite values."""
  v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
  n = len(v)
  if n == 0:
    return math.nan, math.nan, 0
  return float(v.mean()), (float(v.std(ddof=1)) if n > 1 else math.nan), n


def fmt(values, scale: float = 1.0, digits: int = 2) -> str:
  m, s, n = mean_std([x * scale for x in values])
  if n == 0:
    return "–"
  if digits == 0:
    ms, ss = f"{m:,.0f}", f"{s:,.0f}"
  else:
    ms, ss = f"{m:.{digits}f}", f"{s:.{digits}f}"
  return f"{ms} ± {ss if math.isfinite(s) else '–'}"


def curve(runs: list[Run], key: str):
  """Per-epoch mean and std (std 0 where fewer than 2 seeds) over runs."""
  series = [r.series(key) for r in runs]
  n = max(len(s) for s in series)
  arr = np.full((len(series), n), np.nan)
  for i, s in enumerate(series):
    arr[i, :len(s)] = s
  mean = np.full(n, np.nan)
  std = np.zeros(n)
  for e in range(n):
    m, s, k = mean_std(arr[:, e])
    mean[e] = m
    std[e] = s if k > 1 else 0.0
  return np.arange(1, n + 1), mean, std


def hidden_neurons(run: Run, depth: int, width: int) -> int:
  """Hidden neurons of an MLP run (config with a ``model`` section, or the
  flat configs of runs made before the config had sections)."""
  model = run.config.get("model")
  model = model if isinstance(model, dict) else run.config
  return int(model.get("depth", depth)) * int(model.get("width", width))


def dead_fraction(run: Run, depth: int, width: int, final=True) -> float:
  dead = run.final("dead_neurons") if final else run.max("dead_neurons")
  return dead / hidden_neurons(run, depth, width)


# ------------------------------------------------------------------- tables

def md_table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def runs_found_line(groups: dict, expected: int) -> str:
  total = sum(len(v) for v in groups.values())
  parts = ", ".join(f"{_label(k)}: {len(v)}" for k, v in groups.items()
                    ) if len(groups) <= 4 else f"{len(groups)} groups"
  return (f"_Runs found: {total} of {expected} expected"
          + (f" ({parts})._" if parts else "._"))


def _label(key) -> str:
  if isinstance(key, tuple):
    d, w, arm = key
    return f"d{d}_w{w}_{arm}"
  return key


def main_table(title: str, arms: dict, expected: int) -> str:
  out = [f"## {title}", ""]
  if not arms:
    return "\n".join(out + ["_No runs found yet._", ""])
  header = ["arm", "n", "final test acc (%)", "best test acc (%)",
            "final dead neurons", "max dead neurons", "final active params",
            "final sparsity (%)", "final stripped weights"]
  rows = []
  for arm, runs in arms.items():
    rows.append([
        ARM_LABELS.get(arm, arm), len(runs),
        fmt([r.final("test_acc") for r in runs], 100),
        fmt([r.max("test_acc") for r in runs], 100),
        fmt([r.final("dead_neurons") for r in runs], digits=1),
        fmt([r.max("dead_neurons") for r in runs], digits=1),
        fmt([r.final("active_params") for r in runs], digits=0),
        fmt([r.final("sparsity") for r in runs], 100, digits=3),
        fmt([r.final("stripped_weights") for r in runs], digits=0),
    ])
  out += [md_table(header, rows), "", runs_found_line(arms, expected), ""]
  return "\n".join(out)


def _rob(run: Run, key: str) -> float:
  return _num((run.robustness or {}).get(key))


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

def _band(ax, x, mean, std, label, color, ls="-", marker=None, alpha=0.2):
  ax.plot(x, mean, color=color, ls=ls, marker=marker, label=label)
  ax.fill_between(x, mean - std, mean + std, color=color, alpha=alpha, lw=0)


def _save(fig, path: Path, written: list):
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)
  written.append(path)


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
      _band(ax, x, m * scale, s * scale,
            f"{ARM_LABELS.get(arm, arm)} (n={len(runs)})", color, ls)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[2].ticklabel_format(axis="y", style="plain", useOffset=False)
  fig.suptitle(f"{title} (mean ± std over seeds)")
  _save(fig, path, written)


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
      _band(ax, x, m, s, f"{ARM_LABELS.get(arm, arm)} (n={len(runs)})",
            color, ls, marker="o")
    ax.set_title(CORRUPTION_LABELS[kind])
    ax.set_xlabel("severity (0 = clean)")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("test accuracy (%)")
  fig.suptitle("cifar_vit: accuracy under corruptions (mean ± std over seeds)")
  _save(fig, path, written)


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
    _band(ax, np.array(xs), np.array(ms), np.array(ss),
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
  _save(fig, path, written)


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
      _band(ax, x, m, s, f"depth {d}, {ARM_LABELS.get(arm, arm)} "
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
  _save(fig, path, written)


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
  # Imported here: stress_report builds on this module's helpers.
  from experiments import stress_report
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
