"""Load a user object named ``MODULE:NAME`` or ``path/to/file.py:NAME``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from rebasin.core.errors import ConfigError


def brief(e: BaseException) -> str:
    """An exception as ``Type: first line of its message``."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def call_user(ref: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call user code, turning whatever it raises into one ConfigError naming the hook."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{what} '{ref}' failed ({brief(e)})", source=None) from None


def is_code_ref(value: str) -> bool:
    """Whether an option value names code to import (``MODULE:NAME`` or ``file.py:NAME``) rather
    than a built-in name or a data file."""
    return ":" in value and not value.startswith(("hf:",))


def import_object(ref: str, kind: str = "callable") -> Any:
    """The callable ``NAME`` of an importable module or a Python file; clear errors otherwise."""
    mod_name, _, attr = ref.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.exists():
                raise ConfigError("no such file", source=mod_name)
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.append(str(Path.cwd()))  # like `python -m`: modules in the working folder
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"cannot import '{mod_name}' ({e})", source=ref) from None
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed while importing (syntax error, raise, ...)
        raise ConfigError(f"importing '{mod_name}' failed ({brief(e)})", source=ref) from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(f"'{mod_name}' has no {kind} '{attr}'", source=ref)
    return obj
