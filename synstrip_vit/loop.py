"""The training loop of ``experiments/train_vit.py``: train, probe, strip, log.

:func:`train_and_evaluate` is a sequence of named phases (see ``docs/design.md``)::

  prepare            data, mesh, model, optimizer, compiled steps (all errors;
                     synstrip_vit.startup, the data in synstrip_vit.rundata)
  restore_or_start   config.json check, latest readable checkpoint or step 0
                     (synstrip_vit.resume)
  per epoch (run_epoch, then the record's writers and the save):
    train_epoch        train batches -> train_step -> state (+ running sums)
    evaluate_and_probe test batches -> eval_step; probe batches ->
                       eval_step(collect_stats) -> stats -> dead tree (a
                       small test set uses the probe step: one compile)
    strip_or_recycle   at an event epoch (is_event_epoch): strip_event,
                       then the remedy (synstrip_vit.remedy)
    check_state        NaN/inf in the state or a loss (synstrip_vit.finite)
    make_record        one typed EpochRecord -> writers (process 0)
    save               checkpoint (all processes)
  write_corrupted      after the last epoch, with ``eval.corruptions``: the
                       corrupted test sets -> ``corrupted.json``
                       (synstrip_vit.evaluation)

Everything a resumed run needs is in the checkpointed
:class:`~synstrip_vit.steps.TrainState`: its step gives the position
(``epoch, batch = divmod(step, steps_per_epoch)``; checkpoints inside an epoch
are never taken at its last batch, so ``batch == 0`` means the previous
epoch is finished, event and record included) and it carries the epoch's
running training sums. The data order is a pure function of ``(seed,
epoch)``, so a run killed anywhere and resumed ends with the same
parameters, bit for bit, as one that never stopped (on the same devices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import ml_collections
import numpy as np

from synstrip_jax import metrics, probe
from synstrip_jax.activations import check_finite
from synstrip_jax.transform import get_masks
from synstrip_vit import checkpointing, config as config_lib, distributed
from synstrip_vit import evaluation, finite, input_pipeline, interrupt, resume
from synstrip_vit import remedy as remedy_lib, rundata, startup, steps, writers
from synstrip_vit import workdir as workdir_lib
from synstrip_vit.evaluation import sums_mean as _mean
from synstrip_vit.resume import restore_or_start
from synstrip_vit.startup import Run, prepare
from synstrip_vit.timings import StageTimer

PyTree = Any
StepCallback = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class EpochRecord:
  """One line of ``metrics.jsonl``: the metrics of an epoch, typed.

  ``per_layer`` holds ``dead/<kernel>``, ``active/<kernel>`` and
  ``sparsity/<kernel>``; :meth:`as_dict` flattens it after the other fields
  (the file's keys and their order). ``epoch`` is the 0-based index (the
  console's ``epoch k/N`` is ``k = epoch + 1``); ``strippable_neurons`` the
  number of neurons the probe watches (``dead_neurons`` is out of it);
  ``recycled_now`` whether the ``remedy`` (its name; ``none`` for none) ran
  after this epoch and ``recycled_neurons`` how many neurons it reset. The
  metrics are defined in ``docs/training.md``.
  """
  epoch: int
  step: int
  train_loss: float
  train_acc: float
  test_loss: float
  test_acc: float
  probe_loss: float
  probe_acc: float
  dead_neurons: int
  strippable_neurons: int
  active_params: int
  sparsity: float
  stripped_weights: int
  stripped_now: bool
  recycled_now: bool
  remedy: str
  recycled_neurons: int
  learning_rate: float
  train_time_s: float
  eval_time_s: float
  strip_time_s: float
  per_layer: dict[str, float | int]

  def as_dict(self) -> dict[str, Any]:
    """The record as written: every field, then the per-layer values."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != "per_layer"}
    out.update(self.per_layer)
    return out

  def summary(self, num_epochs: int) -> str:
    """The one-line progress message of the epoch."""
    return (f"epoch {self.epoch + 1}/{num_epochs}: "
            f"train_loss {self.train_loss:.4f} train_acc {self.train_acc:.4f} "
            f"test_acc {self.test_acc:.4f} dead {self.dead_neurons} "
            f"active {self.active_params} sparsity {self.sparsity:.4f}"
            + (f" {self.remedy} reset {self.recycled_neurons}"
               if self.recycled_now else ""))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       *, on_step: Optional[StepCallback] = None,
                       log: Callable[[str], None] = print,
                       timer: Optional[StageTimer] = None,
                       extend: bool = False,
                       stop: Optional[interrupt.StopFlag] = None
                       ) -> list[dict[str, Any]]:
  """Train (or resume) the run in ``workdir``; return the per-epoch records.

  Every check that needs nothing compiled (the config, the lock, the data
  and its fingerprint, the workdir's run) comes before the first compile;
  a finished run returns its records at once (nothing restored or
  compiled).

  Args:
    config: see :func:`synstrip_vit.config.base_config`.
    workdir: run directory: ``config.json``, ``metrics.jsonl``,
      ``tensorboard/``, plots and ``checkpoints/``. If it holds a checkpoint
      the run resumes from it.
    on_step: called with the global step after every optimizer step (and
      after a checkpoint taken at that step); an exception it raises stops
      the run there, as a kill would.
    log: where one-line progress messages go (process 0 only).
    timer: gets the stages (data, init_compile, restore, writers, epochs,
      saves, plots; see :mod:`synstrip_vit.timings`); process 0 writes it to
      ``<workdir>/timings.json`` at the end. Default: a fresh one.
    extend: continue a run with a larger ``run.num_epochs`` (on the
      schedule of the new length; see :func:`resume.check_workdir`).
    stop: once training has started, a stop request (e.g. a signal through
      :func:`interrupt.catch_signals`) saves a checkpoint at the step
      reached and raises :class:`interrupt.Interrupted`.

  Raises:
    ValueError: invalid config or data (before any training).
    RunError: the workdir holds another run (other config or data), or
      metrics but no checkpoint, or its config files are unreadable.
    synstrip_vit.workdir.WorkdirError: another run is using the workdir
      (names its pid and host), or the workdir cannot be written.
    checkpointing.CheckpointError: no checkpoint can be restored.
    FloatingPointError: the training loss or the state became NaN/inf (the
      last good checkpoint is kept).
    interrupt.Interrupted: ``stop`` was requested (the step is saved).
  """
  config_lib.validate(config)
  timer = StageTimer() if timer is None else timer
  is_main = distributed.is_main()
  workdir = Path(workdir).absolute()
  with workdir_lib.exclusive(workdir, enabled=is_main, log=log):
    return _train_and_evaluate(config, workdir, on_step=on_step, log=log,
                               timer=timer, extend=extend,
                               stop=stop or interrupt.StopFlag())


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, *,
                        on_step: Optional[StepCallback],
                        log: Callable[[str], None], timer: StageTimer,
                        extend: bool, stop: interrupt.StopFlag
                        ) -> list[dict[str, Any]]:
  """:func:`train_and_evaluate` once the workdir is locked."""
  is_main = distributed.is_main()
  log = log if is_main else (lambda _: None)
  run_data = startup.load_data(config, timer=timer)
  finished = resume.check_workdir(
      workdir, config, run_data.fingerprint,
      rundata.steps_per_epoch(config, run_data), extend=extend)
  if finished is not None:
    log(f"run complete: {len(finished)} epochs; metrics in "
        f"{workdir / writers.METRICS_FILE}")
    return finished
  if is_main:  # overlaps the compiles; plot_metrics waits for it if need be
    threading.Thread(target=writers.preload_plotting, daemon=True).start()
  run, state = prepare(config, workdir, log, timer=timer, run_data=run_data)
  with timer.stage("restore"):
    state, manager, records = restore_or_start(run, state, extend=extend)
  if is_main:  # the compile time, for the notice of a rerun after a stop
    timer.write(run.workdir)
  stop.arm()
  first_epoch, _ = run.position(state.step)
  with timer.stage("writers"):
    writer = writers.make_writer(
        run.workdir, is_main=is_main,
        purge_step=first_epoch * run.steps_per_epoch + 1)
  with contextlib.ExitStack() as stack:
    stack.callback(manager.close)
    stack.callback(writer.close)
    bar = stack.enter_context(progress_bar(run, state))
    callbacks = [cb for cb in (bar, on_step) if cb is not None]
    for epoch in range(first_epoch, config.run.num_epochs):
      t0 = time.perf_counter()
      state, record = run_epoch(run, state, epoch, manager, callbacks, stop)
      writer.write(record.step, record.as_dict())
      records.append(record.as_dict())
      (bar.write if bar else run.log)(record.summary(config.run.num_epochs))
      timer.add("epochs", time.perf_counter() - t0)
      with timer.stage("saves"):
        checkpointing.save(manager, record.step, state)
      if stop.requested:
        raise stop.interrupted(epoch + 1, record.step)
  if config.eval.corruptions:
    with timer.stage("corrupted"):
      evaluation.write_corrupted(run, state.params)
  if is_main and records:
    with timer.stage("plots"):
      writers.plot_metrics(records, run.workdir, title=_title(config))
  if is_main:
    timer.write(run.workdir)
  return records


