"""Tables and figures of the continual-learning study
(``experiments/continual.py``).

  python experiments/continual_report.py \
      [--results experiments/results/continual] \
      [--figures experiments/results/figures]

prints the markdown tables (also written to ``<results>/tables.md``) and
writes ``continual_<bench>.png`` (2 x 2 panels: online accuracy, dead and
dormant fractions and effective rank per task, every arm, mean ± std over
seeds).
Every value is mean ± sample std over the seeds found, with n.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import continual, continual_tasks, tables  # noqa: E402
from experiments.plotting import band, plt, save_figure  # noqa: E402
from experiments.tables import column, md_table  # noqa: E402

ARM_LABELS = {**tables.ARM_LABELS, "relu_strip": "ReLU + stripping 0.05",
              "relu_strip_f0.2": "ReLU + stripping 0.2",
              "relu_strip_e5": "ReLU + stripping 0.05 every 5th task",
              "relu_cbp": "ReLU + CBP", "relu_snp": "ReLU + shrink & perturb",
              "relu_l2": "ReLU + L2 1e-4", "relu_l2_1e-3": "ReLU + L2 1e-3",
              "leaky_relu": "leaky ReLU"}
ARM_STYLE = {**tables.ARM_STYLE, "relu_strip_f0.2": ("C1", "--"),
             "relu_strip_e5": ("C1", ":"), "relu_cbp": ("C5", "-"),
             "relu_snp": ("C6", "-"), "relu_l2": ("C7", "-"),
             "relu_l2_1e-3": ("C7", "--"),
             "leaky_relu": ("C4", "-")}

#: Tasks averaged for the "first" and "last" accuracy columns.
WINDOW = 10


def window(run: tables.Run, key: str, last: bool) -> float:
  """Mean of ``key`` over the first or last :data:`WINDOW` tasks."""
  s = run.series(key)
  part = s[-WINDOW:] if last else s[:WINDOW]
  return float(np.nanmean(part)) if np.isfinite(part).any() else math.nan


def total(run: tables.Run, key: str) -> float:
  return float(np.nansum(run.series(key)))


def change(run: tables.Run, key: str) -> float:
  """Last :data:`WINDOW` tasks' mean minus the first's."""
  return window(run, key, True) - window(run, key, False)


def event_ms(run: tables.Run) -> float:
  """Median boundary-event time after the first event (which compiles),
  in ms; NaN for an arm without boundary events."""
  s = run.series("remedy_s")
  events = s[s > 0]
  return float(np.median(events[1:]) * 1e3) if len(events) > 1 else math.nan


def wall(run: tables.Run, results: Path, bench: str, key: str) -> float:
  """``wall_s`` or ``cpu_s`` of ``<run>.wall.json`` (NaN when missing)."""
  w = tables.read_json(results / bench / f"{run.name}.wall.json") or {}
  return tables.number(w.get(key))


def bench_table(results: Path, bench: str) -> tuple[str, dict]:
  """The arms of one bench: accuracy early and late, dead and dormant
  fractions, rank, weights, sparsity, cost."""
  arms = tables.load_arms(results, bench, continual.ARMS)
  b = continual_tasks.BENCHES[bench]
  out = [f"#### {bench}: {b.tasks} tasks x {b.examples} examples x "
         f"{b.epochs} pass(es), batch {b.batch}, SGD lr {b.lr}", ""]
  if not arms:
    return "\n".join(out + ["_No runs found yet._", ""]), arms
  pct = 100.0
  cols: list[tuple[str, Callable]] = [
      (f"online acc, first {WINDOW} tasks (%)",
       column(lambda r: window(r, "online_acc_tail", False), pct)),
      (f"online acc, last {WINDOW} tasks (%)",
       column(lambda r: window(r, "online_acc_tail", True), pct)),
      ("change (points)",
       column(lambda r: change(r, "online_acc_tail"), pct)),
      (f"held-out acc, last {WINDOW} (%)",
       column(lambda r: window(r, "heldout_acc", True), pct)),
      ("final dead (%)", column(lambda r: r.final("dead_frac"), pct, 1)),
      ("max dead (%)", column(lambda r: r.max("dead_frac"), pct, 1)),
      ("final dormant <1 % (%)",
       column(lambda r: r.final("dormant_frac"), pct, 1)),
      ("final eff. rank", column(lambda r: r.final("erank_last"), 1, 1)),
      ("final mean abs weight",
       column(lambda r: r.final("weight_mean_abs"), 1, 4)),
      ("final sparsity (%)", column(lambda r: r.final("sparsity"), pct, 2)),
      ("training (s)", column(lambda r: total(r, "train_s"), 1, 0)),
      ("boundary event, later (ms)", column(event_ms, 1, 1)),
      ("CPU (s)", column(lambda r: wall(r, results, bench, "cpu_s"), 1, 0)),
  ]
  header = ["arm", "n"] + [c[0] for c in cols]
  rows = tables.arm_rows(arms, [c[1] for c in cols], ARM_LABELS)
  expected = len(continual.ARMS) * len(continual.SEEDS)
  out += [md_table(header, rows), "",
          tables.runs_found_line(arms, expected), ""]
  return "\n".join(out), arms


PANELS = (("online_acc_tail", "online accuracy, last examples (%)", 100.0),
          ("dead_frac", "dead, exact zero on the probe (%)", 100.0),
          ("dormant_frac", "dormant, active < 1 % (%)", 100.0),
          ("erank_last", "effective rank, last hidden layer", 1.0))


def figure(arms: dict, bench: str, figures: Path, written: list) -> None:
  """One row of panels per :data:`PANELS`, every arm, over the tasks."""
  fig, axes = plt.subplots(2, 2, figsize=(13, 9))
  axes = axes.ravel()
  for ax, (key, title, scale) in zip(axes, PANELS):
    for arm, runs in arms.items():
      color, ls = ARM_STYLE.get(arm, (None, "-"))
      x, mean, std = tables.curve(runs, key)
      band(ax, x, mean * scale, std * scale, ARM_LABELS.get(arm, arm),
           color, ls)
    ax.set_xlabel("task")
    ax.set_title(title, fontsize=10)
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle(f"continual {bench}: mean ± std over seeds, per task")
  save_figure(fig, figures / f"continual_{bench}.png", written)


def cpu_total(results: Path) -> float:
  """CPU seconds of every run found (``*.wall.json``)."""
  return sum(tables.number((tables.read_json(p) or {}).get("cpu_s"))
             for p in results.glob("*/*.wall.json"))


def report(results: Path, figures: Path) -> str:
  """All tables (markdown) and figures of the study."""
  parts, written = [], []
  for bench in continual_tasks.BENCHES:
    text, arms = bench_table(results, bench)
    parts.append(text)
    if arms:
      figure(arms, bench, figures, written)
  parts.append(f"_CPU time of all runs found: {cpu_total(results) / 60:.1f} "
               "min._")
  text = "\n".join(parts) + "\n"
  (results / "tables.md").write_text(text)
  return text + "".join(f"\nwrote {p}" for p in written)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--results", type=Path,
                 default=Path("experiments/results/continual"))
  p.add_argument("--figures", type=Path,
                 default=Path("experiments/results/figures"))
  a = p.parse_args()
  print(report(a.results, a.figures))


if __name__ == "__main__":
  main()
