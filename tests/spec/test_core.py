"""PermutationSpec: derived views, strict files, validation, and permutation algebra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rebasin.core.errors import SpecError
from rebasin.permutation import compose, identity, invert, permute, random_permutation
from rebasin.spec import Axis, PermutationSpec, dump_spec, load_spec
from rebasin.spec.core import Heads

SPEC = PermutationSpec(
    {
        "fc1.weight": ["P1", None],
        "fc1.bias": ["P1"],
        "fc2.weight": ["P2", "P1"],
        "fc3.weight": [None, Axis("P2", 3)],
    },
    {"P1": 4, "P2": 5},
    family="test",
)
SHAPES = {"fc1.weight": (4, 2), "fc1.bias": (4,), "fc2.weight": (5, 4), "fc3.weight": (2, 15)}


def test_group_view_is_derived() -> None:
    assert SPEC.groups["P1"] == [
        ("fc1.weight", 0, 1, 0, False),
        ("fc1.bias", 0, 1, 0, False),
        ("fc2.weight", 1, 1, 0, False),
    ]
    assert SPEC.groups["P2"] == [("fc2.weight", 0, 1, 0, False), ("fc3.weight", 1, 3, 0, False)]
    assert SPEC.neighbours == {"P1": {"P2"}, "P2": {"P1"}}
    assert SPEC.fixed(["fc1.weight", "fc3.bias"]) == ["fc3.bias"]


def test_round_trip_through_yaml_and_json(tmp_path: Path) -> None:
    for suffix, as_json in ((".yaml", False), (".json", True)):
        p = tmp_path / f"s{suffix}"
        p.write_text(dump_spec(SPEC, ["fc3.bias"], as_json=as_json))
        loaded = load_spec(p)
        assert loaded == SPEC
        assert loaded.digest() == SPEC.digest()


def test_structural_problems_are_all_reported() -> None:
    with pytest.raises(SpecError) as e:
        PermutationSpec({"w": ["A", "B"]}, {"A": 0, "C": 3})
    assert e.value.problems == [
        "group 'A': size must be a positive integer, got 0",
        "'w' axis 1: group 'B' has no size",
        "group 'C' has no members",
    ]


def test_validate_against_shapes() -> None:
    SPEC.validate(SHAPES)
    bad = {**SHAPES, "fc2.weight": (6, 4), "fc3.weight": (2, 14)}
    del bad["fc1.bias"]
    assert SPEC.problems(bad) == [
        "tensor 'fc1.bias' named in the spec is not in the checkpoint",
        "tensor 'fc2.weight' axis 0 has length 6, group 'P2' has size 5",
        "tensor 'fc3.weight' axis 1 has length 14, group 'P2' has size 5 x block 3",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("groups: {P: {size: 2, members: [[w, 0]]}}", "missing 'format_version'"),
        (
            "format_version: 2\ngroups: {P: {size: 2, members: [[w, 0]]}}",
            "unsupported format_version 2 (this rebasin reads 1)",
        ),
        ("format_version: 1\ngroups: {}", "'groups' must be a non-empty mapping of group name to group"),
        (
            "format_version: 1\ngroups: {P: {size: 2, members: [[w]]}}",
            "group 'P': member ['w'] must be [tensor_name, axis], [tensor_name, axis, block_size] or [tensor_name, axis, block_size, offset]",
        ),
        (
            "format_version: 1\ngroups: {P: {size: 2, members: [[w, 0]]}, Q: {size: 2, members: [[w, 0]]}}",
            "'w' axis 0 is claimed by both 'P' and 'Q'",
        ),
        (
            "format_version: 1\ngroups: {P: {size: 2, members: []}}",
            "group 'P': 'members' must be a non-empty list",
        ),
        (
            "format_version: 1\ngroups: {P: {size: 2, members: [[w, 0]], note: x}}",
            "group 'P': unknown key 'note'",
        ),
    ],
)
def test_strict_file_format(tmp_path: Path, text: str, problem: str) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert problem in e.value.problems


def test_unparseable_file(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("groups: [unclosed")
    with pytest.raises(SpecError, match=r"cannot parse spec"):
        load_spec(p)


sizes_strategy = st.dictionaries(st.sampled_from(["P1", "P2"]), st.integers(1, 6), min_size=2, max_size=2)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_permutation_algebra(s1: int, s2: int) -> None:
    state = {k: torch.randn(*v) for k, v in SHAPES.items()}
    p, q = random_permutation(SPEC, s1), random_permutation(SPEC, s2)
    pq = permute(permute(state, SPEC, p), SPEC, q)
    direct = permute(state, SPEC, compose(p, q))
    back = permute(permute(state, SPEC, p), SPEC, invert(p))
    for k in state:
        assert torch.equal(pq[k], direct[k])
        assert torch.equal(back[k], state[k])
    ident = permute(state, SPEC, identity(SPEC))
    assert all(torch.equal(ident[k], state[k]) for k in state)


def test_block_axis_moves_whole_blocks() -> None:
    w = torch.arange(30.0).reshape(2, 15)
    perm = {"P1": torch.arange(4), "P2": torch.tensor([4, 0, 1, 2, 3])}
    out = permute({"fc3.weight": w}, SPEC, perm)["fc3.weight"]
    assert out[0].tolist() == [12.0, 13.0, 14.0, *range(12)]


def test_heads_and_ties_are_checked() -> None:
    from rebasin.spec.core import Heads

    with pytest.raises(SpecError) as info:
        PermutationSpec(
            {"w": ["A", "B"], "v": ["C"]},
            {"A": 6, "B": 6, "C": 8},
            heads={"A": Heads(4, "t"), "B": Heads(3, "t"), "C": Heads(2, "u")},
        )
    assert str(info.value) == (
        "group 'A': size 6 is not a multiple of 4 heads; tie 't': its groups have different head "
        "counts; tensor 'w': tied groups of 't' sit on two of its axes"
    )


FUSED = PermutationSpec(
    {
        "qkv.weight": [(Axis("qk", 1, 0), Axis("qk", 1, 8), Axis("vo", 1, 16)), "res"],
        "qkv.bias": [(Axis("qk", 1, 0), Axis("qk", 1, 8), Axis("vo", 1, 16))],
        "proj.weight": ["res", "vo"],
        "gate.weight": [(Axis("hid", 1, 0), Axis("hid", 1, 6)), "res"],
        "down.weight": ["res", "hid"],
        "norm.weight": ["res"],
    },
    {"qk": 8, "vo": 8, "res": 5, "hid": 6},
    heads={"qk": Heads(2, "attn"), "vo": Heads(2, "attn"), "hid": Heads(3)},
)
FUSED_SHAPES = {
    "qkv.weight": (24, 5),
    "qkv.bias": (24,),
    "proj.weight": (5, 8),
    "gate.weight": (12, 5),
    "down.weight": (5, 6),
    "norm.weight": (5,),
}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_permutation_algebra_with_segments_and_heads(s1: int, s2: int) -> None:
    from rebasin.permutation import check_permutation

    FUSED.validate(FUSED_SHAPES)
    state = {k: torch.randn(*v) for k, v in FUSED_SHAPES.items()}
    p, q = random_permutation(FUSED, s1), random_permutation(FUSED, s2)
    check_permutation(FUSED, p)  # heads stay whole, tied heads move together
    pq = permute(permute(state, FUSED, p), FUSED, q)
    direct = permute(state, FUSED, compose(p, q))
    back = permute(permute(state, FUSED, p), FUSED, invert(p))
    for k in state:
        assert torch.equal(pq[k], direct[k])
        assert torch.equal(back[k], state[k])
    # segments move within their own stretch: the q, k and v thirds keep their rows' sets
    moved = permute(state, FUSED, p)["qkv.bias"]
    for lo in (0, 8, 16):
        assert sorted(moved[lo : lo + 8].tolist()) == sorted(state["qkv.bias"][lo : lo + 8].tolist())
    # q and k rows move together, so the bilinear form q.k is unchanged up to the input's order
    w, m = state["qkv.weight"], permute(state, FUSED, p)["qkv.weight"]
    r = p["res"]
    assert torch.allclose((w[:8].T @ w[8:16])[r][:, r], m[:8].T @ m[8:16], atol=1e-5)


def test_check_permutation_rejects_split_heads() -> None:
    from rebasin.permutation import check_permutation

    p = identity(FUSED)
    p["qk"] = torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])  # unit 3 and 4 swap across the head border
    with pytest.raises(ValueError, match="the permutation splits a head"):
        check_permutation(FUSED, p)
