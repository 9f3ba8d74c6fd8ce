"""Shared test set-up: one torch thread per test process.

The suite runs on 2 cores (often as 2 pytest-xdist workers); small models are fastest, and
results are the same, with one intra-op thread per process.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
