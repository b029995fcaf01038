"""Test-wide settings: deterministic single-threaded math in the test process."""

import torch

torch.set_num_threads(1)
