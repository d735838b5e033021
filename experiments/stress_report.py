"""Tables and figures of the stress study (``experiments/stress.py``).

Called by ``python -m experiments.report``; reads the same results
directory. Every value is mean ± sample std over the seeds found, with n.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from experiments import stress, tables
from experiments.design import SEEDS
from experiments.plotting import band, plt, save_figure
from experiments.tables import column, fmt, hidden_neurons, md_table

ARM_LABELS = {**tables.ARM_LABELS, "leaky_relu": "leaky ReLU"}
ARM_STYLE = {**tables.ARM_STYLE, "leaky_relu": ("C4", "-")}


# ------------------------------------------------------------------ helpers

def dead_pct(run: tables.Run) -> np.ndarray:
  """Dead neurons per epoch, % of :func:`hidden_neurons`."""
  return 100.0 * run.series("dead_neurons") / hidden_neurons(run)


def strip_share(run: tables.Run) -> float:
  """The event phase's time (``strip_time_s``: the strip or ReDo event and
  the end-of-epoch check that the state is finite, which arms without
  events pay too) as a fraction of the epochs' time."""
  strip = np.nansum(run.series("strip_time_s"))
  total = strip + np.nansum(run.series("train_time_s")) + np.nansum(
      run.series("eval_time_s"))
  return float(strip / total) if total else math.nan


def wall_s(run: tables.Run, study_dir: Path) -> float:
  """Wall time of the run (``<run>.wall.json``; NaN if it was resumed)."""
  w = tables.read_json(study_dir / f"{run.name}.wall.json") or {}
  return math.nan if w.get("resumed", True) else tables.number(w.get("wall_s"))


# ------------------------------------------------------------------- tables

def regime_table(results: Path) -> tuple[str, dict]:
  """Dead fraction of each candidate setting (seed 0, ReLU, no stripping)."""
  d = results / "stress_regime"
  runs = {}
  for kind, group in stress.REGIME_SEARCH.items():
    for name in group:
      r = tables.load_run(d, f"{kind}_{name}_s0")
      if r is not None:
        runs[(kind, name)] = r
  out = ["## stress_regime: where do ReLU neurons die? (seed 0, no "
         "stripping)", ""]
  if not runs:
    return "\n".join(out + ["_No runs found yet._", ""]), runs
  header = ["model", "setting", "epochs", "hidden neurons",
            "dead after epoch 1 (%)", "max dead (%)", "final dead (%)",
            "final test acc (%)"]
  rows = []
  for (kind, name), r in runs.items():
    pct = dead_pct(r)
    rows.append([kind, name, len(r.records), hidden_neurons(r),
                 f"{pct[0]:.1f}", f"{np.nanmax(pct):.1f}", f"{pct[-1]:.1f}",
                 f"{100 * r.final('test_acc'):.2f}"])
  expected = sum(len(g) for g in stress.REGIME_SEARCH.values())
  out += [md_table(header, rows), "",
          f"_Runs found: {len(runs)} of {expected} expected._", ""]
  return "\n".join(out), runs


def arms_table(results: Path, study: str, title: str) -> tuple[str, dict]:
  """The five arms in one regime: accuracy, dead neurons, sparsity, cost."""
  d = results / study
  arms = tables.load_arms(results, study, stress.ARMS)
  out = [f"## {study}: {title}", ""]
  if not arms:
    return "\n".join(out + ["_No runs found yet._", ""]), arms
  header = ["arm", "n", "final test acc (%)", "best test acc (%)",
            "final dead (%)", "max dead (%)", "final active params",
            "final sparsity (%)", "wall time (s)", "event phase, total (s)",
            "event phase, later epochs (ms)", "event phase / epoch time (%)"]
  rows = tables.arm_rows(arms, [
      column(lambda r: r.final("test_acc"), 100),
      column(lambda r: r.max("test_acc"), 100),
      column(lambda r: dead_pct(r)[-1], digits=1),
      column(lambda r: np.nanmax(dead_pct(r)), digits=1),
      column(lambda r: r.final("active_params"), digits=0),
      column(lambda r: r.final("sparsity"), 100, digits=3),
      column(lambda r: wall_s(r, d), digits=0),
      column(lambda r: float(np.nansum(r.series("strip_time_s")))),
      column(lambda r: 1e3 * float(np.nanmedian(
          r.series("strip_time_s")[1:])), digits=1),
      column(lambda r: strip_share(r), 100, digits=2),
  ], labels=ARM_LABELS)
  out += [md_table(header, rows), "",
          tables.runs_found_line(arms, len(stress.ARMS) * len(SEEDS)),
          ""]
  return "\n".join(out), arms


