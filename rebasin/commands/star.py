"""``rebasin star M1 ... Mn -o STAR``: train a star model for the sources (Starlight), write it,
and report its barriers to every source and held-out model beside the sources' pairwise ones.
Reads as a straight line: load -> resolve -> spec -> train (resumable) -> write -> evaluate ->
report."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from rebasin.checkpoint import load_checkpoint
from rebasin.commands.resolve import resolve_run
from rebasin.commands.stages import Timings, curves, evaluator, finish, outputs_of, run_spec
from rebasin.commands.writing import output_metadata, sub_progress, write_checkpoint
from rebasin.core.errors import ConfigError
from rebasin.core.sizes import parse_size
from rebasin.core.types import PathLike, Progress
from rebasin.evaluate.metrics import logits_and_targets
from rebasin.evaluate.setup import EvaluatorData
from rebasin.evaluate.star import StarConfig, calibration, star_points, train_star
from rebasin.matching import match
from rebasin.options import Options
from rebasin.permutation import permute
from rebasin.report.document import input_info, new_report


def state_file(out: PathLike) -> Path:
    """The resumable state kept beside the output while a star model trains."""
    return Path(f"{out}.star-state.pt")


def star_checkpoints(
    sources: list[PathLike], out: PathLike, options: Options | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Train the star model of ``sources``, write it to ``out`` and return the report."""
    opts = options or Options()
    s = opts.star
    if not sources:
        raise ConfigError("star needs at least one source model")
    held = [Path(p) for p in s.held_out]
    state = state_file(out)
    if state.exists() and not (s.resume or opts.output.force):
        raise ConfigError(
            f"a star training state from an earlier run is here: {state}",
            "pass --resume to continue it, or --force to start over",
        )
    if s.resume and not state.exists():
        raise ConfigError(f"--resume: no star training state to continue ({state})", "run without --resume")
    timings = Timings()
    run = resolve_run("star", opts, [*sources, *held], out)
    if run.evaluation is None:
        raise ConfigError("star trains on data", "pass --data")
    cks = run.checkpoints
    src_cks, held_cks = cks[: len(sources)], cks[len(sources) :]
    spec, source, _, _, _ = run_spec(run)
    ev = evaluator(run)
    loss = EvaluatorData(ev, cks[0], spec, run.seed).task_loss()
    init = _init(s.star_init, ev, cks[0], run.seed)

    def align(star: Any, src: Any) -> Any:
        return match(star, src, spec, method="weight", seed=run.seed).perm

    config = StarConfig(steps=s.star_steps, refresh=s.refresh, lr=s.star_lr, seed=run.seed)
    with timings("train_s"):
        star, losses = train_star(
            init, [c.state for c in src_cks], spec, loss, align, config, state, s.resume, progress
        )
    report = new_report("star")
    report["inputs"] = {
        "sources": [input_info(c) for c in src_cks],
        "held_out": [input_info(c) for c in held_cks],
    }
    report["star"] = {
        "steps": s.star_steps,
        "refresh": s.refresh,
        "lr": s.star_lr,
        "init": s.star_init,
        "seed": run.seed,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "memory": "star model, its gradient and two Adam moments, and every source aligned to it: "
        f"{4 + len(src_cks)} times the model's float32 size",
    }
    with outputs_of(run):
        meta = output_metadata(
            cks[0].metadata,
            command="star",
            seed=run.seed,
            spec=source,
            spec_digest=spec.digest(),
            models=len(src_cks),
        )
        with timings("write_s"):
            files = write_checkpoint(
                star, out, meta, cks[0], parse_size(opts.output.shard_size), sub_progress(progress, "writing")
            )
        report["output"] = {"files": {"star": [str(f) for f in files]}}
        with timings("evaluate_s"):
            report["barriers"] = _barriers(run, ev, star, src_cks, held_cks, spec, progress)
            if s.average is not None:
                report["average"] = _average(ev, star, src_cks, spec, s.average, run.seed, align)
        report["timings"] = timings.total()
        result = finish(report, run)
    state.unlink(missing_ok=True)  # the star model is written: nothing left to resume
    return result


