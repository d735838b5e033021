"""Unit tests of strip_params / strip_kernel, and equivalence with the original."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _shared import assert_bitwise_equal
from conftest import dead_tree, normal, random_dead, small_dead, small_params
from synstrip_jax import stripping
from synstrip_jax.stripping import strip_kernel, strip_params

STRIP_CASES = ["lin64x32_f005", "lin64x32_f05", "lin64x32_pert_f005",
               "lin64x32_pert_f02", "ties_f005", "ties_f025", "ties_f05",
               "tiny_f005", "tiny_f05"]


def replay(reference, case, strip_fn):
  """Replay a fixture case as its README says; yield per-iteration results."""
  g = lambda name: reference[f"{case}__{name}"]
  w = g("weight0").T.copy()  # PyTorch [out, in] -> Flax [in, out]
  mask = np.ones_like(w, bool)
  dead = g("dead")
  q = float(g("factor"))
  for k in range(1, int(g("iterations")) + 1):
    if f"{case}__noise_{k}" in reference:
      w = w + g(f"noise_{k}").T * mask
    w, mask, thr = strip_fn(w, dead, mask, q)
    w, mask, thr = np.asarray(w), np.asarray(mask), np.asarray(thr)
    yield k, w, mask, thr, g(f"weight_{k}").T, g(f"mask_{k}").T, g(f"thresholds_{k}")


@pytest.mark.parametrize("case", STRIP_CASES)
def test_matches_original_bit_for_bit(reference, case):
  def fn(w, dead, mask, q):
    return strip_kernel(jnp.asarray(w), jnp.asarray(dead), jnp.asarray(mask),
                        stripping_factor=q)
  n = 0
  for k, w, mask, thr, ref_w, ref_mask, ref_thr in replay(reference, case, fn):
    np.testing.assert_array_equal(mask, ref_mask, err_msg=f"{case} mask_{k}")
    np.testing.assert_array_equal(w, ref_w, err_msg=f"{case} weight_{k}")
    # Exact, NaN for live rows on both sides.
    np.testing.assert_array_equal(thr, ref_thr, err_msg=f"{case} thresholds_{k}")
    n += 1
  assert n >= 2


@pytest.mark.parametrize("case", ["lin64x32_pert_f02", "ties_f025", "tiny_f05"])
def test_matches_original_through_strip_params_tree(reference, case):
  def fn(w, dead, mask, q):
    params = {"layer": {"kernel": jnp.asarray(w), "bias": jnp.ones(w.shape[1])}}
    dead_t = {"layer": {"kernel": jnp.asarray(dead), "bias": None}}
    masks = {"layer": {"kernel": jnp.asarray(mask), "bias": None}}
    new_p, new_m = jax.jit(strip_params, static_argnames="stripping_factor")(
        params, dead_t, masks, stripping_factor=q)
    np.testing.assert_array_equal(new_p["layer"]["bias"], 1.0)
    return new_p["layer"]["kernel"], new_m["layer"]["kernel"], np.zeros(w.shape[1])
  for k, w, mask, _, ref_w, ref_mask, _ in replay(reference, case, fn):
    np.testing.assert_array_equal(mask, ref_mask, err_msg=f"{case} mask_{k}")
    np.testing.assert_array_equal(w, ref_w, err_msg=f"{case} weight_{k}")


def test_all_zero_dead_row_is_left_alone(reference):
  # The original raises here (documented deviation); we leave the row as is.
  assert "non-empty" in str(reference["all_zero_row_behaviour"])
  w = jnp.zeros((5, 3)).at[:, 1].set(jnp.arange(1.0, 6.0))
  dead = jnp.array([True, True, False])
  new_w, mask, thr = strip_kernel(w, dead, jnp.ones((5, 3), bool),
                                  stripping_factor=0.5)
  assert np.isnan(thr[0]) and np.isnan(thr[2]) and float(thr[1]) == 3.0
  np.testing.assert_array_equal(mask[:, 0], True)
  np.testing.assert_array_equal(new_w[:, 1], [0, 0, 3, 4, 5])


# The small model of conftest: "fc1" [12, 8] and "conv" [3, 3, 2, 6] are
# stripped, "head" is not.


@pytest.mark.parametrize("dtype", [
    jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_dense_and_conv_kernels(dtype):
  params = small_params(dtype=dtype)
  dead = small_dead(fc1=jnp.arange(8) % 2 == 0,
                    conv=jnp.array([True, False] * 3))
  new_p, masks = strip_params(params, dead, stripping_factor=0.25)
  for name in ("fc1", "conv"):
    k, m = new_p[name]["kernel"], masks[name]["kernel"]
    assert k.shape == params[name]["kernel"].shape and k.dtype == dtype
    assert m.dtype == jnp.bool_ and m.shape == k.shape
    d = dead[name]["kernel"]
    # Live neurons untouched; dead neurons lost about a quarter of fan-in.
    np.testing.assert_array_equal(np.asarray(m)[..., ~np.asarray(d)], True)
    np.testing.assert_array_equal(
        np.asarray(k, np.float32)[..., ~np.asarray(d)],
        np.asarray(params[name]["kernel"], np.float32)[..., ~np.asarray(d)])
    fan_in = int(np.prod(k.shape[:-1]))
    pruned = (~np.asarray(m)).reshape(fan_in, -1).sum(0)[np.asarray(d)]
    expected = int(np.floor(0.25 * (fan_in - 1))) + 1
    assert np.all(np.abs(pruned - expected) <= 1), pruned
    assert np.all(np.asarray(k, np.float32)[~np.asarray(m)] == 0)
  assert masks["head"]["kernel"] is None and masks["fc1"]["bias"] is None
  assert new_p["head"]["kernel"] is params["head"]["kernel"]


def test_conv_kernel_flattens_all_fan_in_axes():
  params = small_params()
  dead = small_dead(conv=jnp.ones(6, bool))
  _, masks = strip_params(params, dead, stripping_factor=0.5)
  _, flat_mask, _ = strip_kernel(params["conv"]["kernel"].reshape(18, 6),
                                 jnp.ones(6, bool), jnp.ones((18, 6), bool),
                                 stripping_factor=0.5)
  np.testing.assert_array_equal(masks["conv"]["kernel"].reshape(18, 6), flat_mask)


def test_masks_only_shrink_and_pruned_weights_stay_zero():
  params = small_params()
  dead = small_dead(fc1=jnp.ones(8, bool))
  p1, m1 = strip_params(params, dead, stripping_factor=0.1)
  # Pretend training moved a pruned weight: the old mask still applies.
  tampered = jax.tree.map(lambda x: x, p1)
  tampered["fc1"]["kernel"] = jnp.where(m1["fc1"]["kernel"], p1["fc1"]["kernel"], 7.0)
  p2, m2 = strip_params(tampered, dead, m1, stripping_factor=0.1)
  assert not np.any(np.asarray(m2["fc1"]["kernel"]) & ~np.asarray(m1["fc1"]["kernel"]))
  assert np.all(np.asarray(p2["fc1"]["kernel"])[~np.asarray(m2["fc1"]["kernel"])] == 0)
  assert (~np.asarray(m2["fc1"]["kernel"])).sum() > (~np.asarray(m1["fc1"]["kernel"])).sum()


def test_no_dead_neurons_changes_nothing():
  params = small_params()
  dead = small_dead(fc1=jnp.zeros(8, bool), conv=jnp.zeros(6, bool))
  new_p, masks = strip_params(params, dead)
  for name in ("fc1", "conv"):
    np.testing.assert_array_equal(new_p[name]["kernel"], params[name]["kernel"])
    assert bool(jnp.all(masks[name]["kernel"]))


def test_factor_zero_prunes_nothing_factor_one_prunes_all_but_max():
  params = small_params()
  dead = small_dead(fc1=jnp.ones(8, bool))
  _, m0 = strip_params(params, dead, stripping_factor=0.0)
  assert bool(jnp.all(m0["fc1"]["kernel"]))
  _, m1 = strip_params(params, dead, stripping_factor=1.0)
  np.testing.assert_array_equal(np.asarray(m1["fc1"]["kernel"]).sum(0), 1)


def test_inputs_are_not_modified():
  params = jax.tree.map(np.asarray, small_params())
  before = jax.tree.map(np.copy, params)
  dead = small_dead(fc1=np.ones(8, bool), conv=np.ones(6, bool))
  masks = dead_tree(params, {"fc1": np.ones((12, 8), bool)})
  masks_before = jax.tree.map(np.copy, masks)
  strip_params(params, dead, masks, stripping_factor=0.5)
  jax.tree.map(np.testing.assert_array_equal, params, before)
  jax.tree.map(np.testing.assert_array_equal, masks, masks_before)


def test_no_recompilation_for_new_dead_sets():
  traces = []

  def fn(params, dead):
    traces.append(1)  # runs once per trace
    return strip_params(params, dead, stripping_factor=0.05)

  f = jax.jit(fn)
  params = small_params()
  rng = np.random.default_rng(0)
  for frac in (0.0, 0.1, 0.5, 0.9, 1.0, 0.3):
    dead = small_dead(fc1=jnp.asarray(rng.random(8) < frac),
                      conv=jnp.asarray(rng.random(6) < frac))
    f(params, dead)
  assert len(traces) == 1


def _layers(shapes, seed=0):
  """:func:`small_params` with one layer ``l{i}`` per kernel shape."""
  return small_params({f"l{i}": s for i, s in enumerate(shapes)}, seed)


def test_eager_strip_compiles_once_per_shape_not_per_factor_or_dead_set(
    count_compiles):
  """Eager strip_params compiles one program per distinct kernel shape; new
  dead sets, new factors and masks given or not compile nothing more."""
  shapes = [(12, 20), (20, 12), (12, 20), (12, 20), (3, 3, 4, 20)]
  params = _layers(shapes)
  with count_compiles() as first:
    p, m = strip_params(params, random_dead(params, 0.5, 1),
                        stripping_factor=0.05)
  # One program per shape: (12, 20), (20, 12), (3, 3, 4, 20) at most.
  assert first.count_of("_strip_kernel_impl") <= 3, first.names
  events = [(random_dead(params, frac, 10 + e), random_dead(params, frac, 20 + e),
             q) for e, (frac, q) in enumerate([(0.0, 0.05), (1.0, 0.3),
                                              (0.3, 0.0), (0.7, 1.0),
                                              (0.5, 0.123456789)])]
  jax.block_until_ready((p, m, events))
  with count_compiles() as counter:
    for dead1, dead2, q in events:
      p, m = strip_params(p, dead1, m, stripping_factor=q)
      strip_params(params, dead2, stripping_factor=q)
    jax.block_until_ready(m)
  assert counter.count == 0


def test_compile_strip_ahead_of_time_leaves_nothing_to_compile(
    count_compiles):
  """compile_strip from shapes compiles every program an eager strip event
  then runs: the events compile nothing, and give the jitted call's bits."""
  params = _layers([(13, 21), (21, 13), (2, 3, 5, 21)], seed=7)
  targets = jax.tree.map(lambda x: x.ndim >= 2, params)
  assert stripping.compile_strip(jax.eval_shape(lambda: params), targets) == 3
  dead1, dead2 = random_dead(params, 0.5, 1), random_dead(params, 0.9, 2)
  jax.block_until_ready((params, dead1, dead2))
  with count_compiles() as counter:
    p, m = strip_params(params, dead1, stripping_factor=0.07)
    p, m = strip_params(p, dead2, m, stripping_factor=0.31)
    jax.block_until_ready((p, m))
  assert counter.count == 0
  jitted = jax.jit(strip_params, static_argnames="stripping_factor")
  jp, jm = jitted(params, dead1, stripping_factor=0.07)
  jp, jm = jitted(jp, dead2, jm, stripping_factor=0.31)
  assert_bitwise_equal((p, m), (jp, jm), "eager vs jit")
  assert int(sum(np.asarray(x).size - np.asarray(x).sum()
                 for x in jax.tree.leaves(m))) > 0  # something was pruned