def sensitivity_table(results: Path) -> tuple[str, dict]:
  """Factor x frequency (+ probe on test) in the MLP regime, with the
  ``stress_mlp`` ReLU and ReLU + stripping arms as references."""
  groups = {}
  ref = tables.load_arms(results, "stress_mlp", ("relu", "relu_strip"))
  if "relu" in ref:
    groups[("none", "–", "–")] = ref["relu"]
  if "relu_strip" in ref:
    groups[(0.05, 1, "held-out")] = ref["relu_strip"]
  for name in stress.sensitivity_runs():
    runs = [tables.load_run(results / "stress_sensitivity", f"{name}_s{s}")
            for s in SEEDS]
    runs = [r for r in runs if r is not None]
    if runs:
      c = runs[0].config["stripping"]
      probe = "test" if c["probe"] == "test" else "held-out"
      groups[(c["factor"], c["frequency"], probe)] = runs
  out = ["## stress_sensitivity: stripping factor, frequency and probe "
         "(MLP regime)", ""]
  if not groups:
    return "\n".join(out + ["_No runs found yet._", ""]), groups
  header = ["factor", "every n epochs", "probe", "n", "final test acc (%)",
            "best test acc (%)", "final dead (%)", "max dead (%)",
            "final sparsity (%)", "final stripped weights"]
  rows = []
  order = sorted(groups, key=lambda k: (k[0] != "none", str(k)))
  for key in order:
    runs = groups[key]
    rows.append([*key, len(runs),
                 fmt([r.final("test_acc") for r in runs], 100),
                 fmt([r.max("test_acc") for r in runs], 100),
                 fmt([dead_pct(r)[-1] for r in runs], digits=1),
                 fmt([np.nanmax(dead_pct(r)) for r in runs], digits=1),
                 fmt([r.final("sparsity") for r in runs], 100, digits=3),
                 fmt([r.final("stripped_weights") for r in runs],
                      digits=0)])
  n = sum(len(v) for v in groups.values())
  out += [md_table(header, rows), "",
          f"_Runs found: {n} of {(len(stress.sensitivity_runs()) + 2) * 3} "
          "expected (incl. the two stress_mlp reference arms)._", ""]
  return "\n".join(out), groups


def overlap_table(results: Path) -> str:
  """Held-out vs test probe: dead sets of the final ReLU models."""
  out = ["## Probe on the held-out split vs on the test set: dead sets of "
         "the final ReLU (no stripping) models", ""]
  header = ["study", "n", "dead on held-out", "dead on test", "dead on both",
            "dead on either", "Jaccard (both / either)"]
  rows = []
  for study in stress.ARM_STUDIES:
    found = [tables.read_json(results / study / f"relu_s{s}.probe_overlap.json")
             for s in SEEDS]
    found = [f for f in found if f]
    if found:
      rows.append([study, len(found)] + [
          fmt([f[k] for f in found], digits=1)
          for k in ("holdout", "test", "both", "either")]
          + [fmt([f["jaccard"] for f in found], digits=3)])
  if not rows:
    return "\n".join(out + ["_No results found yet._", ""])
  return "\n".join(out + [md_table(header, rows), ""])


# ------------------------------------------------------------------ figures

