"""Turn a model argument (built-in name, ``MODULE:FACTORY``, ``file.py:FACTORY``) or a checkpoint's
metadata into a factory of fresh models."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from rebasin.core.errors import ConfigError, RebasinError
from rebasin.core.fields import parse_json_object
from rebasin.core.usercode import brief, call_user, import_object, is_code_ref
from rebasin.data import list_data
from rebasin.models.registry import build_model, list_models
from rebasin.models.reshape import SHAPES_KEY, recorded_shapes, resize_modules

ARCH_KEY = "rebasin.arch"
ARGS_KEY = "rebasin.arch_args"
DATA_KEY = "rebasin.data"


@dataclass(frozen=True)
class ModelRef:
    """How to build the model: a name (built-in or import path) and keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """A Hugging Face config.json: the model is built from it (``name`` is ``hf:ARCHITECTURE``)."""
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Tensors built at another shape than the factory gives them (a widening merge's record)."""

    def build(self) -> nn.Module:
        """A fresh model."""
        return self.factory()()

    def factory(self) -> Callable[[], nn.Module]:
        """A zero-argument factory (checked once)."""
        if self.config is not None:
            return hf_factory(self.config)
        fn = _factory(self.name)
        args = dict(self.args)
        try:
            model = fn(**args)
        except TypeError as e:
            raise ConfigError(f"bad arguments for model '{self.name}': {e}") from None
        except ConfigError:
            raise
        except Exception as e:  # the user's factory raised
            raise ConfigError(f"the model factory '{self.name}' failed ({brief(e)})") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"the model factory '{self.name}' returned a {type(model).__name__}, not a torch.nn.Module"
            )
        if self.shapes:
            shapes = dict(self.shapes)
            return lambda: resize_modules(call_user(self.name, "the model factory", fn, **args), shapes)
        return lambda: call_user(self.name, "the model factory", fn, **args)

    def metadata(self) -> dict[str, str]:
        """Checkpoint metadata that lets later commands rebuild this model: recorded only for
        built-in models (a file never names code to import; see :func:`trusted_records`)."""
        if self.name not in list_models():
            return {}
        out = {ARCH_KEY: self.name, ARGS_KEY: json.dumps(self.args, sort_keys=True)}
        if self.shapes:
            out[SHAPES_KEY] = json.dumps({k: list(v) for k, v in self.shapes}, sort_keys=True)
        return out


CODE_HINT = "rebasin never imports code a file names; if you trust it, pass it yourself: {flag} {name}"


def _built_in(metadata: Mapping[str, str], key: str) -> bool:
    """The one rule for records in a file: only registered built-in names are trusted."""

    name = metadata.get(key)
    return name is not None and name in (list_models() if key == ARCH_KEY else list_data())


def _recorded(metadata: Mapping[str, str], key: str, source: str) -> str | None:
    """The trusted name a checkpoint records under ``key``, None when it records none; any other
    record is refused with a hint."""
    name = metadata.get(key)
    if name is None or _built_in(metadata, key):
        return name
    kind, flag = ("model", "--model") if key == ARCH_KEY else ("data set", "--data")
    raise ConfigError(
        f"the checkpoint's {key} names '{name}', which is not a built-in {kind}",
        CODE_HINT.format(flag=flag, name=name) if is_code_ref(name) else f"pass {flag}",
        source=source,
    )


def recorded_arch(metadata: Mapping[str, str], source: str) -> tuple[str, dict[str, Any]] | None:
    """The built-in architecture (and its arguments) a checkpoint records, or None. A record that
    names anything but a registered built-in model (``MODULE:NAME``, ``file.py:NAME``) is refused:
    loading a file never runs code."""
    name = _recorded(metadata, ARCH_KEY, source)
    if name is None:
        return None
    try:
        args = json.loads(metadata.get(ARGS_KEY, "{}"))
    except ValueError:
        args = {}
    return name, args if isinstance(args, dict) else {}


def recorded_data(metadata: Mapping[str, str], source: str) -> str | None:
    """The built-in data set a checkpoint records, or None; anything else is refused (a file
    never names code to import or other files to read)."""
    return _recorded(metadata, DATA_KEY, source)


