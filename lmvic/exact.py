"""Arithmetic that encoder and decoder must reproduce bit for bit, in separate processes.

Everything that selects CDFs or feeds the synthesis of a decoded latent runs on a fixed thread
count (``EXACT_THREADS``, :func:`fixed_threads`); entropy parameters are computed in float64
(:func:`call_in_float64`) from tensors both sides hold identically.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

#: Thread count used for every computation whose result must match between encoder and decoder.
EXACT_THREADS = 1


@contextlib.contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def call_in_float64(module: nn.Module, *inputs: Tensor | None) -> object:
    """``module(*inputs)`` with float64 copies of its weights and inputs (module left unchanged)."""
    state = {k: v.double() for k, v in module.named_parameters()}
    state.update({k: v.double() if v.is_floating_point() else v for k, v in module.named_buffers()})
    args = tuple(None if t is None else t.double() for t in inputs)
    return functional_call(module, state, args)
