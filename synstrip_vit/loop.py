"""The training loop of ``experiments/train_vit.py``: train, probe, strip, log.

:func:`train_and_evaluate` is a sequence of named phases (see ``DESIGN.md``)::

  prepare            data, mesh, model, optimizer, compiled steps (all errors)
  restore_or_start   config.json check, latest readable checkpoint or step 0
  per epoch:
    train_epoch        train batches -> train_step -> state (+ running sums)
    evaluate_and_probe test batches -> eval_step; probe batches ->
                       eval_step(collect_stats) -> stats -> dead tree (a
                       small test set uses the probe step: one compile)
    strip_or_recycle   at an event epoch (is_event_epoch): strip_event and/or
                       the ReDo baseline
    make_record        one typed EpochRecord -> writers (process 0)
    save               checkpoint (all processes)

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

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from synstrip_jax import metrics, probe, redo
from synstrip_jax.activations import check_finite
from synstrip_jax.transform import get_masks, strip_event
from synstrip_vit import checkpointing, config as config_lib, datasets
from synstrip_vit import input_pipeline, integrity, models, steps, writers
from synstrip_vit import workdir as workdir_lib
from synstrip_vit.augment import random_crop_flip
from synstrip_vit.timings import StageTimer

PyTree = Any
StepCallback = Callable[[int], None]
CONFIG_FILE = "config.json"


class RunError(RuntimeError):
  """A run cannot start or continue (message says why and what to do)."""


# ---------------------------------------------------------------- the data

class RunData:
  """The arrays of one run: train, probe (held-out or test) and test parts.

  Attributes:
    x_train, y_train, x_probe, y_probe, x_test, y_test: NumPy arrays (every
      process holds them; each reads only its rows of every batch).
    num_classes: number of classes.
    image_shape: ``(H, W, C)``.
    mean, std: per-channel statistics of the training part (normalisation).
    fingerprint: SHA-256 of the arrays used (after the limits), recorded
      with the run so that a resume on other data is refused.

  Raises:
    ValueError: data that cannot be trained on (no training or test images,
      an image side of 0, a constant channel).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    c = config.data
    ds = datasets.load_dataset(c.dataset, data_dir=c.data_dir or None)
    x_train, y_train = ds.x_train, ds.y_train
    x_test, y_test = ds.x_test, ds.y_test
    if c.train_limit:
      x_train, y_train = x_train[:c.train_limit], y_train[:c.train_limit]
    if c.test_limit:
      x_test, y_test = x_test[:c.test_limit], y_test[:c.test_limit]
    if len(x_train) == 0:
      raise ValueError(f"dataset {c.dataset!r} has no training images")
    if len(x_test) == 0:
      raise ValueError(f"dataset {c.dataset!r} has no test images (an empty "
                       "test split cannot be evaluated)")
    self.fingerprint = workdir_lib.data_fingerprint(
        {"x_train": x_train, "y_train": y_train, "x_test": x_test,
         "y_test": y_test})
    if config.stripping.probe == "train_holdout":
      x_train, y_train, x_probe, y_probe = input_pipeline.split_holdout(
          x_train, y_train, fraction=config.stripping.probe_fraction,
          seed=config.run.seed)
    else:
      x_probe, y_probe = x_test, y_test
    self.x_train, self.y_train = x_train, y_train
    self.x_probe, self.y_probe = x_probe, y_probe
    self.x_test, self.y_test = x_test, y_test
    self.num_classes = ds.num_classes
    self.image_shape = ds.image_shape
    self.mean, self.std = input_pipeline.channel_stats(x_train)
    input_pipeline.check_normalizable(self.mean, self.std, c.dataset)


def input_fns(config: ml_collections.ConfigDict, run_data: RunData
              ) -> tuple[Callable, Callable]:
  """``augment(key, uint8) -> float`` and ``preprocess(uint8) -> float``."""
  mean, std = jnp.asarray(run_data.mean), jnp.asarray(run_data.std)

  def preprocess(images):
    return input_pipeline.normalize(images, mean, std)

  def augment(key, images):
    if config.data.augment:
      images = random_crop_flip(key, images, padding=config.data.crop_padding,
                                flip=config.data.flip)
    return preprocess(images)

  return augment, preprocess