def regime_figure(runs: dict, path: Path, written: list) -> None:
  if not runs:
    return
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for ax, kind in zip(axes, ("mlp", "vit")):
    for (k, name), r in runs.items():
      if k == kind:
        pct = dead_pct(r)
        ax.plot(np.arange(1, len(pct) + 1), pct, marker=".",
                label=f"{name} ({100 * r.final('test_acc'):.1f} %)")
    ax.set_title(f"{kind.upper()}: dead neurons without stripping "
                 "(legend: final test acc)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("dead neurons (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  save_figure(fig, path, written)


def arms_figure(arms: dict, title: str, path: Path, written: list) -> None:
  if not arms:
    return
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  panels = ((lambda r: 100 * r.series("test_acc"), "test accuracy (%)"),
            (dead_pct, "dead neurons (%)"),
            (lambda r: 100 * r.series("sparsity"), "sparsity (%)"))
  for ax, (fn, ylabel) in zip(axes, panels):
    for arm, runs in arms.items():
      arr = np.stack([fn(r) for r in runs])
      mean = arr.mean(0)
      std = arr.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
      color, ls = ARM_STYLE.get(arm, (None, "-"))
      band(ax, np.arange(1, len(mean) + 1), mean, std,
               f"{ARM_LABELS.get(arm, arm)} (n={len(runs)})", color, ls)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{title} (mean ± std over seeds)")
  save_figure(fig, path, written)


def sensitivity_figure(groups: dict, path: Path, written: list) -> None:
  groups = {k: v for k, v in groups.items() if k[0] != "none"
            and k[2] == "held-out"}
  if not groups:
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for freq, marker in zip(stress.FREQUENCIES, ("o", "s")):
    keys = sorted(k for k in groups if k[1] == freq)
    if not keys:
      continue
    for ax, (fn, ylabel) in zip(axes, (
        (lambda r: 100 * r.final("test_acc"), "final test accuracy (%)"),
        (lambda r: 100 * r.final("sparsity"), "final sparsity (%)"))):
      stats = [tables.mean_std([fn(r) for r in groups[k]]) for k in keys]
      ax.errorbar([k[0] for k in keys], [s[0] for s in stats],
                  yerr=[0 if math.isnan(s[1]) else s[1] for s in stats],
                  marker=marker, capsize=3, label=f"every {freq} epoch(s)")
      ax.set_xscale("log")
      ax.set_xlabel("stripping factor")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle("MLP regime: sensitivity to the stripping factor and "
               "frequency (mean ± std, 3 seeds)")
  save_figure(fig, path, written)


def sections_and_figures(results: Path, fig_dir: Path, written: list
                         ) -> list[str]:
  """The stress study's markdown sections; writes its figures."""
  regime, regime_runs = regime_table(results)
  mlp, mlp_arms = arms_table(results, "stress_mlp",
                             "MLP regime (3 x 256, MNIST, lr 1e-2, no warm-up)")
  vit, vit_arms = arms_table(
      results, "stress_vit",
      "ViT regime (CIFAR-10 subset, lr 1e-2, no warm-up, batch 512)")
  dead_init, dead_init_arms = arms_table(
      results, "stress_deadinit",
      "MLP with every hidden bias initialised to -1 (3 x 256, MNIST, lr 1e-3)")
  sens, sens_groups = sensitivity_table(results)
  regime_figure(regime_runs, fig_dir / "stress_regime.png", written)
  arms_figure(mlp_arms, "stress_mlp", fig_dir / "stress_mlp_curves.png",
              written)
  arms_figure(vit_arms, "stress_vit", fig_dir / "stress_vit_curves.png",
              written)
  arms_figure(dead_init_arms, "stress_deadinit",
              fig_dir / "stress_deadinit_curves.png", written)
  sensitivity_figure(sens_groups, fig_dir / "stress_sensitivity.png",
                     written)
  return [regime, mlp, vit, dead_init, sens, overlap_table(results)]


__all__ = ["ARM_LABELS", "ARM_STYLE", "arms_table", "dead_pct",
           "overlap_table", "regime_table", "sections_and_figures",
           "sensitivity_table", "strip_share", "wall_s"]
