"""Specs traced from model code: user-style modules and the built-in models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import user_models
from cases import CASES, Case
from helpers import expect_error, run
from safetensors.torch import load_file, save_file
from torch import nn

from rebasin.models import build_model
from rebasin.permutation import permute, random_permutation
from rebasin.spec import infer_spec
from rebasin.spec.core import Heads, PermutationSpec
from rebasin.spec.trace import trace_spec

HERE = Path(user_models.__file__).parent
USER = (
    "residual_cnn", "mixer", "attention_net", "functional", "se_net", "einsum_attention", "nano_gpt",
    "nano_gpt_rope",
)  # fmt: skip


def ref(name: str) -> str:
    return f"{HERE / 'user_models.py'}:{name}"


def save(model: nn.Module, path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_model(name: str, state: dict[str, torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(0)  # the same example input every time
    m = getattr(user_models, name)()
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        return m(m.example_input)


def canonical(spec: PermutationSpec) -> list[list[tuple[str, int, int, int]]]:
    return sorted(sorted((m.param, m.axis, m.inner, m.start) for m in ms) for ms in spec.groups.values())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("traced")
    out = {}
    for name in USER:
        paths = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            m = getattr(user_models, name)()
            for mod in m.modules():  # non-trivial norm statistics, so BN buffers must move
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-1, 1)
                    mod.running_var.uniform_(0.5, 2)
            paths.append(save(m, root / f"{name}-{seed}.safetensors"))
        out[name] = (paths[0], paths[1])
    return out


@pytest.mark.parametrize("name", USER)
def test_traced_permutation_preserves_outputs(
    name: str, pairs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, _ = pairs[name]
    out = tmp_path / "p.safetensors"
    code, stdout, err = run("permute", a, "-o", out, "--model", ref(name), "--seed", "4", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["spec"]["source"] == f"traced:{ref(name)}"
    assert all(v > 0 for v in rep["moved_fraction"].values())
    before, after = run_model(name, load_file(str(a))), run_model(name, load_file(str(out)))
    assert torch.allclose(before, after, atol=1e-4), float((before - after).abs().max())


@pytest.mark.parametrize("name", USER)
def test_traced_merge_recovers_and_averages(
    name: str, pairs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, b = pairs[name]
    perm, merged = tmp_path / "p.safetensors", tmp_path / "m.safetensors"
    assert run("permute", a, "-o", perm, "--model", ref(name), "--seed", "7", "--quiet")[0] == 0
    code, _, err = run("merge", a, perm, "-o", merged, "--model", ref(name), "--quiet")
    assert code == 0, err
    ta, tm = load_file(str(a)), load_file(str(merged))
    for k in ta:
        assert torch.allclose(ta[k].float(), tm[k].float(), atol=1e-6), k
    pb = tmp_path / "pb.safetensors"
    code, _, err = run(
        "merge", a, b, "-o", merged, "--model", ref(name), "--save-permuted", pb, "--force", "--quiet"
    )
    assert code == 0, err
    tb, tp, tm = load_file(str(b)), load_file(str(pb)), load_file(str(merged))
    for k in ta:
        if ta[k].is_floating_point():
            assert torch.allclose(tm[k], 0.5 * (ta[k] + tp[k]), atol=1e-6), k
    assert torch.allclose(run_model(name, tb), run_model(name, tp), atol=1e-4)


def test_traced_groups_of_user_models() -> None:
    sizes = {name: trace_spec(getattr(user_models, name)()).sizes for name in USER}
    assert sizes["residual_cnn"] == {"block1.1": 8, "residual": 8, "block2.0": 16, "down": 16}
    assert sizes["mixer"] == {
        "blocks.0.token_mlp.0": 32, "blocks.0.channel_mlp.0": 48, "blocks.1.token_mlp.0": 32,
        "blocks.1.channel_mlp.0": 48, "residual": 16,
    }  # fmt: skip
    assert sizes["functional"] == {"wa": 16, "wb": 16, "wa.in1": 16}
    assert sizes["se_net"] == {"fc1": 4, "residual": 16, "pw": 24}
    assert sizes["einsum_attention"] == {"qkv.part0": 16, "o.in1": 16, "residual": 16}
    # hand-written attention: heads found through the view into (heads, head dims)
    nano = trace_spec(user_models.nano_gpt())
    assert nano.heads["blocks.0.c_attn.part0"] == Heads(4, "blocks.0.c_attn.part0.heads")  # q/k
    assert nano.heads["blocks.0.c_proj.in1"] == Heads(4, "blocks.0.c_attn.part0.heads")  # v/o
    assert nano.sizes["blocks.0.c_attn.part0"] == 32  # moves within heads too
    rope = trace_spec(user_models.nano_gpt_rope())
    assert rope.sizes["blocks.0.c_attn.part0.heads"] == 4  # rotary: q/k move as whole heads only
    assert rope.heads["blocks.0.c_proj.in1"].tie == rope.heads["blocks.0.c_attn.part0.heads"].tie
    spec = trace_spec(user_models.attention_net())
    assert spec.heads["attn.0.qk"].count == 4 and spec.heads["attn.0.qk"].tie == spec.heads["attn.0.vo"].tie
    assert (
        spec.entry("attn.0.in_proj_weight", 0) == (spec.entry("attn.0.in_proj_bias", 0))
        and len(spec.entry("attn.0.in_proj_weight", 0)) == 3
    )  # type: ignore[arg-type]
    # the tied output head moves with the embedding
    assert spec.axes_to_perm["out.weight"] == spec.axes_to_perm["embed.weight"]
    gn = trace_spec(user_models.residual_cnn())
    assert gn.heads == {"block2.0": gn.heads["block2.0"]} and gn.heads["block2.0"].count == 4


@pytest.mark.parametrize(
    ("arch", "args", "x"),
    [
        ("mlp", {"in_features": 40, "hidden": 32, "depth": 2, "num_classes": 10}, (4, 40)),
        ("vgg", {"in_channels": 1}, (4, 1, 8, 8)),
        ("resnet20", {"width": 1, "in_channels": 1}, (4, 1, 16, 16)),
        ("transformer", {}, (4, 40)),
    ],
)
def test_traced_spec_of_built_in_models_equals_the_name_based_one(
    arch: str, args: dict[str, int], x: tuple[int, ...]
) -> None:
    model = build_model(arch, **args)
    traced = trace_spec(model, (torch.randn(x),))
    assert canonical(traced) == canonical(infer_spec(model.state_dict()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_traced_spec_equals_name_based_on_every_case(case: Case) -> None:
    model = case.make(0)
    traced = trace_spec(model, (torch.randn(case.input_shape),))
    assert canonical(traced) == canonical(infer_spec(model.state_dict()))


class Flipper(nn.Module):
    """torch.flip is not understood: whatever it touches must stay fixed, and be listed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(torch.flip(self.b(torch.relu(self.a(x))), dims=[-1])))


