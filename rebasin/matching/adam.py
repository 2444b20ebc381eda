"""A plain Adam (Kingma and Ba, 2015) for the few tensors a matcher optimizes.

``torch.optim.Adam`` imports the compiler stack on construction (about 2 s on a CPU machine), more
than a whole Sinkhorn run on a small model; this is the same update in a dozen lines."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Adam:
    """Adam with the usual defaults (betas 0.9 / 0.999, eps 1e-8, no weight decay)."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)):
        self.params = list(params)
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = 1e-8
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)
