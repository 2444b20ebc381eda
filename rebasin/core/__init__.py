"""The bottom layer every room shares, torch-free: errors, registries, option fields, sizes, the
shared types (``Permutation``, ``Progress``), text files and importing user code."""
