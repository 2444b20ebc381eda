"""Permutation specs: the data model, files, and inference from names and shapes."""

from rebasin.spec.core import Axis, Member, PermutationSpec, dump_spec, load_spec
from rebasin.spec.names import infer_spec, shapes_of
from rebasin.spec.registry import SpecFamily, get_spec_family, list_specs, register_spec

__all__ = [
    "Axis",
    "Member",
    "PermutationSpec",
    "SpecFamily",
    "dump_spec",
    "get_spec_family",
    "infer_spec",
    "list_specs",
    "load_spec",
    "register_spec",
    "shapes_of",
]