# ------------------------------------------------------------- the run

@dataclasses.dataclass(frozen=True)
class Run:
  """The fixed parts of a run, built once by :func:`prepare`.

  ``strip`` and ``recycle`` are ``(params, opt_state, dead[, key]) ->
  (params, opt_state)``, compiled for the mesh (``recycle`` is None without
  ReDo); ``log`` prints on process 0 only. ``eval_step`` is ``probe_step``
  (one compile) when :func:`shares_eval_step`; ``schedule`` is compiled (one
  program instead of a dozen op-by-op ones per record).
  """
  config: ml_collections.ConfigDict
  workdir: Path
  data: RunData
  mesh: Mesh
  model: nn.Module
  schedule: optax.Schedule
  steps_per_epoch: int
  train_step: Callable
  eval_step: Callable
  probe_step: Callable
  strip: Callable
  recycle: Optional[Callable]
  log: Callable[[str], None]

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class EpochRecord:
  """One line of ``metrics.jsonl``: the metrics of an epoch, typed.

  ``per_layer`` holds ``dead/<kernel>``, ``active/<kernel>`` and
  ``sparsity/<kernel>``; :meth:`as_dict` flattens it after the other fields
  (the file's keys and their order).
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
  active_params: int
  sparsity: float
  stripped_weights: int
  stripped_now: bool
  recycled_now: bool
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
            f"active {self.active_params} sparsity {self.sparsity:.4f}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       *, on_step: Optional[StepCallback] = None,
                       log: Callable[[str], None] = print,
                       timer: Optional[StageTimer] = None
                       ) -> list[dict[str, Any]]:
  """Train (or resume) the run in ``workdir``; return the per-epoch records.

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

  Raises:
    ValueError: invalid config or data (before any training).
    RunError: the workdir holds another run (other config or data), or
      metrics but no checkpoint, or its config files are unreadable.
    synstrip_vit.workdir.WorkdirError: another run is using the workdir
      (names its pid and host), or the workdir cannot be written.
    checkpointing.CheckpointError: no checkpoint can be restored.
    FloatingPointError: the training loss or the state became NaN/inf (the
      last good checkpoint is kept).
  """
  config_lib.validate(config)
  timer = StageTimer() if timer is None else timer
  is_main = jax.process_index() == 0
  workdir = Path(workdir).absolute()
  with workdir_lib.exclusive(workdir, enabled=is_main, log=log):
    return _train_and_evaluate(config, workdir, on_step=on_step, log=log,
                               timer=timer)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, *,
                        on_step: Optional[StepCallback],
                        log: Callable[[str], None], timer: StageTimer
                        ) -> list[dict[str, Any]]:
  """:func:`train_and_evaluate` once the workdir is locked."""
  is_main = jax.process_index() == 0
  if is_main:  # overlaps the compiles; plot_metrics waits for it if need be
    threading.Thread(target=writers.preload_plotting, daemon=True).start()
  run, state = prepare(config, workdir, log if is_main else (lambda _: None),
                       timer=timer)
  with timer.stage("restore"):
    state, manager, records = restore_or_start(run, state)
  first_epoch = int(state.step) // run.steps_per_epoch
  with timer.stage("writers"):
    writer = writers.make_writer(
        run.workdir, is_main=is_main,
        purge_step=first_epoch * run.steps_per_epoch + 1)
  with contextlib.ExitStack() as stack:
    stack.callback(manager.close)
    stack.callback(writer.close)
    callbacks = [cb for cb in (stack.enter_context(progress_bar(run, state)),
                               on_step) if cb is not None]
    for epoch in range(first_epoch, config.run.num_epochs):
      t0 = time.perf_counter()
      state = train_epoch(run, state, epoch, manager, callbacks)
      t1 = time.perf_counter()
      evals, dead = evaluate_and_probe(run, state.params)
      t2 = time.perf_counter()
      state, event = strip_or_recycle(run, state, dead, epoch)
      _check_state(state, epoch, manager, evals)
      timings = (t1 - t0, t2 - t1, time.perf_counter() - t2)
      record = make_record(run, state, epoch, evals, dead, event, timings)
      writer.write(record.step, record.as_dict())
      records.append(record.as_dict())
      run.log(record.summary(config.run.num_epochs))
      timer.add("epochs", time.perf_counter() - t0)
      with timer.stage("saves"):
        checkpointing.save(manager, record.step, state)
  if is_main and records:
    with timer.stage("plots"):
      writers.plot_metrics(records, run.workdir, title=_title(config))
  if is_main:
    timer.write(run.workdir)
  return records


# ------------------------------------------------------------- the phases

def prepare(config: ml_collections.ConfigDict, workdir: Path,
            log: Callable[[str], None], *, timer: Optional[StageTimer] = None
            ) -> tuple[Run, steps.TrainState]:
  """Load the data and build the mesh, model, optimizer and compiled steps.

  Every error of the config or the data is raised here, before anything is
  trained or written. Returns the run and its initial (replicated) state.
  ``timer`` gets the ``data`` and ``init_compile`` stages.
  """
  timer = StageTimer() if timer is None else timer
  with timer.stage("data"):
    run_data = RunData(config)
  mesh = steps.make_mesh()
  steps.check_batch_size(config.run.batch_size, mesh, "run.batch_size")
  steps.check_batch_size(config.run.eval_batch_size, mesh,
                         "run.eval_batch_size")
  n_train = len(run_data.x_train)
  if config.run.batch_size > n_train:
    raise ValueError(f"config.run.batch_size={config.run.batch_size} exceeds "
                     f"the {n_train} training images")
  _, notice = config_lib.warmup_epochs(config)
  if notice:
    log(notice)
  augment, preprocess = input_fns(config, run_data)
  with timer.stage("init_compile"):
    model, schedule, tx_factory = _model_and_schedule(config, run_data)
    init, key, tx = steps.init_program(model, tx_factory,
                                       run_data.image_shape, config.run.seed)
    train_step = steps.jit_train_step(model, tx, augment, mesh)
    probe_step = steps.jit_eval_step(model, preprocess, mesh,
                                     collect_stats=True)
    eval_step = (probe_step if shares_eval_step(config, run_data) else
                 steps.jit_eval_step(model, preprocess, mesh,
                                     collect_stats=False))
    state = _compile_in_parallel(
        config, run_data, mesh, init, key, train_step,
        (probe_step,) if eval_step is probe_step else (eval_step, probe_step))
  repl = steps.replicated(mesh)
  # Called eagerly: strip_event then strips on the host (NumPy over the dead
  # columns, nothing to compile; bit-identical to the compiled program) when
  # this process holds the arrays whole, else runs one compiled program per
  # kernel shape; outputs are placed like the (replicated) inputs.
  # bench/bench_strip.py: first event on the default ViT kernels 0.06 s vs
  # 0.6 s for the compiled program and 1.0 s for a jitted strip_event.
  strip = functools.partial(strip_event,
                            stripping_factor=config.stripping.factor)
  recycle = (jax.jit(functools.partial(
      redo.recycle, outgoing=models.outgoing_map(state.params,
                                                 config.model.name)),
                     out_shardings=repl, donate_argnums=(0, 1))
             if config.stripping.redo else None)
  run = Run(config=config, workdir=workdir, data=run_data, mesh=mesh,
            model=model, schedule=jax.jit(schedule),
            steps_per_epoch=n_train // config.run.batch_size,
            train_step=train_step, eval_step=eval_step, probe_step=probe_step,
            strip=strip, recycle=recycle, log=log)
  return run, state


def _restore_checked(run: Run, state: steps.TrainState, manager: Any,
                     identity: dict[str, str], config_ok: bool,
                     warn: Callable[[str], None]
                     ) -> tuple[steps.TrainState, Optional[dict[str, Any]]]:
  """``(state, checkpoint metadata)`` of the newest good checkpoint, or the
  initial ``state`` and None; refuses another run's checkpoint (identity),
  and metrics without any checkpoint."""
  restored = checkpointing.restore_latest(
      manager, state, quarantine_dir=run.workdir / "unreadable_checkpoints",
      warn=warn)
  if restored is None:
    metrics_path = run.workdir / writers.METRICS_FILE
    if integrity.read_jsonl_lenient(metrics_path) != ([], 0):
      raise RunError(f"{metrics_path} has records but {manager.directory} "
                     "holds no checkpoint: refusing to start over and "
                     "overwrite them; use another --workdir")
    return state, None
  step, state = restored
  meta = integrity.read_meta(Path(manager.directory) / str(step))
  stored = (meta or {}).get("identity")
  if isinstance(stored, dict):
    reason = workdir_lib.identity_mismatch(
        stored, identity, f"checkpoint {step} in {manager.directory}")
    if reason:
      raise RunError(reason)
  elif not config_ok:
    raise RunError(
        f"{run.workdir / CONFIG_FILE} is missing or unreadable and "
        f"checkpoint {step} records no config to check this one against; "
        "restore config.json or use another --workdir")
  epoch, batch = divmod(step, run.steps_per_epoch)
  run.log(f"resuming from checkpoint {step} (epoch {epoch + 1}, "
          f"batch {batch})")
  return state, meta


def restore_or_start(run: Run, state: steps.TrainState
                     ) -> tuple[steps.TrainState, Any, list[dict[str, Any]]]:
  """Resume from the workdir's newest good checkpoint, or start at 0.

  Checks ``config.json`` and ``run.json`` (config and data fingerprints)
  and the identity stored in the restored checkpoint, refusing a run on
  another config or other data; refuses to overwrite the metrics of a run
  whose checkpoints are gone; repairs ``metrics.jsonl`` from the records
  stored with the checkpoint and drops the records of the epochs that will
  be trained again; (re)writes ``config.json`` and ``run.json`` atomically
  when they are missing, damaged or out of date. Returns ``(state,
  checkpointer, records kept)``.
  """
  identity = _run_identity(run)
  config_ok = _check_run_files(run.workdir, run.config, identity)
  metrics_path = run.workdir / writers.METRICS_FILE
  manager = checkpointing.make_manager(
      run.workdir, max_to_keep=run.config.run.max_checkpoints)
  warn = run.log if run.is_main else (lambda _: None)
  try:
    state, meta = _restore_checked(run, state, manager, identity, config_ok,
                                   warn)
  except BaseException:
    manager.close()
    raise
  if run.is_main:
    _write_run_files(run.workdir, run.config, identity, warn)
  epoch = int(state.step) // run.steps_per_epoch
  records: list[dict[str, Any]] = []
  if run.is_main:
    records, warning = integrity.reconcile_metrics(
        metrics_path, epoch, (meta or {}).get("records"))
    if warning:
      warn(warning)

  def checkpoint_meta() -> dict[str, Any]:
    return {"identity": identity,
            "records": [{k: writers.jsonable(v) for k, v in r.items()}
                        for r in records]}

  return state, checkpointing.Checkpointer(manager, checkpoint_meta), records


def train_epoch(run: Run, state: steps.TrainState, epoch: int, manager,
                callbacks: Sequence[StepCallback]) -> steps.TrainState:
  """Train on ``epoch`` from the batch ``state.step`` points at.

  At batch 0 the running sums restart from zero. Inside the epoch (never at
  its last batch) a checkpoint is taken every
  ``run.checkpoint_every_steps`` steps; ``callbacks`` get each new step.

  Raises:
    FloatingPointError: the training loss became NaN/inf.
  """
  c, spe = run.config, run.steps_per_epoch
  start = int(state.step) - epoch * spe
  if start == 0:
    state = state.replace(train_sums=steps.replicate(steps.zero_sums(),
                                                     run.mesh))
  order = input_pipeline.batch_indices(len(run.data.x_train), c.run.batch_size,
                             seed=c.run.seed, epoch=epoch,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  every = c.run.checkpoint_every_steps
  for b in range(start, spe):
    idx = order[b]
    batch = steps.global_batch((run.data.x_train[idx],
                                run.data.y_train[idx]), run.mesh)
    state, _ = run.train_step(state, *batch)
    step = epoch * spe + b + 1  # == state.step, without waiting for it
    if every and b + 1 < spe and step % every == 0:
      _check_loss(state, epoch, manager)
      checkpointing.save(manager, step, state)
    for callback in callbacks:
      callback(step)
  _check_loss(state, epoch, manager)
  return state


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


#: Up to this many test batches, the test pass runs the probe step (which
#: also collects the activation statistics) instead of a plain eval step of
#: its own: one compile less (about a second on a 2-core CPU) for at most a
#: few batches' worth of statistics per epoch.
SHARED_EVAL_MAX_BATCHES = 8


def shares_eval_step(config: ml_collections.ConfigDict, run_data: RunData
                     ) -> bool:
  """Whether the test pass uses the probe step (see
  :data:`SHARED_EVAL_MAX_BATCHES`; always with ``stripping.probe='test'``,
  where one pass gives both). The values are the same either way."""
  batches = math.ceil(len(run_data.x_test) / config.run.eval_batch_size)
  return (config.stripping.probe == "test"
          or batches <= SHARED_EVAL_MAX_BATCHES)


def is_event_epoch(epoch: int, frequency: int) -> bool:
  """Whether a strip (or ReDo) event follows ``epoch`` (0-based): every
  ``frequency`` epochs, the first after epoch ``frequency - 1``."""
  return (epoch + 1) % frequency == 0


def strip_or_recycle(run: Run, state: steps.TrainState, dead: PyTree,
                     epoch: int) -> tuple[steps.TrainState, tuple[bool, bool]]:
  """At an event epoch, strip and/or recycle (ReDo) the dead neurons.

  Returns the new state and ``(stripped, recycled)``.
  """
  c = run.config.stripping
  if not is_event_epoch(epoch, c.frequency):
    return state, (False, False)
  if c.enabled:
    params, opt_state = run.strip(state.params, state.opt_state, dead)
    state = state.replace(params=params, opt_state=opt_state)
  if c.redo:
    # A host value, identical on every process (raw uint32[2] key).
    key = np.asarray(jax.random.fold_in(
        jax.random.PRNGKey(run.config.run.seed), epoch))
    params, opt_state = run.recycle(state.params, state.opt_state, dead, key)
    state = state.replace(params=params, opt_state=opt_state)
  jax.block_until_ready(state.params)
  return state, (c.enabled, c.redo)


def make_record(run: Run, state: steps.TrainState, epoch: int,
                evals: tuple[dict, dict], dead: PyTree,
                event: tuple[bool, bool], timings: tuple[float, float, float]
                ) -> EpochRecord:
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
      active_params=int(summary.pop("active_params")),
      sparsity=float(summary.pop("sparsity")),
      stripped_weights=stripped, stripped_now=event[0], recycled_now=event[1],
      learning_rate=float(run.schedule(step)),
      train_time_s=timings[0], eval_time_s=timings[1],
      strip_time_s=timings[2],
      per_layer={k: (float(v) if "sparsity" in k else int(v))
                 for k, v in summary.items()})


@contextlib.contextmanager
def progress_bar(run: Run, state: steps.TrainState
                 ) -> Iterator[Optional[StepCallback]]:
  """A tqdm bar over the run's steps as a step callback (None when off)."""
  if not (run.config.run.progress_bar and run.is_main):
    yield None
    return
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=run.config.run.num_epochs * run.steps_per_epoch,
             initial=int(state.step), unit="step", dynamic_ncols=True,
             leave=False)
  try:
    yield lambda _: bar.update(1)
  finally:
    bar.close()


