"""A Space-like Python environment inside the test venv (issue 17): only what the runtime
requirement files install is importable, and nothing but 127.0.0.1 can be reached.

Building a real fresh venv would download torch again (several GB with its CUDA packages), so
the test venv is narrowed instead: the runtime closure is computed from the installed packages'
own metadata (requirements.txt with its dependencies, requirements-llm.txt without: it is
installed with --no-deps), and a `sitecustomize` in a temp folder makes every other installed
top-level module (scikit-learn, pycocoevalcap, scipy, pytest, playwright ...) and its metadata
invisible, exactly as in a venv that never installed it.
"""
from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def requirement_names(path: Path) -> list[Requirement]:
    """Requirements of a pip requirements file, following its `-r` includes."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out += requirement_names(path.parent / line[3:].strip())
        elif not line.startswith("-"):
            out.append(Requirement(line))
    return out


def runtime_closure(files=("requirements.txt",), no_deps_files=("requirements-llm.txt",)) -> set:
    """Canonical names of the distributions a fresh venv gets from the runtime install."""
    seen: set[str] = set()
    todo = [(r, True) for f in files for r in requirement_names(ROOT / f)]
    todo += [(r, False) for f in no_deps_files for r in requirement_names(ROOT / f)]
    while todo:
        req, follow = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        if not follow:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # an optional dependency this venv does not have either
        for dep in (Requirement(s) for s in (dist.requires or [])):
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append((dep, True))
    return seen


def blocked_modules(closure: set) -> set[str]:
    """Top-level modules installed here that only distributions outside the closure provide."""
    blocked = set()
    for module, dists in md.packages_distributions().items():
        if module.startswith("_") and module != "_pytest":
            continue  # private extension modules ship inside allowed packages too
        if not any(canonicalize_name(d) in closure for d in dists):
            blocked.add(module)
    return blocked


SITECUSTOMIZE = '''
import importlib.machinery, socket, sys
BLOCKED = set({blocked!r})
ALLOWED_DISTRIBUTIONS = set({allowed!r})


class _RuntimeOnly:
    """The path finder, minus what the runtime requirements do not install: a blocked module
    is not found (find_spec gives None, as in a venv without it) and its distribution has no
    metadata (importlib.metadata raises PackageNotFoundError)."""
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        import re
        for d in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            name = re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "")).lower()
            if name in ALLOWED_DISTRIBUTIONS:
                yield d


sys.meta_path[:] = [_RuntimeOnly if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]

_connect = socket.socket.connect
def _loopback_only(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and \\
            address[0] not in ("127.0.0.1", "::1", "localhost"):
        raise OSError(f"network disabled in the Space-like test: {{address[0]}}")
    return _connect(self, address)
socket.socket.connect = _loopback_only
'''


def space_like_env(folder: Path, base_env: dict) -> tuple[dict, set]:
    """Environment for a subprocess that sees only the runtime packages and no network."""
    closure = runtime_closure()
    blocked = blocked_modules(closure)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=sorted(blocked),
                                                                  allowed=sorted(closure)))
    env = dict(base_env)
    env["PYTHONPATH"] = str(folder) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env, blocked


__all__ = ["runtime_closure", "blocked_modules", "space_like_env", "requirement_names"]