# ------------------------------------------------------------- the phases

def run_epoch(run: Run, state: steps.TrainState, epoch: int, manager,
              callbacks: Sequence[StepCallback], stop: interrupt.StopFlag
              ) -> tuple[steps.TrainState, EpochRecord]:
  """The phases of ``epoch`` up to its record: :func:`train_epoch`,
  :func:`evaluate_and_probe`, the event (:func:`strip_or_recycle`) and the
  finite-state check; returns the new state and the epoch's record (with
  the phases' times)."""
  t0 = time.perf_counter()
  state = train_epoch(run, state, epoch, manager, callbacks, stop)
  t1 = time.perf_counter()
  evals, dead = evaluate_and_probe(run, state.params)
  t2 = time.perf_counter()
  state, event = strip_or_recycle(run, state, evals[1]["stats"], dead, epoch)
  finite.check_state(state, epoch, manager, _losses(evals))
  timings = (t1 - t0, t2 - t1, time.perf_counter() - t2)
  return state, make_record(run, state, epoch, evals, dead, event, timings)


def train_epoch(run: Run, state: steps.TrainState, epoch: int, manager,
                callbacks: Sequence[StepCallback],
                stop: Optional[interrupt.StopFlag] = None
                ) -> steps.TrainState:
  """Train on ``epoch`` from the batch ``state.step`` points at.

  At batch 0 the running sums restart from zero. The steps run in chunks
  (:func:`synstrip_vit.steps.chunk_bounds`, :func:`run_steps`); inside the
  epoch (never at its last batch) a checkpoint is taken at a chunk boundary
  every ``run.checkpoint_every_steps`` steps, and at the chunk boundary reached
  when ``stop`` is requested (then :class:`interrupt.Interrupted` is raised;
  at the last batch the epoch is finished first); ``callbacks`` get each new
  step after its chunk.

  Raises:
    FloatingPointError: the training loss became NaN/inf.
    interrupt.Interrupted: ``stop`` was requested (the step is saved).
  """
  c, spe = run.config, run.steps_per_epoch
  start = int(state.step) - epoch * spe
  if start == 0:
    state = state.replace(train_sums=steps.replicate(steps.zero_sums(),
                                                     run.mesh))
  order = epoch_order(run, epoch)
  every = c.run.checkpoint_every_steps
  for b0, b1 in steps.chunk_bounds(epoch * spe, start, spe,
                             c.run.steps_per_dispatch, every):
    state = run_steps(run, state, order[b0:b1])
    step = epoch * spe + b1  # == state.step, without waiting for it
    stopping = stop is not None and stop.requested
    if b1 < spe and ((every and step % every == 0) or stopping):
      finite.check_loss(state, epoch, manager)
      checkpointing.save(manager, step, state)
      if stopping:
        raise stop.interrupted(epoch, step)
    for s in range(step - (b1 - b0) + 1, step + 1):
      for callback in callbacks:
        callback(s)
  finite.check_loss(state, epoch, manager)
  return state


