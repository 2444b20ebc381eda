"""Tensors read from the host moved to the device without holding up its computation.

On a CUDA device a tensor from pageable memory (a checkpoint's tensor as read) copied by a plain
``.to(device)`` goes through the legacy default stream: the copy waits for the products queued
before it and the next products wait for the copy, so reading ahead (in the reader thread of
:meth:`rebasin.matching.costs.CostModel._operand_stream`) overlaps nothing on the device. Here
each tensor is staged in page-locked (pinned) memory and copied on a stream of its own, which the
compute stream does not wait for; the reading thread waits for its copy to land, so the tensor it
returns is ready on any stream. Pinned blocks come from PyTorch's caching host allocator (reused,
not pinned anew per tensor). Elsewhere (the CPU, MPS) it is ``.to(device)``.
"""

from __future__ import annotations

import torch


class Uploader:
    """Copies host tensors to ``device`` (callable; thread-safe). Made in the thread that
    computes: its current stream is one the copies' memory is kept for, with the default one."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        self._users: list[torch.cuda.Stream] = []
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)
            default, current = torch.cuda.default_stream(device), torch.cuda.current_stream(device)
            self._users = [default] if current == default else [default, current]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device (``t`` itself when it is there already)."""
        if self._stream is None or t.device.type != "cpu":
            return t.to(self.device)
        host = t if t.is_pinned() else t.pin_memory()
        with torch.cuda.stream(self._stream):
            out = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()  # this thread waits, not the device: ``host`` may go
        for s in self._users:  # its memory is not reused before the work queued there is done
            out.record_stream(s)
        return out
