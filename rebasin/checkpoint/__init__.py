"""Checkpoints in and out: loading (``load``), saving (``save``), the output guard (``guard``)."""

from rebasin.checkpoint.guard import check_output_path
from rebasin.checkpoint.load import load_checkpoint, read_hf_config
from rebasin.checkpoint.save import copy_model_files, save_checkpoint, write_safetensors
from rebasin.checkpoint.state import Checkpoint, LazyStateDict, StateDict, natural_key
from rebasin.core.sizes import parse_size

__all__ = [
    "Checkpoint",
    "LazyStateDict",
    "StateDict",
    "check_output_path",
    "copy_model_files",
    "load_checkpoint",
    "natural_key",
    "parse_size",
    "read_hf_config",
    "save_checkpoint",
    "write_safetensors",
]
