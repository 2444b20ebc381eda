"""Entry point of the ``rebasin`` command, installed by the ``basinmerge`` distribution.

It lives outside the ``rebasin`` package so that it still runs when another project's package of
the same import name (PyPI's ``rebasin``, or ``sinkhorn-rebasin``) shadows this one, and can say so
in one line instead of failing oddly."""

from __future__ import annotations

import sys

DISTRIBUTION = "basinmerge"


def clashing() -> list[str]:
    """Other installed distributions that also provide a top-level ``rebasin`` package."""
    from importlib import metadata

    try:
        owners = metadata.packages_distributions().get("rebasin", [])
    except Exception:  # unreadable metadata of some other package: no verdict
        return []
    return sorted({d for d in owners if d.lower().replace("_", "-") != DISTRIBUTION})


def main() -> None:
    """Run the command line, after making sure ``rebasin`` is this project's package."""
    others = clashing()
    try:
        import rebasin

        ours = getattr(rebasin, "DISTRIBUTION", None) == DISTRIBUTION
    except Exception:
        ours = False
    if others or not ours:
        what = ", ".join(others) if others else "an unknown distribution"
        print(
            f"error: the 'rebasin' package importable here belongs to another project ({what}), "
            f"not to {DISTRIBUTION}",
            file=sys.stderr,
        )
        uninstall = " ".join(others) if others else "rebasin"
        print(
            f"hint: pip uninstall {uninstall}; then pip install --force-reinstall {DISTRIBUTION}",
            file=sys.stderr,
        )
        sys.exit(2)
    from rebasin.cli import main as run

    run()


if __name__ == "__main__":
    main()
