"""The start-up of a run: data, mesh, model, optimizer and compiled steps.

:func:`prepare` builds the fixed parts of a run (:class:`Run`) and its
initial state, raising every error of the config or the data before
anything is trained or written. The init, the train step, the eval steps and
the finite-state check compile in parallel threads
(:func:`compile_in_parallel`); :func:`model_and_schedule` and
:func:`build_state` also serve the after-training evaluation
(:mod:`synstrip_vit.evaluation`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from synstrip_jax import get_masks, strip_event
from synstrip_jax.stripping import compile_strip
from synstrip_vit import config as config_lib, distributed, finite
from synstrip_vit import remedy as remedy_lib, rundata, steps
from synstrip_vit import workdir as workdir_lib
from synstrip_vit.rundata import RunData
from synstrip_vit.timings import TIMINGS_FILE, StageTimer


@dataclasses.dataclass(frozen=True)
class Run:
  """The fixed parts of a run, built once by :func:`prepare`.

  ``strip`` is ``(params, opt_state, dead) -> (params, opt_state)``;
  ``remedy`` the compiled remedy event
  (:func:`synstrip_vit.remedy.jit_remedy`; None for ``remedy.name='none'``);
  ``log`` prints on process 0 only. ``eval_step`` is ``probe_step``
  (one compile) when :func:`synstrip_vit.rundata.shares_eval_step`;
  ``schedule`` is compiled (one program instead of a dozen op-by-op ones
  per record).

  ``train_steps`` (:func:`synstrip_vit.steps.jit_train_steps`) runs a chunk
  of steps per dispatch; it is None when every step is its own dispatch
  with a host-gathered batch (``run.steps_per_dispatch == 1`` and the data
  on the host). ``resident`` is ``(x_train, y_train)`` replicated on the
  devices (:func:`synstrip_vit.rundata.resident`) or None.
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
  remedy: Optional[remedy_lib.RemedyFn]
  log: Callable[[str], None]
  train_steps: Optional[Callable] = None
  resident: Optional[tuple[jax.Array, jax.Array]] = None

  @property
  def is_main(self) -> bool:
    """Whether this is process 0 (:func:`distributed.is_main`)."""
    return distributed.is_main()

  def position(self, step: int) -> tuple[int, int]:
    """``(epoch, batch)`` of a global step: ``divmod(step,
    steps_per_epoch)``, both 0-based."""
    return divmod(int(step), self.steps_per_epoch)


