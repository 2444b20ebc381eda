"""The matcher contract and registry (torch-free: the command line reads it for its options).

A matcher is a frozen options class registered by name with :func:`register_matcher`; it says
whether it needs data (:meth:`Matcher.needs_data`), whether and how ``auto`` tries it
(:attr:`Matcher.auto_variants`, :meth:`Matcher.auto_flops`) and solves a :class:`MatchProblem`
with ``solve(problem, progress) -> MatchResult``; :meth:`Matcher.match` names the result after
the method as registered. Its fields declared with :func:`rebasin.core.fields.option` become
command-line flags and batch plan keys for that method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from rebasin.core.errors import ConfigError
from rebasin.core.fields import Checked, OptionInfo, check_value, construct, option, options_of
from rebasin.core.registry import Registry

if TYPE_CHECKING:
    import torch

    from rebasin.core.types import Progress
    from rebasin.matching.costs import GroupProducts
    from rebasin.matching.result import MatchResult
    from rebasin.spec.core import PermutationSpec


MATCHERS: Registry[type[Matcher]] = Registry("matching method", builtins=("rebasin.matching.methods",))

M = TypeVar("M", bound="type[Matcher]")

ALIGN = ("merge", "barrier", "diagnose")

DEFAULT_METHOD = "auto"
"""The method commands, batch plans and :func:`rebasin.build_options` use when none is named.
:func:`rebasin.match`, which gets no model or data, defaults to ``weight`` instead."""


class DataSide(Protocol):
    """What data-driven matchers get from the model and data side (built lazily by the caller).

    ``features(state)`` yields, per batch, each group's tap activations as (rows, units) matrices;
    ``task_loss(params, step)`` is the loss of a model with these parameters on the step's
    training batch; ``score(params)`` its loss over the (capped) training set, judged as barriers
    are (BatchNorm statistics recomputed where the model has BatchNorm); ``batches_per_epoch``
    is how many ``task_loss`` steps make one pass over the training data."""

    def features(self) -> Callable[[Mapping[str, torch.Tensor]], Iterator[dict[str, list[torch.Tensor]]]]: ...

    def task_loss(self) -> Callable[[dict[str, torch.Tensor], int], torch.Tensor]: ...

    def score(self) -> Callable[[dict[str, torch.Tensor]], float]: ...

    def batches_per_epoch(self) -> int: ...


@dataclass
class CallableData:
    """A :class:`DataSide` from plain callables (for API users with their own model and data);
    a method that needs a callable not given fails with a clear error."""

    features_fn: Callable[[Mapping[str, torch.Tensor]], Iterator[dict[str, list[torch.Tensor]]]] | None = None
    task_loss_fn: Callable[[dict[str, torch.Tensor], int], torch.Tensor] | None = None
    score_fn: Callable[[dict[str, torch.Tensor]], float] | None = None
    epoch_batches: int = 1

    @staticmethod
    def _need(fn: Any, what: str) -> Any:
        if fn is None:
            raise ConfigError(f"this method needs {what} on its data side")
        return fn

    def features(self) -> Callable[[Mapping[str, torch.Tensor]], Iterator[dict[str, list[torch.Tensor]]]]:
        return self._need(self.features_fn, "features")

    def task_loss(self) -> Callable[[dict[str, torch.Tensor], int], torch.Tensor]:
        return self._need(self.task_loss_fn, "a task loss")

    def score(self) -> Callable[[dict[str, torch.Tensor]], float]:
        return self._need(self.score_fn, "a score")

    def batches_per_epoch(self) -> int:
        return self.epoch_batches


@dataclass
class MatchProblem:
    """What a matcher solves: align ``b`` to ``a`` under ``spec``. ``data`` is the lazy data side
    (None for data-free runs); ``seed`` and ``device`` configure the run; ``buffers`` names state
    that is permuted but carries no weight in a cost."""

    a: Mapping[str, torch.Tensor]
    b: Mapping[str, torch.Tensor]
    spec: PermutationSpec
    data: DataSide | None = None
    seed: int = 0
    device: str = "cpu"
    buffers: frozenset[str] = frozenset()
    """Non-parameter state beyond the running statistics found by name (permuted, never weighed)."""
    dots: Mapping[str, float] | None = None
    """``<A_p, B_p>`` of parameters as stored, taken on the CPU by a pass that read both (the
    input scan, :func:`rebasin.matching.costs.param_dot`): weight matching's objective at the
    start then reads nothing."""
    first: GroupProducts | None = None
    """The first unit's products at the identity, taken on the CPU by the input scan
    (:meth:`Matcher.first_products`): weight matching's first cost then reads nothing."""
    settle_later: bool = False
    """The caller passes over pi(B) after matching and settles the exact objective there
    (:meth:`rebasin.matching.result.MatchResult.settle`): weight matching (one run) skips that read."""

    @property
    def cost_params(self) -> list[str]:
        """The spec's parameters that weigh in data-free costs."""
        return self.spec.cost_params(self.buffers)

    def need_data(self, what: str) -> DataSide:
        """The data side, or an error saying that ``what`` needs data."""
        if self.data is None:
            raise ConfigError(f"{what} needs data: pass --data (and a model, --model)")
        return self.data