def _init(init: str, ev: Any, a: Any, seed: int) -> dict[str, torch.Tensor]:
    if init == "random":  # its own seed stream: not the initialization of a source trained with --seed
        torch.manual_seed(seed * 7919 + 104729)
        model = ev.make_model()
        if hasattr(model, "init_weights"):  # Hugging Face models are built uninitialized, to be loaded
            model.init_weights()
        own = {k: v.detach() for k, v in model.state_dict().items()}
        missing = sorted(set(a.state) - set(own))
        if missing:
            raise ConfigError(
                f"--init random: the model has no tensor '{missing[0]}' of the sources",
                "start from a checkpoint: --init PATH",
            )
        return {k: own[k].to(a.state[k].dtype) for k in a.state}
    ck = load_checkpoint(init)
    missing = sorted(set(a.state) - set(ck.state))
    if missing:
        raise ConfigError(f"--init lacks tensor '{missing[0]}' of the sources", source=init)
    return {k: ck.state[k] for k in a.state}


def _barrier(ev_paths: dict[str, Any], path: str) -> float:
    return float(ev_paths[path]["barriers"]["test"]["loss"]["linear"])


def _barriers(
    run: Any,
    ev: Any,
    star: dict[str, torch.Tensor],
    sources: Any,
    held: Any,
    spec: Any,
    progress: Progress | None,
) -> dict[str, Any]:
    """Test loss barriers (linear definition), naive and aligned: star to each source and each
    held-out model, and between every pair of sources."""

    def pair(a: Any, b: Any) -> dict[str, float]:
        perm = match(a, b, spec, method="weight", seed=run.seed).perm
        paths = curves(run, ev, a, b, permute(b, spec, perm), progress)["paths"]
        test = paths["naive"]["loss"]["test"]
        return {
            "naive": _barrier(paths, "naive"),
            "aligned": _barrier(paths, "aligned"),
            "loss_start": test[0],
            "loss_end": test[-1],
            "aligned_midpoint_loss": paths["aligned"]["loss"]["test"][len(test) // 2],
        }

    to_sources = [pair(star, c.state) | {"model": c.name} for c in sources]
    to_held = [pair(star, c.state) | {"model": c.name} for c in held]
    between = [
        pair(a.state, b.state) | {"a": a.name, "b": b.name} for a, b in itertools.combinations(sources, 2)
    ]

    def mean(rows: list[dict[str, Any]]) -> float | None:
        return sum(r["aligned"] for r in rows) / len(rows) if rows else None

    return {
        "measure": "test loss barrier (linear definition); aligned: weight matching",
        "star_to_sources": to_sources,
        "star_to_held_out": to_held,
        "between_sources": between,
        "mean_aligned": {
            "star_to_sources": mean(to_sources),
            "star_to_held_out": mean(to_held),
            "between_sources": mean(between),
        },
    }


def _probabilities(ev: Any, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities on the test split (BatchNorm mode applied) and the targets."""
    m = ev._model(state, "star point")
    ev.fix_statistics(m, 0.5, None)
    x, y = ev.data.split("test")
    probs, ys = [], []
    with torch.no_grad():
        for i in range(0, len(y), ev.batch_size):
            out, yb = logits_and_targets(
                m(x[i : i + ev.batch_size].to(ev.device)),
                y[i : i + ev.batch_size].to(ev.device),
                ev.data.task,
            )
            probs.append(out.float().softmax(-1).cpu())
            ys.append(yb.cpu())
    return torch.cat(probs), torch.cat(ys)


def _average(
    ev: Any, star: dict[str, torch.Tensor], sources: Any, spec: Any, k: int, seed: int, align: Any
) -> dict[str, Any]:
    """The Bayesian model average over ``k`` points of the star domain beside the sources'
    ensemble: accuracy, expected calibration error and NLL of the averaged probabilities."""
    aligned = [dict(permute(c.state, spec, align(star, c.state))) for c in sources]
    points = star_points(star, aligned, k, seed)
    star_probs = [_probabilities(ev, p) for p in points]
    y = star_probs[0][1]
    bma = torch.stack([p for p, _ in star_probs]).mean(0)
    ensemble = torch.stack([_probabilities(ev, dict(c.state))[0] for c in sources]).mean(0)
    single = _probabilities(ev, star)[0]
    return {
        "points": k,
        "star_domain_average": calibration(bma, y),
        "sources_ensemble": calibration(ensemble, y),
        "star_model": calibration(single, y),
    }
