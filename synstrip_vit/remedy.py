"""The run's remedy for dead and dormant neurons (the ``remedy`` section).

``remedy.name`` picks one of :mod:`synstrip_jax.remedies` (``none``,
``redo``, ``cbp``, ``shrink_perturb``; see ``docs/remedies.md``), applied
every ``remedy.frequency`` epochs to the statistics of the epoch's probe
pass, after the strip event of the same epoch if any:

* :func:`init_fn`: the remedy's running state, built inside the init
  program (continual backprop's :class:`~synstrip_jax.remedies.CBPState`,
  checkpointed in :attr:`synstrip_vit.steps.TrainState.remedy`);
* :func:`jit_remedy`: one compiled event ``(params, opt_state, remedy_state,
  stats, key) -> (params, opt_state, remedy_state, reset)``;
* :func:`apply`: the event of an epoch, with the key :func:`event_key`.

The layers handled are those of the model's ``outgoing`` map
(:func:`synstrip_vit.models.outgoing_map`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from synstrip_jax import remedies
from synstrip_jax.redo import Outgoing
from synstrip_vit import models, steps

PyTree = Any
#: ``(params, opt_state, remedy_state, stats, key) -> (params, opt_state,
#: remedy_state, reset)``; ``reset`` an int32 scalar.
RemedyFn = Callable[..., tuple[PyTree, Any, Any, jax.Array]]


def init_fn(config: ml_collections.ConfigDict
            ) -> Optional[Callable[[PyTree], Any]]:
  """``params -> TrainState.remedy`` of the run's remedy (None: no state).

  Continual backprop's is a zero :class:`~synstrip_jax.remedies.CBPState`
  for the layers with a consumer kernel; the others keep none.
  """
  if config.remedy.name != "cbp":
    return None
  name = config.model.name
  return lambda params: remedies.cbp_init(
      params, models.outgoing_map(params, name))


def event_key(seed: int, epoch: int) -> np.ndarray:
  """The raw ``uint32[2]`` key of the event after ``epoch``:
  ``fold_in(PRNGKey(seed), epoch)`` as a host value, identical on every
  process."""
  return np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), epoch))


def remedy_event(params: PyTree, opt_state: Any, remedy_state: Any,
                 stats: PyTree, key: jax.Array, *, name: str,
                 outgoing: Outgoing, section: dict[str, Any]
                 ) -> tuple[PyTree, Any, Any, jax.Array]:
  """One event of the remedy ``name`` with the fields of its ``remedy``
  ``section``; ``stats`` is the probe pass's reduced statistics tree.

  Returns ``(params, opt_state, remedy_state, reset)``: ``reset`` is the
  number of neurons reinitialised (int32; 0 for ``shrink_perturb``, which
  changes every weight and no neuron in particular).
  """
  dead = None
  if name == "redo":
    params, opt_state, dead = remedies.redo(
        params, opt_state, stats, key, outgoing=outgoing, tau=section["tau"])
  elif name == "cbp":
    params, opt_state, remedy_state, dead = remedies.cbp(
        params, opt_state, remedy_state, stats, key, outgoing=outgoing,
        replacement_rate=section["replacement_rate"],
        maturity_threshold=section["maturity_threshold"],
        decay_rate=section["decay_rate"])
  elif name == "shrink_perturb":
    params, opt_state = remedies.shrink_perturb(
        params, opt_state, stats, key, shrink=section["shrink"],
        sigma=section["sigma"])
  else:
    raise ValueError(f"unknown remedy {name!r}")
  reset = sum((jnp.sum(d, dtype=jnp.int32) for d in jax.tree.leaves(dead)),
              jnp.zeros((), jnp.int32))
  return params, opt_state, remedy_state, reset


def jit_remedy(config: ml_collections.ConfigDict, params: PyTree,
               mesh: Mesh) -> Optional[RemedyFn]:
  """:func:`remedy_event` of the config's remedy for the model of
  ``params``, compiled for the mesh (outputs replicated; params, optimizer
  and remedy state donated); None for ``remedy.name='none'``."""
  name = config.remedy.name
  if name == "none":
    return None
  fn = functools.partial(
      remedy_event, name=name,
      outgoing=models.outgoing_map(params, config.model.name),
      section=config.remedy.to_dict())
  return jax.jit(fn, out_shardings=steps.replicated(mesh),
                 donate_argnums=(0, 1, 2))


def apply(fn: RemedyFn, config: ml_collections.ConfigDict,
          state: steps.TrainState, stats: PyTree, epoch: int
          ) -> tuple[steps.TrainState, int]:
  """The remedy event ``fn`` after ``epoch``: the new state and the number
  of neurons reset."""
  params, opt_state, remedy_state, reset = fn(
      state.params, state.opt_state, state.remedy, stats,
      event_key(config.run.seed, epoch))
  state = state.replace(params=params, opt_state=opt_state,
                        remedy=remedy_state)
  return state, int(reset)


__all__ = ["RemedyFn", "apply", "event_key", "init_fn", "jit_remedy",
           "remedy_event"]