def trusted_records(metadata: Mapping[str, str]) -> dict[str, str]:
    """The architecture and data records of ``metadata`` that later commands may use (built-in
    names only): what outputs carry forward, so a refused record never spreads."""
    keys = [ARCH_KEY, ARGS_KEY, SHAPES_KEY] if _built_in(metadata, ARCH_KEY) else []
    keys += [DATA_KEY] if _built_in(metadata, DATA_KEY) else []
    return {k: metadata[k] for k in keys if k in metadata}


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``--model-args`` JSON object -> dict (checked by the options model's rule)."""

    return parse_json_object(text, "--model-args") if text else {}


def resolve_model(
    model: str | None,
    model_args: str | Mapping[str, Any] | None,
    metadata: Mapping[str, str],
    source: str,
    config: Mapping[str, Any] | None = None,
) -> ModelRef:
    """The model to use: the ``--model`` given, else the architecture recorded in ``metadata``,
    else the Hugging Face ``config`` found beside the weights."""
    args = parse_model_args(model_args) if isinstance(model_args, str | type(None)) else dict(model_args)
    shapes = tuple(sorted(recorded_shapes(metadata).items()))
    if model:
        ref = ModelRef(model, args, shapes=shapes)
    elif ARCH_KEY not in metadata and config is not None:
        arch = (config.get("architectures") or [str(config.get("model_type", "model"))])[0]
        return ModelRef(f"hf:{arch}", {}, dict(config))
    elif ARCH_KEY in metadata:
        name, recorded = recorded_arch(metadata, source) or ("", {})
        ref = ModelRef(name, {**recorded, **args}, shapes=shapes)
    else:
        raise ConfigError(
            "no model definition: the checkpoint records no architecture",
            f"pass --model NAME (built-in: {', '.join(list_models())}) or --model MODULE:FACTORY",
            source=source,
        )
    _factory(ref.name)  # fail early on unknown names
    return ref


SIZE_KEYS = (
    "vocab_size", "hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner",
    "num_attention_heads", "n_head", "num_key_value_heads", "type_vocab_size", "num_labels",
)  # fmt: skip
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def check_sizes(
    config: Mapping[str, Any] | None,
    args: Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    source: str,
) -> None:
    """Sizes a config.json or a recorded ``rebasin.arch_args`` gives must fit the tensors present,
    before any memory is asked for: its layer count is the checkpoint's, and no width exceeds
    what the tensors hold (positions: 64 times, rotary models keep no table for them). Raises
    ConfigError naming the field."""
    largest = max((max(s) for s in shapes.values() if len(s)), default=1)
    bound = max(largest, len(shapes))
    layers = {int(m.group(1)) for k in shapes if (m := LAYER_PATTERN.search(k))}
    if config is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = config.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value != len(layers):
                raise ConfigError(
                    f"config.json: '{key}' is {value}, but the checkpoint holds {len(layers)} layers",
                    "use the model's own config.json, or pass --config FILE",
                    source=source,
                )
        for keys, limit in ((SIZE_KEYS, bound), (POSITION_KEYS, 64 * bound)):
            for key in keys:
                value = config.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool) and value > limit:
                    raise ConfigError(
                        f"config.json: '{key}' is {value}, larger than anything the checkpoint's "
                        f"tensors hold (largest dimension {largest})",
                        "use the model's own config.json, or pass --config FILE",
                        source=source,
                    )
    for key, value in args.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 16 * bound:
            raise ConfigError(
                f"{ARGS_KEY}: '{key}' is {value}, larger than anything the checkpoint's tensors hold "
                f"(largest dimension {largest})",
                "pass --model and --model-args yourself",
                source=source,
            )


@dataclass(frozen=True)
class ModelChoice:
    """The model a run builds (``ref``) and where it comes from (``--model``, ``rebasin.arch``,
    ``config.json``), or the error that says why there is none, raised where one is needed."""

    ref: ModelRef | None
    source: str = ""
    error: RebasinError | None = None
    refused: bool = False
    """Whether the checkpoint records an architecture that is refused (it names code)."""

    def need(self) -> ModelRef:
        """The model, or the error saying why there is none."""
        if self.ref is None:
            assert self.error is not None
            raise self.error
        return self.ref


def choose_model(
    model: str | None,
    model_args: str | Mapping[str, Any] | None,
    metadata: Mapping[str, str],
    source: str,
    config: Mapping[str, Any] | None = None,
) -> ModelChoice:
    """The model for a checkpoint (see :func:`resolve_model`). A model the user names must
    resolve (its errors are raised now); one from the checkpoint's record or config may be
    missing or refused (the error is kept for where a model is needed)."""
    if model:
        return ModelChoice(resolve_model(model, model_args, metadata, source, config), "--model")
    try:
        ref = resolve_model(None, model_args, metadata, source, config)
    except ConfigError as e:
        return ModelChoice(None, "", e, refused=ARCH_KEY in metadata)
    return ModelChoice(ref, "config.json" if ref.config is not None else ARCH_KEY)


