"""A frozen causal LM from an installed package (GGUF), converted once into a local folder.

transformers reads GGUF with the `gguf` package but dequantises all tensors on every load (~16 s
for SmolLM2-135M on 2 cores) and refuses to `save_pretrained` such a model. So the first load
rebuilds the model from its config without the GGUF quantisation entry, copies the tensors, and
saves config + safetensors + tokenizer into the cache (`weights.cache_dir()`); later loads read
that folder (~0.4 s). The folder name carries the weights' sha256, so a new package version
never reuses a stale conversion. Writes go to a temporary folder that is renamed at the end: an
interrupted conversion leaves nothing half-written behind.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mrg_core import weights

log = logging.getLogger(__name__)

SOURCE_FILE = "mrg_source.json"  # what the folder was converted from


def packaged_lm_folder(name: str) -> Path:
    """A local Hugging Face folder (config, safetensors, tokenizer) of the packaged LM `name`."""
    w = weights.spec(name)
    folder = weights.cache_dir() / "lm" / f"{name}-{w.sha256[:12]}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    gguf = weights.locate(name)
    log.info("converting %s %s (once) into %s", w.package, w.version, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"package": w.package, "version": w.version, "file": w.filename,
             "sha256": w.sha256, "licence": w.licence}, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(q.state_dict(), strict=True)
    clean.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
