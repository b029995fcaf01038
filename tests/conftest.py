"""Test-wide settings: quiet third-party warnings, deterministic single-threaded math."""

import warnings

import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
torch.set_num_threads(1)