def load_data(config: ml_collections.ConfigDict, *,
              timer: Optional[StageTimer] = None) -> RunData:
  """The run's data, with the batch sizes checked against it and the mesh.

  Compiles nothing: every check of the config and the data that needs no
  compiled program (this one, then the workdir's in
  :func:`synstrip_vit.resume.check_workdir`) runs before :func:`prepare`
  compiles. ``timer`` gets the ``data`` stage.

  Raises:
    ValueError: data that cannot be trained on, or a batch size that does
      not split over the devices or exceeds the training images.
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
  return run_data


def compile_notice(workdir: Path) -> str:
  """The one-line notice printed before the first compile.

  The time is the ``init_compile`` stage of the workdir's last run
  (``timings.json``) when there is one, else a rough range; a program found
  in the persistent compilation cache loads in about a second.
  """
  status, stages = workdir_lib.read_json(Path(workdir) / TIMINGS_FILE)
  seconds = (stages.get("init_compile") if status == "ok"
             and isinstance(stages, dict) else None)
  if isinstance(seconds, (int, float)):
    about = f"about {max(round(seconds), 1)} s last time in this workdir"
  else:
    about = "about 5-60 s on a CPU, depending on the model"
  return f"compiling (first run of this config: {about}; cached afterwards)"


def prepare(config: ml_collections.ConfigDict, workdir: Path,
            log: Callable[[str], None], *, timer: Optional[StageTimer] = None,
            run_data: Optional[RunData] = None
            ) -> tuple[Run, steps.TrainState]:
  """Build the mesh, model, optimizer and compiled steps of a run.

  Every error of the config or the data is raised before anything is
  compiled, trained or written (the data's in :func:`load_data`, which
  runs here unless its ``run_data`` is given). Returns the run and its
  initial (replicated) state. ``timer`` gets the ``data`` and
  ``init_compile`` stages.
  """
  timer = StageTimer() if timer is None else timer
  if run_data is None:
    run_data = load_data(config, timer=timer)
  mesh = steps.make_mesh()
  _, notice = config_lib.warmup_epochs(config)
  if notice:
    log(notice)
  augment, preprocess = rundata.input_fns(config, run_data)
  log(compile_notice(workdir))
  with timer.stage("init_compile"):
    model, schedule, tx_factory = model_and_schedule(config, run_data)
    init, key, tx = steps.init_program(model, tx_factory,
                                       run_data.image_shape, config.run.seed,
                                       remedy_lib.init_fn(config))
    train_step = steps.jit_train_step(model, tx, augment, mesh)
    on_device = rundata.resident(config, run_data)
    chunked = on_device or config.run.steps_per_dispatch > 1
    train_steps = (steps.jit_train_steps(model, tx, augment, mesh,
                                         resident=on_device)
                   if chunked else None)
    probe_step = steps.jit_eval_step(model, preprocess, mesh,
                                     collect_stats=True)
    eval_step = (probe_step if rundata.shares_eval_step(config, run_data) else
                 steps.jit_eval_step(model, preprocess, mesh,
                                     collect_stats=False))
    remedy = remedy_lib.jit_remedy(config, init.out_info.params, mesh)
    state = compile_in_parallel(
        config, run_data, mesh, init, key, None if chunked else train_step,
        (probe_step,) if eval_step is probe_step else (eval_step, probe_step),
        train_steps=train_steps, resident=on_device, remedy=remedy)
  # Called eagerly: strip_event runs one compiled program per kernel shape
  # (compiled at start-up by compile_in_parallel) and places its outputs
  # like the (replicated) inputs.
  strip = functools.partial(strip_event,
                            stripping_factor=config.stripping.factor)
  run = Run(config=config, workdir=workdir, data=run_data, mesh=mesh,
            model=model, schedule=jax.jit(schedule),
            steps_per_epoch=rundata.steps_per_epoch(config, run_data),
            train_step=train_step, eval_step=eval_step, probe_step=probe_step,
            strip=strip,
            remedy=remedy, log=log, train_steps=train_steps,
            resident=(steps.replicate((run_data.x_train, run_data.y_train),
                                      mesh) if on_device else None))
  return run, state


def first_epoch_chunks(config: ml_collections.ConfigDict, run_data: RunData
                       ) -> list[int]:
  """The distinct chunk lengths (steps per dispatch) of the first epoch:
  ``run.steps_per_dispatch``, the epoch's remainder and the cuts at
  checkpoint steps (:func:`synstrip_vit.steps.chunk_bounds`), sorted."""
  return sorted({b1 - b0 for b0, b1 in steps.chunk_bounds(
      0, 0, rundata.steps_per_epoch(config, run_data),
      config.run.steps_per_dispatch, config.run.checkpoint_every_steps)})


def compile_in_parallel(config: ml_collections.ConfigDict, run_data: RunData,
                         mesh: Mesh, init: jax.stages.Lowered, key: jax.Array,
                         train_step: Optional[Callable],
                         eval_steps: Sequence[Callable], *,
                         train_steps: Optional[Callable] = None,
                         resident: bool = False,
                         remedy: Optional[remedy_lib.RemedyFn] = None
                         ) -> steps.TrainState:
  """Compile the init, the train step or chunk program, the eval steps, the
  finite-state check, (with stripping) the strip programs and the remedy
  event in parallel threads.

  XLA compiles (and loads from the persistent cache) without holding the
  GIL, so the three overlap with each other and with the tracing of the
  steps here, in this thread, for the shapes the loop calls them with (from
  the init's traced output, before its values exist). A later call of a
  step finds the compiled program in JAX's in-memory caches. Returns the
  replicated initial state. ``train_step`` None: no per-step program.
  ``train_steps`` (:func:`synstrip_vit.steps.jit_train_steps`, over
  ``resident`` data or not) compiles for every chunk length of the first
  epoch (:func:`first_epoch_chunks`); a length met only in a later epoch (a
  checkpoint cut elsewhere) compiles at its first call.
  ``remedy`` (:func:`synstrip_vit.remedy.jit_remedy`) compiles for the
  statistics of the probe step, the last of ``eval_steps``.
  """
  abstract = steps.abstract_replicated(init.out_info, mesh)
  d, image = run_data, tuple(run_data.image_shape)
  b, e = config.run.batch_size, config.run.eval_batch_size
  eval_batch = steps.abstract_batch(
      [((e,) + image, d.x_test.dtype), ((e,), d.y_test.dtype),
       ((e,), np.bool_)], mesh)
  chunks = [] if train_steps is None else first_epoch_chunks(config, d)
  with concurrent.futures.ThreadPoolExecutor(
      max_workers=5 + len(eval_steps) + len(chunks)) as pool:
    futures = [pool.submit(init.compile)]
    if train_step is not None:
      futures.append(pool.submit(train_step.lower(
          abstract, *steps.abstract_batch(
              [((b,) + image, d.x_train.dtype), ((b,), d.y_train.dtype)],
              mesh)).compile))
    for k in chunks:
      futures.append(pool.submit(train_steps.lower(
          abstract, *steps.abstract_chunk(k, b, (d.x_train, d.y_train), mesh,
                                          resident=resident)).compile))
    lowered = [step.lower(abstract.params, *eval_batch) for step in eval_steps]
    futures.extend(pool.submit(program.compile) for program in lowered)
    if remedy is not None:
      event_key = jax.ShapeDtypeStruct((2,), np.uint32)
      futures.append(pool.submit(remedy.lower(
          abstract.params, abstract.opt_state, abstract.remedy,
          lowered[-1].out_info["stats"], event_key).compile))
    # The end-of-epoch finite-state check (and the save's): ~0.45 s of the
    # first epoch otherwise.
    futures.append(pool.submit(finite.nonfinite_check_compiler(abstract)))
    if config.stripping.enabled:
      # The eager strip events' programs: the first event compiles nothing.
      futures.append(pool.submit(compile_strip, abstract.params,
                                 get_masks(abstract.opt_state)))
    compiled_init = [f.result() for f in futures][0]
  return steps.replicate(compiled_init(key), mesh)


def model_and_schedule(config: ml_collections.ConfigDict, run_data: RunData
                        ) -> tuple[nn.Module, optax.Schedule, Callable]:
  """``(model, schedule, tx_factory)`` of a run (``targets -> optimizer``)."""
  steps_per_epoch = rundata.steps_per_epoch(config, run_data)
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


def build_state(config: ml_collections.ConfigDict, run_data: RunData,
                mesh: Mesh
                ) -> tuple[nn.Module, optax.Schedule, steps.TrainState,
                           optax.GradientTransformation]:
  """``(model, schedule, replicated initial state, optimizer)`` of a run."""
  model, schedule, tx_factory = model_and_schedule(config, run_data)
  state, tx = steps.create_train_state(model, tx_factory,
                                       run_data.image_shape, config.run.seed,
                                       remedy_lib.init_fn(config))
  return model, schedule, steps.replicate(state, mesh), tx


__all__ = ["Run", "build_state", "compile_in_parallel", "compile_notice",
           "first_epoch_chunks",
           "load_data", "model_and_schedule", "prepare"]
