"""Golden files: `rebasin spec` output for one checkpoint of every family (and a traced model).

Regenerate after an intended change with ``REBASIN_UPDATE_GOLDEN=1 pytest tests/test_golden.py``
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cases import CASES
from helpers import run
from safetensors.torch import save_file

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("REBASIN_UPDATE_GOLDEN") == "1"
NAMED = ("mlp-bn", "vgg-bn-flatten", "resnet20-bn", "resnet-bottleneck", "transformer")


def check(name: str, produced: Path) -> None:
    golden = GOLDEN / f"{name}.yaml"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(produced.read_text())
    assert produced.read_text() == golden.read_text(), f"spec of {name} changed; see {golden}"


@pytest.mark.parametrize("case", [c for c in CASES if c.id in NAMED], ids=lambda c: c.id)
def test_name_based_spec_matches_golden(case: object, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = case.make(0)  # type: ignore[attr-defined]
    ck = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck))
    out = tmp_path / "spec.yaml"
    code, _, err = run("spec", ck, "-o", out, "--quiet")
    assert code == 0, err
    check(case.id, out)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "vit"])
def test_transformers_spec_matches_golden(kind: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from helpers import tiny

    d = tmp_path / kind
    tiny(kind, 0).save_pretrained(d)
    out = tmp_path / "spec.yaml"
    code, _, err = run("spec", d, "-o", out, "--quiet")
    assert code == 0, err
    check(f"hf-{kind}", out)


def test_traced_spec_matches_golden(tmp_path: Path) -> None:
    import user_models

    model = user_models.attention_net()
    ck = tmp_path / "m.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(ck))
    out = tmp_path / "spec.yaml"
    ref = f"{Path(user_models.__file__)}:attention_net"
    code, _, err = run("spec", ck, "--model", ref, "-o", out, "--quiet")
    assert code == 0, err
    check("traced-attention-net", out)