# ------------------------------------------------------------- helpers

#: :func:`synstrip_jax.metrics.summary`, one compiled program.
_summary = jax.jit(metrics.summary)


def _mean(sums: dict[str, Any], key: str) -> float:
  return float(sums[key]) / float(sums["count"])


def _title(config: ml_collections.ConfigDict) -> str:
  return (f"{config.model.name} {config.model.get('activation', '')} "
          f"strip={config.stripping.enabled} on {config.data.dataset}")


def _run_identity(run: Run) -> dict[str, str]:
  """The config and data fingerprints of ``run`` (see ``run.json``)."""
  return workdir_lib.run_identity(
      json.loads(run.config.to_json()), run.data.fingerprint,
      run.config.data.dataset, ignored=tuple(config_lib.RESUMABLE_CHANGES))


def _check_run_files(workdir: Path, config: ml_collections.ConfigDict,
                     identity: dict[str, str]) -> bool:
  """Refuse to resume a run of another config or other data.

  Compares ``config`` with ``config.json`` and ``identity`` with
  ``run.json``, when they are readable. Returns whether ``config.json``
  or ``run.json`` was readable (so the config could be checked).

  Raises:
    RunError: the workdir holds a run with another config or other data.
  """
  status, old = workdir_lib.read_json(workdir / CONFIG_FILE)
  new = json.loads(config.to_json())
  if status == "ok" and isinstance(old, dict):
    diff = config_lib.config_diff(old, new)
    if diff:
      raise RunError(
          f"{workdir} holds a run with a different config "
          + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
          + "; use another --workdir")
  run_status, stored = workdir_lib.read_json(workdir / workdir_lib.RUN_FILE)
  if run_status == "ok" and isinstance(stored, dict):
    reason = workdir_lib.identity_mismatch(
        stored, identity, str(workdir / workdir_lib.RUN_FILE))
    if reason:
      raise RunError(reason)
  return ((status == "ok" and isinstance(old, dict))
          or (run_status == "ok" and isinstance(stored, dict)))