def epoch_order(run: Run, epoch: int) -> np.ndarray:
  """``[steps_per_epoch, B]`` training rows of each batch of ``epoch``: the
  whole global batch when the data is resident (every process holds it
  all), else this process's slice of it
  (:func:`synstrip_vit.input_pipeline.batch_indices`)."""
  whole = run.resident is not None
  return input_pipeline.batch_indices(
      len(run.data.x_train), run.config.run.batch_size,
      seed=run.config.run.seed, epoch=epoch,
      process_index=0 if whole else jax.process_index(),
      process_count=1 if whole else jax.process_count())


def run_steps(run: Run, state: steps.TrainState, rows: np.ndarray
              ) -> steps.TrainState:
  """The optimizer steps of the batches ``rows [K, B]`` (of
  :func:`epoch_order`), dispatched once: one compiled step with a
  host-gathered batch (``K == 1`` and the data on the host), else the chunk
  program with the batches gathered on the device (resident data, only the
  indices travel) or on the host (stacked)."""
  d = run.data
  if run.train_steps is None:
    (idx,) = rows
    batch = steps.global_batch((d.x_train[idx], d.y_train[idx]), run.mesh)
    return run.train_step(state, *batch)[0]
  if run.resident is not None:
    indices = steps.replicate(rows.astype(np.int32), run.mesh)
    return run.train_steps(state, *run.resident, indices)
  return run.train_steps(state, *steps.global_stacked_batches(
      (d.x_train[rows], d.y_train[rows]), run.mesh))


