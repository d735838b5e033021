"""The documented examples under ``docs/examples`` run and print their summary.

Each example runs in a fresh subprocess: the number of (fake CPU) devices is
fixed by ``XLA_FLAGS`` when JAX initialises, which this pytest process has
already done. ~10 s per run on a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _shared import REPO, run_python

PMAP_EXAMPLE = REPO / "docs" / "examples" / "pmap_and_shard_map.py"
TIMEOUT_S = 300

# What the example prints whatever the device count (the probe batch is
# padded to a multiple of it and the padding dropped, so these do not vary).
EXPECTED_LINES = [
    "dead neurons per layer: fc0=3/32, fc1=4/32",
    "pruned weights: fc0=3/512, fc1=8/1024",
    "optax: strip_event + adamw step under pmap keep 11 pruned weights at 0.0",
    "OK: (a) pmap, (b) shard_map, (c) sharded jit and (d) 1 device agree",
]
EXPECTED_PREFIXES = [
    "(a) pmap: agrees with the 1-device reference",
    "(b) shard_map: agrees with the 1-device reference",
    "(c) sharded jit: agrees with the 1-device reference",
]


def run_example(path: Path, num_devices: int | None) -> list[str]:
  """Run ``path`` on ``num_devices`` fake CPU devices (None: no XLA_FLAGS)."""
  return run_python([path], num_devices, timeout=TIMEOUT_S, what=path.name)


def check_summary(lines: list[str], num_devices: int) -> None:
  out = "\n".join(lines)
  assert f"devices: {num_devices}" in lines, out
  for line in EXPECTED_LINES:
    assert line in lines, f"missing {line!r} in:\n{out}"
  for prefix in EXPECTED_PREFIXES:
    assert any(l.startswith(prefix) for l in lines), (
        f"missing {prefix!r} in:\n{out}")


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [8])
def test_pmap_and_shard_map_example_multi_device(num_devices):
  check_summary(run_example(PMAP_EXAMPLE, num_devices), num_devices)


@pytest.mark.slow
def test_pmap_and_shard_map_example_one_device():
  check_summary(run_example(PMAP_EXAMPLE, None), 1)