@pytest.mark.parametrize("with_masks", [
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_traced_strip_params_equals_eager(with_masks):
  """Under jit, same-shape kernels are stacked and mapped: same bits."""
  shapes = [(12, 20), (20, 12), (12, 20), (12, 20), (20, 12), (3, 3, 4, 20)]
  params = _layers(shapes, seed=3)
  dead = random_dead(params, 0.5, 4)
  masks = None
  if with_masks:
    rng = np.random.default_rng(5)
    masks = {k: {"kernel": jnp.asarray(rng.random(v["kernel"].shape) < 0.8),
                 "bias": None} for k, v in params.items()}
  for q in (0.05, 0.5):
    want = strip_params(params, dead, masks, stripping_factor=q)
    got = jax.jit(strip_params, static_argnames="stripping_factor")(
        params, dead, masks, stripping_factor=q)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      assert w.dtype == g.dtype
      np.testing.assert_array_equal(np.asarray(w), np.asarray(g))


def test_traced_program_size_does_not_grow_with_same_shape_kernels():
  """One copy of the computation per distinct shape, however many kernels."""
  def hlo_ops(n):
    params = _layers([(12, 20)] * n)
    lowered = jax.jit(strip_params, static_argnames="stripping_factor").lower(
        params, random_dead(params, 0.5, 0), stripping_factor=0.05)
    text = lowered.as_text()
    return text.count(" = "), text.count("stablehlo.while")
  (one, loops1), (two, loops2), (twelve, loops12) = map(hlo_ops, (1, 2, 12))
  # One bisection loop (one copy of the computation), inside one lax.map
  # loop over the stacked kernels from 2 kernels on; each further kernel
  # adds only its stacking and masking.
  assert loops1 == 1 and loops2 == loops12 == 2, (loops1, loops2, loops12)
  assert two < 2 * one and twelve < 2 * two, (one, two, twelve)


def test_every_dead_count_gets_its_thresholds(count_compiles):
  """Each dead neuron gets the threshold of its whole column, every other
  neuron NaN, for every dead count (one compiled program for all)."""
  w = normal((40, 33), 1)
  full = stripping.column_thresholds(w, 0.2, axis=0)
  thresholds = jax.jit(stripping.kernel_thresholds,
                       static_argnames="stripping_factor")
  with count_compiles() as counter:
    for count in range(0, 34):
      dead = jnp.arange(33) < count
      thr = thresholds(w, dead, stripping_factor=0.2)
      np.testing.assert_array_equal(thr, jnp.where(dead, full, jnp.nan))
      assert int(jnp.sum(~jnp.isnan(thr))) == count
  # One program for every dead set (none if an earlier test compiled it).
  assert counter.count_of("kernel_thresholds") <= 1, counter.names


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("factor", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_stripping_factor_value(factor):
  with pytest.raises(ValueError, match="stripping_factor"):
    strip_params(small_params(), small_dead(fc1=jnp.ones(8, bool)), stripping_factor=factor)


@pytest.mark.parametrize("factor", [True, "0.1", None, [0.1]])
def test_bad_stripping_factor_type(factor):
  with pytest.raises(ValueError, match="stripping_factor"):
    strip_params(small_params(), small_dead(fc1=jnp.ones(8, bool)), stripping_factor=factor)


def test_traced_stripping_factor_is_rejected():
  with pytest.raises(TypeError, match="static"):
    jax.jit(lambda q: strip_params(small_params(), small_dead(fc1=jnp.ones(8, bool)),
                                   stripping_factor=q))(0.1)


def test_mismatched_tree_names_the_path():
  dead = {"fc1": {"kernel": jnp.ones(8, bool), "bias": None},
          "other": {"kernel": None}}
  with pytest.raises(ValueError, match="other/kernel"):
    strip_params(small_params(), dead)


def test_dead_wrong_length_names_path_and_shape():
  with pytest.raises(ValueError, match=r"dead\[fc1/kernel\].*\(7,\).*8 neurons"):
    strip_params(small_params(), small_dead(fc1=jnp.ones(7, bool)))


def test_dead_not_bool():
  with pytest.raises(TypeError, match=r"dead\[fc1/kernel\].*bool.*float32"):
    strip_params(small_params(), small_dead(fc1=jnp.ones(8, jnp.float32)))
  # A list is a container, not a leaf: the structures no longer align.
  with pytest.raises(ValueError, match=r"fc1/kernel"):
    strip_params(small_params(), small_dead(fc1=[True] * 8))
  with pytest.raises(TypeError, match=r"dead\[fc1/kernel\].*str"):
    strip_params(small_params(), small_dead(fc1="all"))


def test_dead_on_a_bias_is_rejected():
  dead = small_dead(fc1=None)
  dead["fc1"]["bias"] = jnp.ones(8, bool)
  with pytest.raises(ValueError, match=r"fc1/bias.*rank >= 2"):
    strip_params(small_params(), dead)


def test_masks_wrong_shape_or_dtype():
  dead = small_dead(fc1=jnp.ones(8, bool))
  masks = small_dead(fc1=jnp.ones((12, 7), bool))
  with pytest.raises(ValueError, match=r"masks\[fc1/kernel\].*\(12, 7\)"):
    strip_params(small_params(), dead, masks)
  masks = small_dead(fc1=jnp.ones((12, 8), jnp.int32))
  with pytest.raises(TypeError, match=r"masks\[fc1/kernel\].*int32"):
    strip_params(small_params(), dead, masks)


def test_errors_are_raised_under_jit_too():
  f = jax.jit(strip_params, static_argnames="stripping_factor")
  with pytest.raises(ValueError, match=r"dead\[fc1/kernel\]"):
    f(small_params(), small_dead(fc1=jnp.ones(5, bool)), stripping_factor=0.1)
