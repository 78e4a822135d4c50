"""Shared test set-up.

PyTorch and torchvision are imported first: triton (which they pull in) segfaults when it
is imported after TensorFlow in the same process, and test modules import both.
"""

import torch  # noqa: F401  pylint: disable=unused-import
import torchvision  # noqa: F401  pylint: disable=unused-import
