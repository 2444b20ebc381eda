"""The commands on one checkpoint: ``permute`` (a random function-preserving permutation),
``spec`` (its permutation groups) and ``inspect`` (what it holds)."""

from __future__ import annotations

from typing import Any

import torch

from rebasin.checkpoint import load_checkpoint
from rebasin.commands.resolve import resolve_run
from rebasin.commands.stages import finish, run_spec
from rebasin.commands.writing import output_metadata, write_checkpoint
from rebasin.core.errors import SpecError
from rebasin.core.sizes import parse_size
from rebasin.core.types import PathLike
from rebasin.options import Options
from rebasin.permutation import permute, random_permutation
from rebasin.report.document import input_info, new_report, spec_info
from rebasin.spec.choose import spec_config
from rebasin.spec.core import PermutationSpec
from rebasin.spec.names import infer_spec
from rebasin.verify.worker import Check


def permute_checkpoint(
    path: PathLike, out: PathLike | None = None, options: Options | None = None
) -> dict[str, Any]:
    """Write a random function-preserving permutation of a checkpoint; return the report."""
    opts = options or Options()
    run = resolve_run("permute", opts, [path], out if out is not None else opts.output.output)
    ck = run.checkpoints[0]
    spec, source, frozen, _, _ = run_spec(run)
    kept: dict[str, str] = {}  # group held at the identity -> why
    if spec.output_group and len(spec.sizes) > 1:  # decided by the family, not left to the check
        kept[spec.output_group] = f"the model's output axis (a headless {spec.family} model)"
    perm = random_permutation(spec, run.seed)
    for g in kept:
        perm[g] = torch.arange(len(perm[g]))
    with Check(run.verification, run.seed, spec, [(ck, "the permuted model", "the original")]) as check:
        equivalence = check(perm)
        found = equivalence.get("output_group")
        if found:  # an output axis the check found: moving it would change what the model returns
            kept[found] = "the model's output axis (found by the check)"
            perm[found] = torch.arange(len(perm[found]))
            equivalence = check(perm)
    meta = output_metadata(
        ck.metadata, command="permute", seed=run.seed, spec=source, spec_digest=spec.digest()
    )
    out_path = run.outputs[0].path
    files = write_checkpoint(
        permute(ck.state, spec, perm), out_path, meta, ck, parse_size(opts.output.shard_size)
    )
    report = new_report("permute")
    report["inputs"] = {"a": input_info(ck)}
    report["spec"] = spec_info(spec, source, list(ck.state)) | {"frozen": frozen}
    report["seed"] = run.seed
    report["equivalence"] = equivalence
    report["kept"] = kept
    if kept:
        report["notes"] = [f"kept group '{g}' fixed: {why}" for g, why in kept.items()]
    report["moved_fraction"] = {g: float((p != torch.arange(len(p))).float().mean()) for g, p in perm.items()}
    report["output"] = {"files": [str(f) for f in files]}
    return finish(report, run)


def describe_spec(path: PathLike, options: Options | None = None) -> tuple[PermutationSpec, str, list[str]]:
    """The spec of a checkpoint, where it came from, and the tensors it leaves fixed."""
    opts = options or Options()
    run = resolve_run("spec", opts, [path], opts.output.output)
    spec, source, _, _, _ = run_spec(run, check_data=False, show=True)
    return spec, source, spec.fixed(list(run.checkpoints[0].state))


def inspect_checkpoint(path: PathLike) -> dict[str, Any]:
    """Tensors, shapes, dtypes, parameter count, metadata and the recognized family."""
    ck = load_checkpoint(path)
    info = new_report("inspect")
    info["input"] = input_info(ck, with_hash=False)
    info["files"] = [str(f) for f in ck.files]
    info["metadata"] = dict(sorted(ck.metadata.items()))
    info["tensors"] = [
        {"name": k, "shape": list(ck.shapes[k]), "dtype": str(ck.dtypes[k]).removeprefix("torch.")}
        for k in ck.state
    ]
    try:
        s = infer_spec(ck.shapes, order=ck.order, config=spec_config(ck))
        info["family"] = s.family
        info["groups"] = len(s.sizes)
    except SpecError:
        info["family"] = None
    return info
