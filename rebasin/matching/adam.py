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

    def state_dict(self) -> dict[str, object]:
        """The step count and moments (copies), to resume from."""
        return {"t": self.t, "m": [m.clone() for m in self.m], "v": [v.clone() for v in self.v]}

    @torch.no_grad()
    def load_state(self, state: dict[str, object]) -> None:
        """Continue from :meth:`state_dict`'s output."""
        self.t = int(state["t"])  # type: ignore[call-overload]
        for mine, saved in zip(self.m + self.v, [*state["m"], *state["v"]], strict=True):  # type: ignore[misc]
            mine.copy_(saved)

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
