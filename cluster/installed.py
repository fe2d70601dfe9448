"""Exit 0 when this Python already has what a `pip install` line would install, else 1 and why.

The cluster files run it before their `pip install`, so `ray up` runs pip only when something is
missing or out of date: a node without internet, set up once (from a wheelhouse, a mirror or by
hand), then never needs the package index again. Arguments are pip's: requirement strings
(``"ray[default,tune]==2.60.0"``) and project folders with optional extras
(``"$HOME/mtl-search[dashboard]"``, as for ``pip install -e``).

A requirement is met when an installed distribution satisfies its version specifier and, for each
extra named, that extra's own requirements are met too, recursively (``pip check``'s rule, limited
to what the line asks for). A project folder is met when its ``pyproject.toml`` dependencies (and
the extras named) are met and each of its top-level packages imports from that folder (an
editable install of this checkout, not of another copy).

Only the standard library and ``packaging`` (which pip and Ray both depend on) are used: it runs
before anything is installed.

    python cluster/installed.py "ray[default,tune]==2.60.0" "$HOME/mtl-search" || pip install ...
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

# A project folder with extras, as pip spells it: /path/to/project[extra1,extra2]
_PROJECT = re.compile(r"^(?P<path>.*?)(?:\[(?P<extras>[^\]]*)\])?$")


def unmet_requirement(spec: str, seen: set[str] | None = None) -> str | None:
    """Why the installed distributions do not satisfy ``spec``, or None when they do."""
    from packaging.requirements import Requirement

    seen = set() if seen is None else seen
    req = Requirement(spec)
    key = f"{req.name.lower()}[{','.join(sorted(req.extras))}]{req.specifier}"
    if key in seen:
        return None
    seen.add(key)
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        return f"{req.name} is not installed (needed: {spec})"
    if not req.specifier.contains(dist.version, prereleases=True):
        return f"{req.name} {dist.version} is installed, {spec} is needed"
    for extra in sorted(req.extras):
        for dep in dist.requires or []:
            dep_req = Requirement(dep)
            if dep_req.marker is not None and dep_req.marker.evaluate({"extra": extra}):
                dep_req.marker = None
                problem = unmet_requirement(str(dep_req), seen)
                if problem is not None:
                    return f"{problem} (for {req.name}[{extra}])"
    return None


def unmet_project(arg: str) -> str | None:
    """Why the project folder in ``arg`` (``path[extras]``) is not installed from there, or None."""
    from packaging.requirements import Requirement

    match = _PROJECT.match(arg)
    assert match is not None  # the pattern matches every string
    folder = Path(match["path"]).expanduser().resolve()
    extras = {e.strip() for e in (match["extras"] or "").split(",") if e.strip()}
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file():
        return f"{pyproject}: no such file"
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = extras - set(optional)
    if unknown:
        return f"{pyproject}: no extra {', '.join(sorted(unknown))}"
    specs = list(project.get("dependencies", []))
    for extra in sorted(extras):
        specs += optional[extra]
    seen: set[str] = set()
    for spec in specs:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        problem = unmet_requirement(spec, seen)
        if problem is not None:
            return f"{problem} (for {project['name']})"
    find = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
    include = find.get("packages", {}).get("find", {}).get("include", [])
    for package in sorted({p.split(".")[0].rstrip("*") for p in include} - {""}):
        spec = importlib.util.find_spec(package)
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if origin is None or not origin.is_relative_to(folder):
            return f"{package} imports from {origin}, not from {folder}"
    return None


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    try:
        import packaging.requirements  # noqa: F401
    except ImportError:
        print("installed.py: packaging is not installed", file=sys.stderr)
        return 1
    for arg in argv:
        is_project = "/" in arg or arg.startswith((".", "~"))
        problem = unmet_project(arg) if is_project else unmet_requirement(arg)
        if problem is not None:
            print(f"installed.py: {problem}", file=sys.stderr)
            return 1
    print(f"installed.py: already installed: {' '.join(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