def _write_run_files(workdir: Path, config: ml_collections.ConfigDict,
                     identity: dict[str, str],
                     warn: Callable[[str], None]) -> None:
  """(Re)write ``config.json`` and ``run.json`` atomically when they differ."""
  for name, text in (
      (CONFIG_FILE, json.dumps(json.loads(config.to_json()), indent=2,
                               sort_keys=True)),
      (workdir_lib.RUN_FILE, json.dumps(identity, indent=2, sort_keys=True))):
    path = workdir / name
    status, reason = workdir_lib.read_json(path)
    if status == "ok" and path.read_text(encoding="utf-8") == text:
      continue
    if status == "unreadable":
      warn(f"warning: {path} was unreadable ({reason}); rewritten")
    workdir_lib.atomic_write_text(path, text)


def _check_state(state: steps.TrainState, epoch: int, manager,
                 evals: tuple[dict, dict]) -> None:
  """Raise ``FloatingPointError`` if the params or optimizer state hold a
  NaN/inf (names the leaves) or the test/probe loss is not finite (weights
  blown up to huge finite values); nothing of the epoch is written then."""
  # The whole state, as checkpointing.save checks it: one compiled program
  # serves both checks (a first-epoch compile less).
  bad = integrity.nonfinite_leaves(state)
  bad += [f"{name} loss" for name, sums in zip(("test", "probe"), evals)
          if not math.isfinite(_mean(sums, "loss_sum"))]
  if bad:
    raise FloatingPointError(
        f"the model became non-finite in epoch {epoch + 1} (NaN/inf in "
        f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); stopping. "
        f"{_last_good(manager)}; lower optimizer.learning_rate or check the "
        "data")


