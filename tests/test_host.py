"""The host (NumPy) strip path is bit-identical to the compiled XLA program.

``strip_params`` computes eager calls on the host by default
(``synstrip_jax._host``) and traced calls with XLA; these tests hold the two
to the same bits on the values where they could differ: FMA rounding of the
lerp, subnormals (XLA:CPU flushes them), infinities, signed zeros, ties,
NaN weights (skipped) and masks.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synstrip_jax import _host, stripping
from synstrip_jax.stripping import strip_params

SHAPES = [(1, 1), (1, 7), (9, 4), (33, 5), (2, 3, 4, 6)]
FACTORS = [0.0, 0.05, 1 / 3, 0.5, 0.999, 1.0]
TINY = float(np.finfo(np.float32).tiny)
MAX = float(np.finfo(np.float32).max)

# Every kind of float32 the two paths could treat differently.
_normal = st.floats(min_value=TINY, max_value=MAX, width=32)
_subnormal = st.floats(min_value=float(np.float32(1e-45)),
                       max_value=float(np.float32(TINY / 2)), width=32)
_magnitude = st.one_of(_normal, _normal, _subnormal, st.just(float("inf")))
_value = st.one_of(st.sampled_from([0.0, -0.0]),
                   st.builds(lambda m, s: s * m, _magnitude,
                             st.sampled_from([-1.0, 1.0])))


@st.composite
def cases(draw):
  shape = draw(st.sampled_from(SHAPES))
  if draw(st.booleans()):  # a few distinct values: ties at the quantile
    pool = draw(st.lists(_value, min_size=1, max_size=4))
    elements = st.sampled_from(pool)
  else:
    elements = _value
  kernel = draw(hnp.arrays(np.float32, shape, elements=elements))
  if draw(st.integers(0, 5)) == 0:  # a NaN weight somewhere
    kernel.reshape(-1)[draw(st.integers(0, kernel.size - 1))] = np.nan
  dead = draw(hnp.arrays(np.bool_, (shape[-1],)))
  mask = draw(hnp.arrays(np.bool_, shape)) if draw(st.booleans()) else None
  return kernel, dead, mask, draw(st.sampled_from(FACTORS))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_host_kernel_equals_compiled_program(case):
  kernel, dead, mask, q = case
  table = stripping.quantile_table(stripping._fan_in(kernel), q)
  full = np.ones(kernel.shape, np.bool_) if mask is None else mask
  want_k, want_m, _, want_skip = stripping._strip_kernel_jit(
      kernel, dead, full, table)
  lo, hi, w, _ = stripping._interpolation_table(stripping._fan_in(kernel), q)
  got_k, got_m, got_skip = _host.strip_kernel(kernel, dead, mask, (lo, hi, w))
  np.testing.assert_array_equal(np.asarray(want_k).view(np.uint32),
                                got_k.view(np.uint32))
  np.testing.assert_array_equal(np.asarray(want_m), got_m)
  np.testing.assert_array_equal(np.asarray(want_skip), got_skip)


def test_lerp_is_one_fma_rounding_like_xla():
  """200,000 random lerps: the host's exact FMA gives XLA's bits; a plain
  two-rounding NumPy lerp does not (so this test can tell them apart)."""
  rng = np.random.default_rng(0)
  n = 200_000
  a = rng.normal(size=n).astype(np.float32)
  scale = np.float32(10.0) ** rng.integers(-8, 2, n).astype(np.float32)
  b = a + np.abs(rng.normal(size=n)).astype(np.float32) * scale
  w = rng.random(n).astype(np.float32)

  @jax.jit
  def xla_lerp(a, b, w):
    d = b - a
    return jnp.where(w < 0.5, a + w * d, b - d * (1.0 - w))

  want = np.asarray(xla_lerp(a, b, w)).view(np.uint32)
  np.testing.assert_array_equal(_host._lerp(a, b, w).view(np.uint32), want)
  d = b - a
  naive = np.where(w < 0.5, a + w * d, b - d * (np.float32(1) - w))
  assert (naive.astype(np.float32).view(np.uint32) != want).sum() > 100


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strip_params_host_and_compiled_agree_on_a_tree(dtype):
  rng = np.random.default_rng(3)
  params = {"a": {"kernel": jnp.asarray(rng.normal(size=(30, 17)), dtype),
                  "bias": jnp.zeros(17, dtype)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), dtype)}}
  dead = {"a": {"kernel": jnp.asarray(rng.random(17) < 0.5), "bias": None},
          "b": {"kernel": jnp.asarray(rng.random(8) < 0.5)}}
  host = strip_params(params, dead, stripping_factor=0.2, method="host")
  comp = strip_params(params, dead, stripping_factor=0.2, method="compiled")
  for h, c in zip(jax.tree.leaves(host), jax.tree.leaves(comp)):
    assert h.dtype == c.dtype and h.shape == c.shape
    np.testing.assert_array_equal(np.asarray(h).view(np.uint8),
                                  np.asarray(c).view(np.uint8))


def test_host_processes_only_dead_columns():
  """A kernel without dead neurons comes back bit for bit, mask all True."""
  k = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  lo, hi, w, _ = stripping._interpolation_table(6, 0.5)
  new_k, new_m, skipped = _host.strip_kernel(k, np.zeros(5, bool), None,
                                             (lo, hi, w))
  np.testing.assert_array_equal(new_k.view(np.uint32), k.view(np.uint32))
  assert new_m.all() and not skipped.any()
