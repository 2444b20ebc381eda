"""The built-in matchers, registered by name. Each class is the method's options (its fields);
``solve`` runs the solver module, imported only then (this module imports no torch). Each says
whether and how ``--method auto`` tries it (``auto_variants``, ``auto_flops``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rebasin.core.errors import ConfigError
from rebasin.core.fields import EPOCHS_HELP, LR_HELP, option
from rebasin.matching.registry import ALIGN, Matcher, MatchProblem, register_matcher

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from rebasin.core.types import Permutation, Progress
    from rebasin.matching.costs import GroupProducts
    from rebasin.matching.result import MatchResult
    from rebasin.spec.core import PermutationSpec

EXPECTED_SWEEPS = 4
"""Sweeps a run of weight matching is expected to take, for ``--dry-run`` (planted pairs: 3;
trained pairs: 3-8), where the first sweep does not go by reach
(:data:`rebasin.matching.weight.REACH_SWEEPS`)."""
RESTARTS_HELP = "Runs of weight matching (the first from the identity); the best objective wins."
STEPS_HELP = "Optimizer steps."
EPOCHS_TEXT = "steps (sets them when given)"


@register_matcher("weight")
@dataclass(frozen=True)
class WeightMatching(Matcher):
    """Weight matching (Git Re-Basin): coordinate descent maximizing sum <A, pi(B)>. It is also
    ``auto``'s base: without data, ``auto`` is weight matching with restarts."""

    objective = "<A, pi(B)> (higher is better)"

    restarts: int = option(1, RESTARTS_HELP, ge=1, commands=ALIGN)
    max_iter: int = option(100, "Most sweeps per run of weight matching.", ge=1, commands=ALIGN)
    time_budget: float | None = option(
        None,
        "Stop weight matching at the end of the last sweep completed within this many seconds.",
        gt=0.0,
        commands=ALIGN,
    )
    sketch: int = option(
        1,
        "First descend on costs from one in N contracted columns, then exactly from there (1: off).",
        ge=1,
        commands=ALIGN,
    )
    assign_workers: int = option(
        0,
        "Assignments solved at once, in worker processes (0: as the cores allow, from groups of 2048).",
        ge=0,
        commands=ALIGN,
    )
    tol: float = 1e-12
    """Relative improvement below which a group counts as unchanged."""

    SWEEPS: ClassVar[int] = 10
    """Sweeps assumed for one run when estimating its time."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from rebasin.matching.assignment import check_concurrency

        check_concurrency(self.assign_workers)

    def auto_flops(self, sweep: float, loss: float) -> float:
        return self.SWEEPS * sweep

    def planned_sweeps(self, with_data: bool, sweep: float = 0.0) -> float:
        from rebasin.matching.weight import REACH_FIRST_WORK, REACH_SWEEPS

        return self.restarts * (REACH_SWEEPS if sweep / 2 >= REACH_FIRST_WORK else EXPECTED_SWEEPS)

    def planned_flops(self, sweep: float, loss: float, with_data: bool) -> float:
        return 0.0

    def first_products(self, a: Mapping[str, torch.Tensor], spec: PermutationSpec) -> GroupProducts | None:
        """The first unit's products at the identity, where the first sweep goes by reach
        (:func:`rebasin.matching.weight.first_products`); not with a sketch."""
        from rebasin.matching.weight import first_products

        return first_products(a, spec) if self.sketch == 1 else None

    def solve(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        return self.run(problem, progress=progress, settle_later=problem.settle_later)

    def run(
        self,
        problem: MatchProblem,
        init: Permutation | None = None,
        progress: Progress | None = None,
        settle_later: bool = False,
    ) -> MatchResult:
        """:meth:`solve`, with run 0 starting at ``init`` instead of the identity when given
        (``settle_later``: see :attr:`MatchProblem.settle_later`; the objectives of runs that
        are compared with each other are always exact)."""
        from rebasin.matching.weight import weight_matching

        return weight_matching(
            problem.a,
            problem.b,
            problem.spec,
            max_iter=self.max_iter,
            restarts=self.restarts,
            seed=problem.seed,
            device=problem.device,
            backend=self.backend,
            tol=self.tol,
            progress=progress,
            buffers=problem.buffers,
            init=init,
            time_budget=self.time_budget,
            sketch=self.sketch,
            known=problem.dots,
            settle_later=settle_later,
            first=problem.first,
            workers=self.assign_workers,
        )


@register_matcher("activation")
@dataclass(frozen=True)
class ActivationMatching(Matcher):
    """Activation matching (Git Re-Basin): correlate hidden units on data, one assignment per group."""

    objective = "summed correlation of matched units (higher is better)"
    auto_variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def needs_data(self) -> bool:
        return True

    def solve(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        from rebasin.matching.activation import activation_matching

        data = problem.need_data(self.label())
        return activation_matching(
            problem.a, problem.b, problem.spec, data.features(), self.backend, progress
        )


@register_matcher("ste")
@dataclass(frozen=True)
class StraightThrough(Matcher):
    """Straight-through estimator (Git Re-Basin), or ReinMax: learn pi on the midpoint's task loss."""

    objective = "midpoint loss on training data (lower is better)"
    auto_variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    estimator: str = option(
        "st",
        "Gradient: st (straight-through on weights) or reinmax (second order, on logits).",
        choices=("st", "reinmax"),
        commands=ALIGN,
    )
    steps: int = option(200, STEPS_HELP, ge=1, commands=ALIGN)
    epochs: int | None = option(None, EPOCHS_HELP, ge=1, commands=ALIGN, default_text=EPOCHS_TEXT)
    lr: float | None = option(None, LR_HELP, gt=0.0, commands=ALIGN, default_text="1e-3, 0.1 with reinmax")
    restarts: int = option(1, RESTARTS_HELP, ge=1, commands=ALIGN)
    eval_every: int = option(25, "Steps between evaluations of the midpoint.", ge=1, plan=False)
    tau: float = option(1.0, "ReinMax's Sinkhorn temperature.", gt=0.0, plan=False)

    @property
    def learning_rate(self) -> float:
        """The learning rate used: ``lr``, else the estimator's default."""
        if self.lr is not None:
            return self.lr
        return 0.1 if self.estimator == "reinmax" else 1e-3

    def needs_data(self) -> bool:
        return True

    def describe(self) -> str:
        return "ste (reinmax)" if self.estimator == "reinmax" else "ste"

    def auto_flops(self, sweep: float, loss: float) -> float:
        return self.steps * (loss + 3 * sweep)  # steps x (task loss + projection)

    def planned_sweeps(self, with_data: bool, sweep: float = 0.0) -> float:
        return self.restarts * EXPECTED_SWEEPS  # each run starts from weight matching

    def solve(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        from rebasin.matching.ste import straight_through

        data = problem.need_data(self.label())
        return straight_through(self, problem, data, progress)


@register_matcher("sinkhorn")
@dataclass(frozen=True)
class SinkhornRebasin(Matcher):
    """Sinkhorn re-basin: soft permutations by implicit Sinkhorn differentiation."""

    objective = "||A - pi(B)|| for cost l2, midpoint loss on training data for mid/rnd (lower is better)"
    auto_variants: ClassVar[tuple[dict[str, Any], ...]] = ({"cost": "mid"},)

    cost: str = option(
        "l2",
        "Sinkhorn cost: l2 (data-free), mid (midpoint loss), rnd (random-lambda loss).",
        choices=("l2", "mid", "rnd"),
        commands=ALIGN,
    )
    steps: int | None = option(
        None, STEPS_HELP, ge=1, commands=ALIGN, default_text="100 for l2, 300 for mid and rnd"
    )
    epochs: int | None = option(None, EPOCHS_HELP, ge=1, commands=ALIGN, default_text=EPOCHS_TEXT)
    lr: float = option(0.1, LR_HELP, gt=0.0, commands=ALIGN)
    tau_start: float = option(1.0, "Sinkhorn temperature at the start.", gt=0.0, plan=False)
    tau_end: float = option(0.05, "Sinkhorn temperature at the end.", gt=0.0, plan=False)
    sinkhorn_iters: int = option(200, "Most Sinkhorn iterations per projection.", ge=1, plan=False)
    init: str = "identity"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs is not None and self.cost == "l2":
            raise ConfigError("--epochs applies to Sinkhorn's data costs (mid, rnd) only")

    @property
    def step_count(self) -> int:
        """The optimizer steps taken (before ``epochs``): ``steps``, else the cost's default."""
        if self.steps is not None:
            return self.steps
        return 100 if self.cost == "l2" else 300

    def needs_data(self) -> bool:
        return self.cost != "l2"

    def describe(self) -> str:
        return f"{self.name} ({self.cost})"

    def label(self) -> str:
        return f"method '{self.name}' with cost '{self.cost}'"

    def auto_flops(self, sweep: float, loss: float) -> float:
        return self.step_count * (loss + 2.5 * sweep)  # steps x (task loss + projection)

    def solve(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        from rebasin.matching.sinkhorn import sinkhorn_rebasin

        data = problem.need_data(self.label()) if self.needs_data() else None
        return sinkhorn_rebasin(self, problem, data, progress)


@register_matcher("auto")
@dataclass(frozen=True)
class AutoMatch(Matcher):
    """Run the methods that fit a time budget and keep the one with the lowest midpoint loss on
    training data (without data: weight matching with restarts). Its candidates are the
    registered methods' ``auto_variants``."""

    objective = "midpoint loss on training data, judged as the barrier is (lower is better)"

    budget: float = option(
        60.0,
        "Seconds auto may spend on its data-cost candidates (STE, Sinkhorn mid), estimated from "
        "operation counts so the choice is the same on every machine; those that do not fit are skipped.",
        gt=0.0,
        commands=(*ALIGN, "demo"),
    )

    def wants_data(self) -> bool:
        return True

    def planned_sweeps(self, with_data: bool, sweep: float = 0.0) -> float:
        from rebasin.matching.auto import RESTARTS

        return RESTARTS * EXPECTED_SWEEPS

    def planned_flops(self, sweep: float, loss: float, with_data: bool) -> float:
        """The data candidates that fit the budget (by auto's own nominal estimate)."""
        from rebasin.matching.auto import planned_candidates_flops

        return planned_candidates_flops(self, sweep, loss) if with_data else 0.0

    def first_products(self, a: Mapping[str, torch.Tensor], spec: PermutationSpec) -> GroupProducts | None:
        """Those of its first run, weight matching from the identity."""
        return WeightMatching(backend=self.backend).first_products(a, spec)

    def solve(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        from rebasin.matching.auto import auto_match

        return auto_match(self, WeightMatching(backend=self.backend), problem, progress)