def evaluate_and_probe(run: Run, params: PyTree
                       ) -> tuple[tuple[dict, dict], PyTree]:
  """``((test sums, probe sums), dead tree)`` of ``params``.

  With ``stripping.probe='test'`` one pass over the test set gives both.

  Raises:
    FloatingPointError: a probed activation is NaN/inf (names the layer).
  """
  c, d = run.config, run.data

  def evaluate(x, y, step_fn):
    return steps.evaluate(step_fn, params, x, y,
                          batch_size=c.run.eval_batch_size, mesh=run.mesh)

  if c.stripping.probe == "test":
    test = probed = evaluate(d.x_test, d.y_test, run.probe_step)
  else:
    test = evaluate(d.x_test, d.y_test, run.eval_step)
    probed = evaluate(d.x_probe, d.y_probe, run.probe_step)
  check_finite(probed["stats"])
  dead = _dead_tree(params, probed["stats"], c.stripping.tau)
  return (test, probed), dead


@functools.partial(jax.jit, static_argnames="tau")
def _dead_tree(params: PyTree, stats: PyTree, tau: Optional[float]) -> PyTree:
  """:func:`synstrip_jax.probe.dead_tree`, one compiled program."""
  return probe.dead_tree(params, stats, tau)


def is_event_epoch(epoch: int, frequency: int) -> bool:
  """Whether a strip (or ReDo) event follows ``epoch`` (0-based): every
  ``frequency`` epochs, the first after epoch ``frequency - 1``."""
  return (epoch + 1) % frequency == 0


def strip_or_recycle(run: Run, state: steps.TrainState, stats: PyTree,
                     dead: PyTree, epoch: int
                     ) -> tuple[steps.TrainState, tuple[bool, Optional[int]]]:
  """At a stripping event epoch strip the ``dead`` neurons, then at a
  remedy event epoch apply the remedy to the probe's ``stats``
  (:func:`synstrip_vit.remedy.apply`).

  Returns the new state and ``(stripped, reset)``: ``reset`` is None
  without a remedy event, else the number of neurons the remedy reset.
  """
  c = run.config
  stripped = c.stripping.enabled and is_event_epoch(epoch,
                                                    c.stripping.frequency)
  if stripped:
    params, opt_state = run.strip(state.params, state.opt_state, dead)
    state = state.replace(params=params, opt_state=opt_state)
  reset = None
  if run.remedy is not None and is_event_epoch(epoch, c.remedy.frequency):
    state, reset = remedy_lib.apply(run.remedy, c, state, stats, epoch)
  jax.block_until_ready(state.params)
  return state, (stripped, reset)


