"""Reusable pieces of a training run: state, optimizer, steps, sharding.

The loop itself lives in :mod:`synstrip_vit.loop`; everything here is a
pure function (or a jit-compiled one) of explicit arguments. Data parallelism
is plain ``jax.jit`` over a 1-D mesh ``('data',)`` spanning every device of
every process: batches are sharded over ``'data'``, the train state is
replicated, and XLA inserts the gradient all-reduce. The same code runs on 1
or N devices and hosts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from synstrip_jax import linen as ss_linen, probe
from synstrip_vit import input_pipeline
from synstrip_jax.transform import with_stripping

PyTree = Any
DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a step needs and a checkpoint holds.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: the model parameters (float32).
    opt_state: the optimizer state; holds the stripping masks.
    rng: ``uint32[2]`` raw PRNG key (dropout, augmentation), folded with
      ``step`` at every step, so a resumed run draws the same numbers.
    train_sums: running sums of the current epoch's training metrics
      (``loss_sum``, ``correct``, ``count``; see :func:`zero_sums`), added
      to by every :func:`train_step` and reset at each epoch start; a
      checkpoint taken inside an epoch carries them, so a resumed epoch
      reports what an uninterrupted one does.
    remedy: the running state of the run's remedy
      (:func:`synstrip_vit.remedy.init_fn`: a
      :class:`~synstrip_jax.remedies.CBPState` for continual backprop),
      None for a remedy without one.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  train_sums: dict[str, jax.Array]
  remedy: Any = None


def zero_sums() -> dict[str, jax.Array]:
  """Empty training sums: ``loss_sum`` (f32), ``correct`` (i32), ``count``."""
  return {"loss_sum": jnp.zeros((), jnp.float32),
          "correct": jnp.zeros((), jnp.int32),
          "count": jnp.zeros((), jnp.float32)}


# ------------------------------------------------------------------ devices

def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D ``('data',)`` mesh over ``devices`` (default: every device)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raise ``ValueError`` unless the batch splits evenly over the devices."""
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(f"{what}={global_batch_size} must be a positive multiple "
                     f"of the device count {n} (one equal shard per device)")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{what}={global_batch_size} must be divisible by the "
                     f"process count {jax.process_count()}")


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Place ``tree`` (e.g. a fresh :class:`TrainState`) replicated on ``mesh``.

  :func:`jit_train_step` donates its state; a state already laid out as the
  step wants it is donated in place instead of being copied first (which
  also warns that the donated buffers were not usable). Host values must be
  identical on every process (each process builds its own copy of the
  initial state from the same seed); they become global arrays, which works
  with one process or many.
  """
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)


def global_batch(local: PyTree, mesh: Mesh) -> PyTree:
  """Assemble per-process host arrays into global arrays sharded on ``'data'``.

  Each process passes its own slice (``global_batch // process_count`` rows);
  with one process this is a plain sharded ``device_put``.
  """
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local)


# ---------------------------------------------------------------- optimizer

def make_schedule(*, learning_rate: float, min_learning_rate: float,
                  warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``learning_rate``, then cosine to the minimum.

  The original uses 5 warm-up epochs then cosine annealing to 1e-5.
  """
  warmup_steps = max(int(warmup_steps), 0)
  decay_steps = max(int(total_steps), warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=decay_steps, end_value=min_learning_rate)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float,
                   targets: PyTree, strip: bool) -> optax.GradientTransformation:
  """AdamW (the original's optimizer), wrapped in ``with_stripping``.

  The stripping wrapper is present in both arms, so the state is always a
  :class:`~synstrip_jax.transform.StrippingState` around the AdamW state and
  ``get_masks`` works on either. With ``strip=True`` the state holds an
  all-True keep-mask at every targeted kernel; with ``strip=False`` no kernel
  is targeted, the masks tree holds only ``None`` (no mask array, no masking
  work in the update) and :func:`~synstrip_jax.transform.strip_event` refuses
  to strip.

  Args:
    schedule: learning-rate schedule (e.g. :func:`make_schedule`); it is
      injected as a hyperparameter, so the current rate sits in the state.
    weight_decay: AdamW's decoupled weight decay (applied to every param).
    targets: bool tree of the strippable kernels (as given to ``tx_factory``
      by :func:`create_train_state`) or a callable ``params -> bool tree``.
    strip: whether the targeted kernels are stripped.
  """
  inner = optax.inject_hyperparams(optax.adamw)(
      learning_rate=schedule, weight_decay=weight_decay)
  if not strip:
    targets = _no_targets
  return with_stripping(inner, targets)


