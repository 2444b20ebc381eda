"""The options model: every option reaches the command line, the plan schema and the docs, and is
checked in one place with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import expect_error, run

from rebasin.commands.batch import item_keys
from rebasin.core.errors import ConfigError
from rebasin.options import (
    EvalOptions,
    MergeOptions,
    all_options,
    build_options,
    options_table,
    plan_options,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["merge", "barrier", "permute", "merge-many", "spec"])
def test_every_option_of_a_command_is_in_its_help(command: str) -> None:
    code, stdout, _ = run(command, "--help")
    assert code == 0
    for o in all_options():
        if command in o.commands:
            assert o.flag in stdout, (command, o.flag)


def test_every_plan_option_is_a_plan_key() -> None:
    keys = item_keys()
    for o in plan_options():
        assert o.name in keys


def test_docs_table_is_current_and_lists_every_option() -> None:
    text = (ROOT / "docs" / "options.md").read_text()
    start, end = "<!-- options-table:start -->\n", "<!-- options-table:end -->"
    table = text[text.index(start) + len(start) : text.index(end)]
    assert table == options_table(), "regenerate docs/options.md (see its first lines)"
    for o in all_options():
        if o.commands or o.plan:
            assert f"`{o.flag}`" in table


def test_an_option_of_another_method_is_an_error(mlp_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = mlp_pair
    expect_error(
        ["merge", a, b, "-o", tmp_path / "m.safetensors", "--method", "sinkhorn", "--restarts", "5"],
        "--restarts does not apply to method 'sinkhorn' (used by: weight, ste)",
    )
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--method", "weight", "--restarts", "0"], "--restarts must be at least 1, got 0"),
        (["--method", "weight", "--max-iter", "-3"], "--max-iter must be at least 1, got -3"),
        (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
        (["--max-barrier", "inf", "--data", "synthetic"], "--max-barrier must be a finite number, got inf"),
        (["--method", "sinkhorn", "--steps", "-5"], "--steps must be at least 1, got -5"),
        (["--method", "sinkhorn", "--lr", "0"], "--lr must be greater than 0, got 0.0"),
        (["--shard-size", "lots"], "invalid size 'lots' (use e.g. 500MB, 2GB, 1GiB)"),
        (["--model-args", "[1]"], "--model-args must be a JSON object, e.g. '{\"hidden\": 512}'"),
    ],
)
def test_out_of_range_values_are_one_line_errors(
    mlp_pair: tuple[Path, Path], tmp_path: Path, args: list[str], line: str
) -> None:
    a, b = mlp_pair
    expect_error(["merge", a, b, "-o", tmp_path / "m.safetensors", *args], line)


def test_plan_style_names_keys() -> None:
    with pytest.raises(ConfigError, match=r"^'steps' must be at least 1, got -5$"):
        build_options({"method": "ste", "steps": -5}, "batch", style="plan")
    with pytest.raises(
        ConfigError, match=r"^'restarts' does not apply to method 'activation' \(used by: weight, ste\)$"
    ):
        build_options({"method": "activation", "restarts": 2}, "batch", style="plan")


def test_api_options_are_checked_on_construction() -> None:
    with pytest.raises(ConfigError, match=r"--alpha must lie in \[0, 1\], got 2.0"):
        MergeOptions(alpha=2.0)
    with pytest.raises(ConfigError, match="--bn must be one of auto, none, reset, repair, got 'sometimes'"):
        EvalOptions(bn="sometimes")


def test_build_options_picks_the_matcher_and_its_defaults() -> None:
    opts = build_options({"method": "ste", "estimator": "reinmax", "data": "synthetic"}, "barrier")
    assert opts.matcher.name == "ste"
    assert opts.matcher.learning_rate == 0.1
    assert opts.evaluate.data == "synthetic"
    assert build_options({}, "merge").method == "auto"  # commands and plans: auto
    assert build_options({"method": "none"}, "barrier").matcher is None


def test_a_name_has_one_meaning() -> None:
    """An option declared in several places (a stage and the matchers: --epochs, --lr) has one
    help text, type and bound everywhere; only its default may differ."""
    by_name: dict[str, list] = {}
    for o in all_options():
        by_name.setdefault(o.name, []).append(o)
    for name, infos in by_name.items():
        first = infos[0]
        for o in infos[1:]:
            assert (o.help, o.kind, o.ge, o.gt, o.le, o.flag) == (
                first.help,
                first.kind,
                first.ge,
                first.gt,
                first.le,
                first.flag,
            ), name


def test_command_defaults_and_choices() -> None:
    """train's data and model default to mnist1d and mlp, demo writes to rebasin-demo, and only
    barrier (and plans) accept --method none."""
    t = build_options({}, "train")
    assert (t.evaluate.data, t.model.model, t.train.epochs) == ("mnist1d", "mlp", 20)
    assert build_options({}, "merge").evaluate.data is None
    assert build_options({}, "demo").output.output == "rebasin-demo"
    with pytest.raises(ConfigError, match="--method must be one of"):
        build_options({"method": "none"}, "merge")
    assert build_options({"method": "none"}, "batch", style="plan").align is False
