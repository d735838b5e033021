"""Shared test fixtures: where ../shared (data, reference fixtures) lives."""

import pytest

from _shared import load_fixtures


@pytest.fixture(scope="session")
def reference():
  """The original implementation's outputs (``fixtures/stripping_reference.npz``)."""
  return load_fixtures()