def _no_targets(params: PyTree) -> PyTree:
  return jax.tree.map(lambda _: False, params)


def init_program(model: nn.Module,
                 tx_factory: Callable[[PyTree], optax.GradientTransformation],
                 image_shape: tuple[int, ...], seed: int,
                 remedy_init: Optional[Callable[[PyTree], Any]] = None
                 ) -> tuple[jax.stages.Lowered, jax.Array,
                            optax.GradientTransformation]:
  """The traced (not yet compiled) program of :func:`create_train_state`.

  Returns ``(lowered, key, tx)``: ``lowered.compile()(key)`` is the initial
  :class:`TrainState`; ``lowered.out_info`` its shapes (to trace the steps
  before the init is compiled); ``tx`` the optimizer. ``remedy_init``:
  ``params -> TrainState.remedy`` (None: no remedy state).
  """
  built = {}

  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    variables = model.init({"params": init_rng}, x, train=False)
    params = variables["params"]
    # Only the paths of the activations are used: the optimizer (a Python
    # object) is built here, at trace time, from the traced structure.
    built["tx"] = tx = tx_factory(
        probe.target_tree(params, variables[ss_linen.ACTIVATIONS]))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng,
                      train_sums=zero_sums(),
                      remedy=remedy_init(params) if remedy_init else None)

  key = jax.random.PRNGKey(seed)
  lowered = jax.jit(init).lower(key)
  return lowered, key, built["tx"]


def create_train_state(model: nn.Module,
                       tx_factory: Callable[[PyTree], optax.GradientTransformation],
                       image_shape: tuple[int, ...], seed: int,
                       remedy_init: Optional[Callable[[PyTree], Any]] = None
                       ) -> tuple[TrainState, optax.GradientTransformation]:
  """Initialise params and optimizer state (host-side, unsharded).

  One compiled program (:func:`init_program`) builds the whole state from
  the seed's key: the params (``model.init``; its forward pass only gives
  the structure of the sown activations, so XLA drops it), the optimizer
  state and the rest. The values are those of ``model.init`` and ``tx.init``
  called one by one; one program without the forward pass just compiles
  faster.

  Args:
    model: a Linen model with ``__call__(x, *, train)`` whose strippable
      layers are :class:`~synstrip_jax.ss_linen.ActDense`.
    tx_factory: ``targets -> optimizer``; ``targets`` is the bool tree of the
      kernels that feed sown activations.
    image_shape: ``(H, W, C)``.
    seed: the run's seed.
    remedy_init: see :func:`init_program`.
  """
  lowered, key, tx = init_program(model, tx_factory, image_shape, seed,
                                  remedy_init)
  return lowered.compile()(key), tx


