"""The requirement lines of fogline's extras, read from pyproject.toml (`make` uses this).

Why: `make` installs the Python dependencies while llama-cpp-python compiles
(the build is CPU-bound, pip mostly waits on the network and the disk), so it
needs the extras' requirements *without* llama-cpp-python, whose build
fogline.llama_build owns. `fogline[x]` references are expanded here; the
final `pip install -e '.[...]'` after both still resolves everything itself.
Standard library only: it runs before anything is installed.

    python -m fogline.requirements demo --without llama-cpp-python
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_SELF = re.compile(r"^fogline\[([^\]]+)\]$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: dict[str, list[str]], wanted: list[str], without: set[str] = frozenset()) -> list[str]:
    """The requirements of `wanted` extras in order, `fogline[...]` expanded, duplicates and `without` dropped."""
    out: list[str] = []
    seen: set[str] = set()
    skip = {_canonical(n) for n in without}

    def visit(extra: str, stack: tuple[str, ...]) -> None:
        if extra not in extras:
            raise KeyError(f"fogline has no extra {extra!r} (has: {', '.join(sorted(extras))})")
        if extra in stack:
            raise ValueError(f"extras refer to each other in a cycle: {' -> '.join((*stack, extra))}")
        for req in extras[extra]:
            req = req.strip()
            inner = _SELF.match(req.replace(" ", ""))
            if inner:
                for sub in inner.group(1).split(","):
                    visit(sub.strip(), (*stack, extra))
                continue
            name = _NAME.match(req)
            if name is None or _canonical(name.group(0)) in skip or req in seen:
                continue
            seen.add(req)
            out.append(req)

    for extra in wanted:
        visit(extra, ())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fogline.requirements", description=__doc__.split("\n")[0])
    p.add_argument("extras", nargs="+", help="extras of pyproject.toml, e.g. demo or all dev")
    p.add_argument("--without", action="append", default=[], metavar="NAME", help="leave this package out")
    args = p.parse_args(argv)
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    try:
        reqs = requirements(extras, args.extras, set(args.without))
    except (KeyError, ValueError) as e:
        print(f"fogline.requirements: error: {e.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(reqs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
