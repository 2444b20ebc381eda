"""The options table of docs/options.md, generated from the model."""

from __future__ import annotations

from pathlib import Path

from rebasin.core.fields import OptionInfo, options_of
from rebasin.matching.registry import MATCHERS
from rebasin.options.build import all_options


def describe_defaults(info: OptionInfo) -> str:
    """The default as the docs table shows it."""
    if info.methods is not None:  # each method's own default
        return _method_defaults(info)
    if info.default_text:
        return info.default_text
    if info.default is None or info.default == ():
        return ""
    if isinstance(info.default, bool):
        return "off" if not info.default else "on"
    return str(info.default)


def _method_defaults(info: OptionInfo) -> str:

    parts = []
    for name in info.methods or ():
        for i in options_of(MATCHERS.get(name), "match"):
            if i.name == info.name:
                d = i.default_text or ("" if i.default is None else str(i.default))
                if d:
                    parts.append(f"{d} ({name})")
    return ", ".join(parts)


def options_table() -> str:
    """The options table of ``docs/options.md`` (generated; a test keeps the file current)."""
    rows = [
        "| option | plan key | commands | methods | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for o in all_options():
        if not o.commands and not o.plan:
            continue
        flag = f"`{o.flag}`" + (f", `{o.short}`" if o.short else "")
        if o.choices:
            flag += " " + "\\|".join(f"`{c}`" for c in o.choices)
        key = f"`{o.name}`" if o.plan else ""
        commands = ", ".join(o.commands) or "API only"
        methods = ", ".join(o.methods) if o.methods else "all"
        default = describe_defaults(o).replace("|", "\\|")
        rows.append(f"| {flag} | {key} | {commands} | {methods} | {default} | {o.help} |")
    return "\n".join(rows) + "\n"


def write_options_doc(path: str) -> None:
    """Regenerate the table between the markers of ``docs/options.md``."""

    p = Path(path)
    text = p.read_text()
    start, end = "<!-- options-table:start -->\n", "<!-- options-table:end -->"
    head, rest = text.split(start)
    tail = rest[rest.index(end) :]
    p.write_text(head + start + options_table() + tail)
