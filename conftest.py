"""Shared test set-up: one torch thread per test process; Ctrl-C reaches the commands the tests start.

The suite runs on 2 cores (often as 2 pytest-xdist workers); small models are fastest, and
results are the same, with one intra-op thread per process.

A suite started in the background by a shell without job control (``cmd &``, ``nohup``) starts
with SIGINT ignored, and every process it starts inherits that: the `decode` commands the tests
interrupt would never see their Ctrl-C. Each test process takes SIGINT back (Python's handler),
so what it starts gets the default again (a handler, unlike "ignored", is not inherited by exec).
"""

from __future__ import annotations

import signal

import torch

torch.set_num_threads(1)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
