"""Set-up shared by the benchmark scripts: quiet transformers logging, a fixed torch thread count, and the start
time and load average that every result records."""

from __future__ import annotations

import os
import time

import torch


def start_benchmark(threads: int) -> tuple[float, tuple[float, float, float]]:
    """Silence transformers' logs and progress bars, use ``threads`` torch threads; returns (start time, load)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    return time.perf_counter(), os.getloadavg()