def _last_good(manager) -> str:
  step = manager.latest_step()
  if step is None:
    return "No checkpoint was saved (nothing to resume from)"
  return (f"The last good checkpoint (step {step}, verified finite) in "
          f"{manager.directory} is kept")


def _check_loss(state: steps.TrainState, epoch: int, manager) -> None:
  """Raise ``FloatingPointError`` if the epoch's training loss is not finite."""
  loss = float(np.asarray(state.train_sums["loss_sum"]))
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"training loss became {loss} in epoch {epoch + 1}; stopping. "
        f"{_last_good(manager)}; lower optimizer.learning_rate or check the "
        "data")


def _compile_in_parallel(config: ml_collections.ConfigDict, run_data: RunData,
                         mesh: Mesh, init: jax.stages.Lowered, key: jax.Array,
                         train_step: Callable,
                         eval_steps: Sequence[Callable]
                         ) -> steps.TrainState:
  """Compile the init, the train step, the eval steps and the finite-state
  check in parallel threads.

  XLA compiles (and loads from the persistent cache) without holding the
  GIL, so the three overlap with each other and with the tracing of the
  steps here, in this thread, for the shapes the loop calls them with (from
  the init's traced output, before its values exist). A later call of a
  step finds the compiled program in JAX's in-memory caches. Returns the
  replicated initial state.
  """
  abstract = steps.abstract_replicated(init.out_info, mesh)
  d, image = run_data, tuple(run_data.image_shape)
  b, e = config.run.batch_size, config.run.eval_batch_size
  eval_batch = steps.abstract_batch(
      [((e,) + image, d.x_test.dtype), ((e,), d.y_test.dtype),
       ((e,), np.bool_)], mesh)
  with concurrent.futures.ThreadPoolExecutor(
      max_workers=3 + len(eval_steps)) as pool:
    futures = [pool.submit(init.compile)]
    futures.append(pool.submit(train_step.lower(abstract, *steps.abstract_batch(
        [((b,) + image, d.x_train.dtype), ((b,), d.y_train.dtype)],
        mesh)).compile))
    for step in eval_steps:
      futures.append(pool.submit(
          step.lower(abstract.params, *eval_batch).compile))
    # The end-of-epoch finite-state check (and the save's): ~0.45 s of the
    # first epoch otherwise.
    futures.append(pool.submit(integrity.nonfinite_check_compiler(abstract)))
    compiled_init = [f.result() for f in futures][0]
  return steps.replicate(compiled_init(key), mesh)