def test_unknown_ops_fix_what_they_touch_and_are_listed() -> None:
    model = Flipper().eval()
    spec = trace_spec(model, (torch.randn(2, 6),))
    assert spec.notes == ["not understood: flip"]
    assert list(spec.sizes) == ["a"]  # b's outputs feed the flip: fixed
    x = torch.randn(5, 6)
    other = copy.deepcopy(model)
    other.load_state_dict(dict(permute(model.state_dict(), spec, random_permutation(spec, 0))))
    assert torch.allclose(model(x), other(x), atol=1e-6)


class Assigner(nn.Module):
    """Writing into one channel is not permutation-equivariant: that channel group must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)).clone()
        h[:, 0] = 0.0
        return self.b(h)


def test_item_assignment_fixes_what_it_writes_into() -> None:
    spec = trace_spec(Assigner())
    assert spec.sizes == {} and spec.notes == ["not understood: item assignment (x[...] = ...)"]


def test_model_that_does_not_fit_lists_first_mismatches(
    pairs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    a, _ = pairs["mixer"]
    expect_error(
        ["spec", a, "--model", ref("functional")],
        f"{a}: model '{ref('functional')}' does not fit the checkpoint: missing 'w1', 'b1', 'wa'; "
        "unexpected 'blocks.0.channel_mlp.0.bias', 'blocks.0.channel_mlp.0.weight', "
        "'blocks.0.channel_mlp.2.bias'",
        "pass the --model (and --model-args) the checkpoint was made with",
    )


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model only runs on Tuesdays")


def test_a_model_that_fails_on_its_example_input_is_one_clear_error() -> None:
    with pytest.raises(Exception) as info:
        trace_spec(Broken())
    assert str(info.value) == (
        "cannot run model 'model' on an example input of shape (2, 4): this model only runs on Tuesdays"
    )


def test_a_failing_op_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(7, 2))
    with pytest.raises(Exception) as info:
        trace_spec(model)
    assert str(info.value) == (
        "cannot run model 'model' on an example input of shape (2, 4) in linear: "
        "mat1 and mat2 shapes cannot be multiplied (2x8 and 7x2)"
    )


def test_own_transformer_moves_heads_when_the_checkpoint_records_them(tmp_path: Path) -> None:
    """rebasin's transformer: `rebasin train` records the head count, so heads move too."""
    import json as js

    from rebasin.models.resolve import ModelRef

    args = {"seq_len": 12, "dim": 16, "depth": 2, "heads": 4}
    meta = ModelRef("transformer", args).metadata()
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model("transformer", **args)
        p = tmp_path / f"t{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p), metadata=meta)
        paths.append(p)
    code, stdout, err = run("spec", paths[0], "--json")
    assert code == 0, err
    spec = js.loads(stdout)
    assert spec["groups"]["P_blocks.0.attn.qk"]["heads"] == 4
    perm = tmp_path / "p.safetensors"
    code, stdout, err = run("permute", paths[0], "-o", perm, "--seed", "3", "--json")
    assert code == 0, err
    assert js.loads(stdout)["moved_fraction"]["P_blocks.1.attn.vo"] > 0
    x = torch.randn(3, 12)

    def out(path: Path) -> torch.Tensor:
        m = build_model("transformer", **args).eval()
        m.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            return m(x)

    assert torch.allclose(out(paths[0]), out(perm), atol=1e-5)
    back = tmp_path / "back.safetensors"
    assert run("merge", paths[0], perm, "-o", back, "--quiet")[0] == 0
    ta, tb = load_file(str(paths[0])), load_file(str(back))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