def make_record(run: Run, state: steps.TrainState, epoch: int,
                evals: tuple[dict, dict], dead: PyTree,
                event: tuple[bool, Optional[int]],
                timings: tuple[float, float, float]) -> EpochRecord:
  """The :class:`EpochRecord` of an epoch, after its event.

  ``timings`` are the seconds spent training, evaluating and stripping.
  """
  masks = get_masks(state.opt_state) if run.config.stripping.enabled else None
  summary = jax.device_get(_summary(state.params, dead, masks))
  stripped = sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks))
  test, probed = evals
  train = jax.device_get(state.train_sums)
  step = int(state.step)
  return EpochRecord(
      epoch=epoch, step=step,
      train_loss=_mean(train, "loss_sum"), train_acc=_mean(train, "correct"),
      test_loss=_mean(test, "loss_sum"), test_acc=_mean(test, "correct"),
      probe_loss=_mean(probed, "loss_sum"),
      probe_acc=_mean(probed, "correct"),
      dead_neurons=int(summary.pop("dead_neurons")),
      strippable_neurons=sum(int(np.size(d)) for d in jax.tree.leaves(dead)),
      active_params=int(summary.pop("active_params")),
      sparsity=float(summary.pop("sparsity")),
      stripped_weights=stripped, stripped_now=event[0],
      recycled_now=event[1] is not None, remedy=run.config.remedy.name,
      recycled_neurons=event[1] or 0,
      learning_rate=float(run.schedule(step)),
      train_time_s=timings[0], eval_time_s=timings[1],
      strip_time_s=timings[2],
      per_layer={k: (float(v) if "sparsity" in k else int(v))
                 for k, v in summary.items()})


class ProgressBar:
  """A tqdm bar as a step callback; :meth:`write` prints a line above it."""

  def __init__(self, bar):
    self.bar = bar

  def __call__(self, step: int) -> None:
    """Advance the bar to global ``step``."""
    self.bar.update(step - self.bar.n)

  def write(self, line: str) -> None:
    """Print ``line`` above the bar (never into it)."""
    self.bar.write(line)


@contextlib.contextmanager
def progress_bar(run: Run, state: steps.TrainState
                 ) -> Iterator[Optional[ProgressBar]]:
  """A tqdm bar over the run's steps as a step callback (None when off)."""
  if not (run.config.run.progress_bar and run.is_main):
    yield None
    return
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=run.config.run.num_epochs * run.steps_per_epoch,
             initial=int(state.step), unit="step", dynamic_ncols=True,
             leave=False)
  try:
    yield ProgressBar(bar)
  finally:
    bar.close()


# ------------------------------------------------------------- helpers

#: :func:`synstrip_jax.metrics.summary`, one compiled program.
_summary = jax.jit(metrics.summary)


def _losses(evals: tuple[dict, dict]) -> list[tuple[str, float]]:
  """The named mean losses of ``(test sums, probe sums)``."""
  return [(name, _mean(sums, "loss_sum"))
          for name, sums in zip(("test", "probe"), evals)]


def _title(config: ml_collections.ConfigDict) -> str:
  return (f"{config.model.name} {config.model.get('activation', '')} "
          f"strip={config.stripping.enabled} on {config.data.dataset}")


__all__ = ["EpochRecord", "ProgressBar", "epoch_order", "evaluate_and_probe",
           "is_event_epoch", "make_record", "progress_bar", "run_epoch",
           "run_steps", "strip_or_recycle", "train_and_evaluate",
           "train_epoch"]