def _model_and_schedule(config: ml_collections.ConfigDict, run_data: RunData
                        ) -> tuple[nn.Module, optax.Schedule, Callable]:
  """``(model, schedule, tx_factory)`` of a run (``targets -> optimizer``)."""
  steps_per_epoch = max(len(run_data.x_train) // config.run.batch_size, 1)
  model = config_lib.create_model(config.model, run_data.num_classes)
  warmup, _ = config_lib.warmup_epochs(config)
  schedule = steps.make_schedule(
      learning_rate=config.optimizer.learning_rate,
      min_learning_rate=config.optimizer.min_learning_rate,
      warmup_steps=warmup * steps_per_epoch,
      total_steps=config.run.num_epochs * steps_per_epoch)

  def tx_factory(targets):
    return steps.make_optimizer(
        schedule, weight_decay=config.optimizer.weight_decay,
        targets=targets, strip=config.stripping.enabled)

  return model, schedule, tx_factory


def _build(config: ml_collections.ConfigDict, run_data: RunData, mesh: Mesh):
  """``(model, schedule, replicated initial state, optimizer)`` of a run."""
  model, schedule, tx_factory = _model_and_schedule(config, run_data)
  state, tx = steps.create_train_state(model, tx_factory,
                                       run_data.image_shape, config.run.seed)
  return model, schedule, steps.replicate(state, mesh), tx


def final_state(config: ml_collections.ConfigDict, workdir: str | Path
                ) -> tuple[steps.TrainState, nn.Module, RunData]:
  """``(state, model, run_data)`` of a run's latest checkpoint."""
  run_data = RunData(config)
  model, _, state, _ = _build(config, run_data, steps.make_mesh())
  manager = checkpointing.make_manager(workdir)
  restored = checkpointing.restore_latest(manager, state)
  manager.close()
  if restored is None:
    raise checkpointing.CheckpointError(f"no checkpoint in {workdir}")
  return restored[1], model, run_data


def final_evaluator(config: ml_collections.ConfigDict, workdir: str | Path,
                    *, collect_stats: bool
                    ) -> tuple[steps.TrainState, RunData, Callable]:
  """``(state, run_data, evaluate)`` of a run's latest checkpoint.

  ``evaluate(x, y)`` runs the compiled eval step (with the activation
  statistics when ``collect_stats``) over every example of ``(x, y)`` and
  returns its outputs summed (:func:`synstrip_vit.steps.evaluate`).
  """
  state, model, run_data = final_state(config, workdir)
  mesh = steps.make_mesh()
  _, preprocess = input_fns(config, run_data)
  step = steps.jit_eval_step(model, preprocess, mesh,
                             collect_stats=collect_stats)

  def evaluate(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    return steps.evaluate(step, state.params, x, y,
                          batch_size=config.run.eval_batch_size, mesh=mesh)

  return state, run_data, evaluate


__all__ = ["EpochRecord", "Run", "RunData", "RunError",
           "SHARED_EVAL_MAX_BATCHES", "evaluate_and_probe", "final_evaluator",
           "final_state",
           "input_fns", "is_event_epoch", "make_record", "prepare",
           "progress_bar", "restore_or_start", "shares_eval_step",
           "strip_or_recycle", "train_and_evaluate", "train_epoch"]
