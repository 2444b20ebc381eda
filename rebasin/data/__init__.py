"""Data sets: built-in (mnist1d, digits, synthetic) and user data (.safetensors/.npz, MODULE:FUNCTION)."""

from rebasin.data.core import Dataset, batches, list_data, load_data, register_data

__all__ = ["Dataset", "batches", "list_data", "load_data", "register_data"]
