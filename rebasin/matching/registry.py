"""The matcher contract and registry (torch-free: the command line reads it for its options).

A matcher is a frozen options class registered by name with :func:`register_matcher`; it says
whether it needs data (:meth:`Matcher.needs_data`) and solves a :class:`MatchProblem` with
``match(problem, progress) -> MatchResult``. Its fields declared with
:func:`rebasin.options.option` become command-line flags and batch plan keys for that method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from rebasin.core.errors import ConfigError
from rebasin.core.registry import Registry
from rebasin.options import Checked, option

if TYPE_CHECKING:
    import torch

    from rebasin.matching.result import MatchResult, Progress
    from rebasin.spec.core import PermutationSpec


def _load_builtin() -> None:
    import rebasin.matching.methods  # noqa: F401  (registers the built-in matchers)


MATCHERS: Registry[type[Matcher]] = Registry("matching method", _load_builtin)

M = TypeVar("M", bound="type[Matcher]")

ALIGN = ("merge", "barrier")

DEFAULT_METHOD = "auto"
"""The method used when none is named (command line, plans and API)."""


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

    backend: str = option(
        "auto",
        "Linear-assignment back-end: auto (lap when installed, else scipy), scipy, lap.",
        choices=("auto", "scipy", "lap"),
        commands=("merge", "barrier", "merge-many"),
    )

    def needs_data(self) -> bool:
        """Whether this configuration runs the models on data (and fails without)."""
        return False

    def wants_data(self) -> bool:
        """Whether this configuration uses data when there is some (it may also run without)."""
        return self.needs_data()

    def match(self, problem: MatchProblem, progress: Progress | None = None) -> MatchResult:
        """Find the permutation of ``problem.b`` that aligns it with ``problem.a``."""
        raise NotImplementedError

    def describe(self) -> str:
        """The method as people name it (with the variant, where it has one)."""
        return self.name

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
    from rebasin.options import make_matcher

    m: Matcher = make_matcher(name, options, "api")
    return m
