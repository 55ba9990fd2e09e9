"""Graph compilation of a training forward: ``torch.compile`` (inductor's generated C++ kernels on the CPU).

It fuses the many small element-wise operations around the convolutions (GDN, gains, quantisation
noise, likelihoods) that eager PyTorch runs one by one. ``benchmarks/train_throughput.py --compile``
measures what it buys on this CPU; compiling costs a few CPU-minutes once per process, in the first
step, so it pays for runs of more than a quarter of an hour.
"""
from __future__ import annotations

import torch


def compiled(net: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``net`` (a model, or its DistributedDataParallel wrapper, which compiles per gradient bucket)
    compiled when ``enabled``, else ``net`` itself. Only the training forward should call the result:
    the caller keeps ``net``'s module for its state dict, validation and export."""
    return torch.compile(net) if enabled else net