@dataclass(frozen=True)
class Matcher(Checked):
    """Base of every registered matcher: its options are its fields."""

    name: ClassVar[str] = ""
    objective: ClassVar[str] = ""
    """What ``MatchResult.objective`` measures for this method, in words."""
    auto_variants: ClassVar[tuple[dict[str, Any], ...]] = ()
    """The configurations ``--method auto`` tries when it has data (none: not a candidate)."""

    backend: str = option(
        "auto",
        "Linear-assignment back-end: auto (lap when installed, else scipy), scipy, lap, auction "
        "(exact, on the GPU when there is one).",
        choices=("auto", "scipy", "lap", "auction"),  # assignment.BACKENDS (that module imports scipy)
        commands=("merge", "barrier", "merge-many"),
    )

    def needs_data(self) -> bool:
        """Whether this configuration runs the models on data (and fails without)."""
        return False

    def wants_data(self) -> bool:
        """Whether this configuration uses data when there is some (it may also run without)."""
        return self.needs_data()

    def auto_flops(self, sweep: float, loss: float) -> float | None:
        """Operations ``auto`` expects this configuration to take, from those of one weight-matching
        sweep and of one task-loss step (forward and backward); None: cheap, always tried."""
        return None

    def planned_sweeps(self, with_data: bool, sweep: float = 0.0) -> float:
        """Weight-matching sweeps of products this configuration is expected to run (for
        ``--dry-run``), given the floating-point operations of one sweep's products."""
        return 0.0

    def planned_flops(self, sweep: float, loss: float, with_data: bool) -> float:
        """Operations it is expected to take beyond those sweeps (for ``--dry-run``), from those
        of one sweep and of one task-loss step."""
        return self.auto_flops(sweep, loss) or 0.0

    def first_products(self, a: Mapping[str, torch.Tensor], spec: PermutationSpec) -> GroupProducts | None:
        """Products a pass over both models (the input scan) may take for this method's first
        step (:attr:`MatchProblem.first`); None: none."""
        return None

    def match(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        """Find the permutation of ``problem.b`` that aligns it with ``problem.a``; the result
        carries the method's registered name."""
        return dataclasses.replace(self.solve(problem, progress), method=self.name)

    def solve(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        """The method itself (see :meth:`match`)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The method as people name it (with the variant, where it has one)."""
        return self.name

    def label(self) -> str:
        """How messages name this configuration (``method 'ste'``)."""
        return f"method '{self.name}'"

    def to_dict(self) -> dict[str, Any]:
        """The options, for reports."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def register_matcher(name: str) -> Callable[[M], M]:
    """Class decorator registering a matcher under ``name`` (once)."""

    def deco(cls: M) -> M:
        cls.name = name
        MATCHERS.add(name, cls)
        return cls

    return deco


def list_matchers() -> list[str]:
    """Names of the registered matchers."""
    return MATCHERS.names()


def get_matcher(name: str, **options: Any) -> Matcher:
    """The registered matcher ``name`` configured with ``options`` (checked)."""
    return make_matcher(name, options, "api")


def matcher_options() -> list[OptionInfo]:
    """Every matcher's own options, one entry per name (with the methods that use it)."""
    base = {i.name: i for i in options_of(Matcher, "method")}
    by_name: dict[str, OptionInfo] = dict(base)
    users: dict[str, list[str]] = {}
    for name, cls in MATCHERS.items():
        for info in options_of(cls, "method"):
            if info.name in base:
                continue
            users.setdefault(info.name, []).append(name)
            by_name.setdefault(info.name, info)
    return [
        dataclasses.replace(info, methods=tuple(users[name]), default=None) if name in users else info
        for name, info in by_name.items()
    ]


def make_matcher(method: str, values: Mapping[str, Any], style: str = "cli") -> Matcher:
    """The registered matcher ``method`` configured with ``values``; an option of another method
    is an error naming the methods that use it."""
    cls = MATCHERS.get(method)
    own = {i.name: i for i in options_of(cls, "method")}
    kw = {}
    for k, v in values.items():
        if v is None:
            continue
        if k not in own:
            users = [n for n, c in MATCHERS.items() if k in {i.name for i in options_of(c, "method")}]
            label = next((o.label(style) for o in matcher_options() if o.name == k), repr(k))
            if not users:
                raise ConfigError(f"unknown option {label} for method '{method}'")
            raise ConfigError(f"{label} does not apply to method '{method}' (used by: {', '.join(users)})")
        kw[k] = check_value(own[k], v, style)
    matcher: Matcher = construct(cls, kw, style)
    return matcher