def _factory(name: str) -> Callable[..., nn.Module]:
    if ":" not in name:
        if name not in list_models():
            build_model(name)  # raises the unknown-model error with suggestions
        return lambda **kw: build_model(name, **kw)
    fn: Callable[..., nn.Module] = import_object(name)
    return fn


def hf_factory(config: Mapping[str, Any]) -> Callable[[], nn.Module]:
    """Fresh Hugging Face models of the class ``config`` names (random init, nothing downloaded)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "running a Hugging Face model needs transformers", "pip install 'rebasin[hf]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # rebasin draws its own progress
    model_type = config.get("model_type")
    try:
        cfg = transformers.AutoConfig.for_model(str(model_type)).from_dict(dict(config))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"config.json names an unknown model_type '{model_type}' ({e})") from None
    archs = config.get("architectures") or []
    cls = getattr(transformers, str(archs[0]), None) if archs else None
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(f"config.json names '{archs[0]}', which is not a transformers model class")

    def build() -> nn.Module:
        with _no_init(transformers):  # the weights are always loaded (or set) afterwards
            model = cls(cfg) if cls is not None else transformers.AutoModelForCausalLM.from_config(cfg)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # tied heads share the embedding, as after a normal build
        return model.eval()

    key_map = _saved_names(_narrow_build(cls, cfg, transformers) or build())

    def make() -> nn.Module:
        model = build()
        if key_map:
            model.rebasin_key_map = key_map  # type: ignore[assignment]
        _take_packed_masks(model)
        return model

    return make


def _take_packed_masks(model: nn.Module) -> None:
    """Let the model take token ids packed with their attention mask, (N, T, 2), as one input
    (how rebasin's data carries them), besides its usual arguments."""
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[-1] == 2 and not x.is_floating_point():
            return original(input_ids=x[..., 0], attention_mask=x[..., 1])
        return original(*args, **kwargs)

    model.forward = forward


WIDTHS = {"intermediate_size": 16, "n_inner": 16, "vocab_size": 32, "head_dim": 4}


def _narrow_build(cls: Any, cfg: Any, transformers: Any) -> nn.Module | None:
    """The same architecture with every width shrunk (same layers, so the same tensor names):
    enough to learn how ``save_pretrained`` names tensors, at a fraction of the cost. None when
    the config cannot be shrunk that way."""

    try:
        small = copy.deepcopy(cfg)
        heads = getattr(small, "num_attention_heads", None) or getattr(small, "n_head", None)
        if not heads:
            return None
        for name in ("hidden_size", "n_embd"):
            if hasattr(small, name):
                setattr(small, name, int(heads) * 4)
        for name, value in WIDTHS.items():
            if getattr(small, name, None):
                setattr(small, name, value)
        with _no_init(transformers):
            model = cls(small) if cls is not None else transformers.AutoModelForCausalLM.from_config(small)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return model.eval()
    except Exception:
        return None


def _no_init(transformers: Any) -> Any:
    """Skip weight initialization while building (seconds on a 100M-parameter model)."""

    for where in ("initialization", "modeling_utils"):
        fn = getattr(getattr(transformers, where, None), "no_init_weights", None)
        if fn is None:
            try:
                fn = getattr(__import__(f"transformers.{where}", fromlist=["x"]), "no_init_weights", None)
            except ImportError:
                fn = None
        if fn is not None:
            return fn()
    return contextlib.nullcontext()


def _saved_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint name -> module name, where ``save_pretrained`` writes other names than the
    module's state dict holds (transformers renames some layouts on save and load). Found by
    saving a fresh model and matching tensors by value; empty when the names agree."""

    own = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct values everywhere (fresh biases are all zeros)
        for v in own.values():
            if v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.dtype))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)  # type: ignore[operator]
        saved: dict[str, torch.Tensor] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            saved.update(load_file(str(f)))
    if set(saved) <= set(own):
        return {}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for k, v in own.items():
        by_shape.setdefault(tuple(v.shape), []).append(k)
    out = {}
    for k, v in saved.items():
        if k in own and torch.equal(own[k], v):
            continue
        hits = [m for m in by_shape.get(tuple(v.shape), []) if torch.equal(own[m], v)]
        if len(hits) == 1:
            out[k] = hits[0]
    return out
