"""Importing PyTorch safely in a process that may already have loaded TensorFlow.

triton (pulled in by torchvision and timm) segfaults when it is imported after
TensorFlow 2.21 in the same process. PyTorch on the CPU never needs triton, so when
TensorFlow is already loaded and triton is not, `torch()` blocks triton before
importing torch: torch and torchvision then treat it as not installed.
"""

import importlib
import sys


def _guard():
  if 'tensorflow' in sys.modules and 'triton' not in sys.modules:
    sys.modules['triton'] = None  # makes `import triton` raise ImportError


def torch():
  _guard()
  return importlib.import_module('torch')


def module(name: str):
  """Imports a torch-ecosystem module (torchvision, timm, transformers) with the guard."""
  _guard()
  return importlib.import_module(name)