def abstract_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Shapes of ``tree`` (arrays or ``ShapeDtypeStruct``) as :func:`replicate`
  lays them out: to trace and compile a step before the values exist."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def abstract_batch(shapes_dtypes: Sequence[tuple[tuple[int, ...], Any]],
                   mesh: Mesh) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Global batch shapes as :func:`global_batch` lays them out."""
  sharding = data_sharded(mesh)
  return tuple(jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype),
                                    sharding=sharding)
               for shape, dtype in shapes_dtypes)


# -------------------------------------------------------------------- steps

def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``[B, K], [B] -> [B]`` float32 softmax cross-entropy."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               augment: Callable[[jax.Array, jax.Array], jax.Array]
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a (global, data-sharded) batch.

  Args:
    state: replicated train state.
    images: ``[B, H, W, C]`` uint8, sharded over the batch.
    labels: ``[B]`` int32.
    model, tx: static.
    augment: ``(key, uint8 images) -> float32 normalised images``.

  Returns:
    ``(state, metrics)``: ``metrics`` holds ``loss_sum``, ``correct`` and
    ``count`` (sums over the batch, so epochs aggregate exactly); the new
    state's ``train_sums`` are the old ones plus ``metrics``.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, dropout_rng = jax.random.split(rng)
  x = augment(aug_rng, images)

  def loss_fn(params):
    # The 'activations' collection is not mutable here, so ActDense's sow is
    # a no-op; the statistics it computes are unused and XLA removes them
    # (bench/bench_train.py counts 0 activation-shaped is-finite ops here).
    logits = model.apply({"params": params}, x, train=True,
                         rngs={"dropout": dropout_rng})
    losses = cross_entropy(logits, labels)
    return jnp.mean(losses), (losses, logits)

  (_, (losses, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss_sum": jnp.sum(losses),
      "correct": jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.int32),
      "count": jnp.asarray(labels.shape[0], jnp.float32),
  }
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state,
                       train_sums=accumulate(state.train_sums, metrics)
                       ), metrics


def eval_step(params: PyTree, images: jax.Array, labels: jax.Array,
              valid: jax.Array, *, model: nn.Module,
              preprocess: Callable[[jax.Array], jax.Array],
              collect_stats: bool) -> dict[str, Any]:
  """Evaluate a batch; optionally collect the activation statistics.

  Args:
    params: replicated params.
    images: ``[B, H, W, C]`` uint8; ``labels``: ``[B]``; ``valid``: ``[B]``
      bool, False for padding rows of a last partial batch.
    collect_stats: also return ``stats``, the per-layer
      :class:`~synstrip_jax.activations.ActivationStats` summed over the valid
      examples (the probe pass for dead neurons).

  Returns:
    ``loss_sum``, ``correct``, ``count`` (over valid rows) and, if asked,
    ``stats``.
  """
  x = preprocess(images)
  valid = jnp.asarray(valid, jnp.bool_)
  if valid.shape != labels.shape:
    raise ValueError(f"valid has shape {valid.shape}, expected {labels.shape} "
                     "(one flag per example)")
  if collect_stats:
    logits, state = model.apply({"params": params}, x, train=False,
                                mutable=[ss_linen.ACTIVATIONS])
  else:
    logits = model.apply({"params": params}, x, train=False)
  losses = cross_entropy(logits, labels)
  out = {
      # where, not a product: a padding row's loss never leaks in (inf * 0).
      "loss_sum": jnp.sum(jnp.where(valid, losses, 0.0)),
      "correct": jnp.sum((jnp.argmax(logits, -1) == labels) & valid,
                         dtype=jnp.int32),
      "count": jnp.sum(valid, dtype=jnp.float32),
  }
  if collect_stats:
    out["stats"] = probe.reduce_stats_tree(
        ss_linen.linen_stats(state), where=valid)
  return out


def jit_train_step(model, tx, augment, mesh: Mesh):
  """``train_step`` compiled for the mesh: state replicated, batch sharded."""
  repl, data = replicated(mesh), data_sharded(mesh)
  fn = functools.partial(train_step, model=model, tx=tx, augment=augment)
  return jax.jit(fn, in_shardings=(repl, data, data),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def train_steps(state: TrainState, images: jax.Array, labels: jax.Array, *,
                step: Callable) -> TrainState:
  """``K`` optimizer steps in one program: ``lax.scan`` of ``step`` over
  ``images [K, B, H, W, C]`` and ``labels [K, B]``."""
  def body(carry, batch):
    return step(carry, *batch)[0], None
  return jax.lax.scan(body, state, (images, labels))[0]


def train_steps_gather(state: TrainState, x_all: jax.Array, y_all: jax.Array,
                       indices: jax.Array, *, step: Callable, mesh: Mesh
                       ) -> TrainState:
  """``K`` optimizer steps on batches gathered on the device.

  ``x_all [N, H, W, C]``/``y_all [N]`` are the training arrays, resident
  (replicated) on the devices; ``indices [K, B]`` the rows of each global
  batch. Each scanned step gathers its batch, lays it out over ``'data'``
  and calls ``step``: nothing travels between host and device per step.
  """
  sharding = data_sharded(mesh)

  def body(carry, idx):
    batch = (jax.lax.with_sharding_constraint(x_all[idx], sharding),
             jax.lax.with_sharding_constraint(y_all[idx], sharding))
    return step(carry, *batch)[0], None
  return jax.lax.scan(body, state, indices)[0]


def jit_train_steps(model, tx, augment, mesh: Mesh, *, resident: bool):
  """:func:`train_steps_gather` (``resident``: ``(state, x_all, y_all,
  indices)``, all replicated) or :func:`train_steps` (``(state, images
  [K, B, ...], labels [K, B])``, sharded on the batch axis) compiled for the
  mesh; the state is donated."""
  repl = replicated(mesh)
  step = functools.partial(train_step, model=model, tx=tx, augment=augment)
  if resident:
    fn = functools.partial(train_steps_gather, step=step, mesh=mesh)
    in_shardings = (repl, repl, repl, repl)
  else:
    fn = functools.partial(train_steps, step=step)
    stacked = NamedSharding(mesh, P(None, DATA_AXIS))
    in_shardings = (repl, stacked, stacked)
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=repl,
                 donate_argnums=(0,))


def chunk_bounds(first_step: int, start: int, stop: int, per_dispatch: int,
                 every: int) -> list[tuple[int, int]]:
  """``[(b0, b1), ...]`` batches of an epoch run per dispatch.

  Batches ``start..stop-1`` of the epoch whose first global step is
  ``first_step``, cut after every multiple of ``per_dispatch`` (counted from
  the epoch's start, so a resumed epoch runs the same chunks) and after
  every checkpoint step (global step a multiple of ``every`` > 0).
  """
  cuts = sorted({b for b in range(start + 1, stop)
                 if b % per_dispatch == 0
                 or (every and (first_step + b) % every == 0)} | {stop})
  return list(zip([start] + cuts[:-1], cuts))


def abstract_chunk(k: int, batch_size: int,
                   train: tuple[np.ndarray, np.ndarray], mesh: Mesh, *,
                   resident: bool) -> tuple[jax.ShapeDtypeStruct, ...]:
  """The data arguments of a :func:`jit_train_steps` call of ``k`` steps of
  global batch ``batch_size``, as the loop passes them: ``resident``, the
  training arrays ``train = (x, y)`` replicated and ``[k, B]`` int32
  indices; else ``[k, B, ...]`` images and ``[k, B]`` labels sharded on
  axis 1 (:func:`global_stacked_batches`)."""
  x, y = train
  if resident:
    repl = replicated(mesh)
    return tuple(jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=repl)
                 for shape, dtype in ((x.shape, x.dtype), (y.shape, y.dtype),
                                      ((k, batch_size), np.int32)))
  stacked = NamedSharding(mesh, P(None, DATA_AXIS))
  return (jax.ShapeDtypeStruct((k, batch_size) + x.shape[1:], x.dtype,
                               sharding=stacked),
          jax.ShapeDtypeStruct((k, batch_size), y.dtype, sharding=stacked))


def global_stacked_batches(local: PyTree, mesh: Mesh) -> PyTree:
  """:func:`global_batch` for ``[K, local_batch, ...]`` stacks of batches
  (sharded on axis 1)."""
  sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local)


def jit_eval_step(model, preprocess, mesh: Mesh, *, collect_stats: bool):
  """``eval_step`` compiled for the mesh (params replicated, batch sharded)."""
  repl, data = replicated(mesh), data_sharded(mesh)
  fn = functools.partial(eval_step, model=model, preprocess=preprocess,
                         collect_stats=collect_stats)
  return jax.jit(fn, in_shardings=(repl, data, data, data),
                 out_shardings=repl)


def evaluate(step_fn: Callable[..., dict], params: PyTree, x: np.ndarray,
             y: np.ndarray, *, batch_size: int, mesh: Mesh) -> dict[str, Any]:
  """Run a :func:`jit_eval_step` over every example of ``(x, y)`` once.

  Fixed-shape padded batches
  (:func:`synstrip_vit.input_pipeline.eval_batches`), each process feeding
  its rows; returns the step's outputs summed over batches.
  """
  batches = input_pipeline.eval_batches(len(x), batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
  total = None
  for idx, valid in zip(batches.indices, batches.valid):
    out = step_fn(params, *global_batch((x[idx], y[idx], valid), mesh))
    total = accumulate(total, out)
  return total


@jax.jit
def _add_trees(a: PyTree, b: PyTree) -> PyTree:
  """``a + b`` leaf by leaf, one compiled program (not one per leaf shape)."""
  return jax.tree.map(jnp.add, a, b)


def accumulate(total: Optional[PyTree], new: PyTree) -> PyTree:
  """Sum two metric/statistic trees (``total=None`` starts the sum)."""
  return new if total is None else _add_trees(total, new)


__all__ = ["DATA_AXIS", "TrainState", "abstract_batch", "abstract_chunk",
           "abstract_replicated", "accumulate", "check_batch_size",
           "chunk_bounds", "create_train_state",
           "cross_entropy", "data_sharded", "eval_step", "evaluate",
           "global_batch", "global_stacked_batches", "init_program",
           "jit_eval_step", "jit_train_step", "jit_train_steps",
           "make_mesh", "make_optimizer", "make_schedule", "replicate",
           "replicated", "train_step", "train_steps", "train_steps_gather",
           "zero_sums"]
