"""The checkpoint conversion tests' helpers (tests/torch_reference.py) as a fixture."""

import pytest

pytest.importorskip('torch')
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def ck():
  """The shared helpers, as the checkpoint tests name them."""
  return torch_reference
