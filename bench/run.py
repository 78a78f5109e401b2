"""MRG Studio benchmarks: the radiologist's wait, measured step by step.

    python bench/run.py --quick --json bench/results/cpu_quick.json  # single user, < 2 min
    python bench/run.py --json bench/results/cpu_full.json           # + app server, 1/4/8 users
    python bench/run.py --quick --precision int8 --decode-threads 1  # one setting
    python bench/run.py --sweep --json bench/results/cpu_sweep.json  # settings back to back

Keys (seconds unless named): load_s, packaged_lm_load_s, load_study_s, probability_s, gradcam_s,
analyze_s, first_token_s, tokens_per_s, draft_s, bandwidth_fraction, hf_generate_tokens_per_s, ...
Each step is run on studies the model has not seen (the encoder cache would hide its cost) and
the median is reported. Speed targets live here, not in the test suite.

--sweep decodes the same studies with every precision (fp32, bf16, int8) and decode thread
count (1 and all cores), interleaved round by round so that a busy machine slows every setting
alike, and reports each setting's medians under "sweep".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from bench.bandwidth import measure_read_bandwidth  # noqa: E402
from bench.common import machine  # noqa: E402
from mrg_core.io import load_study  # noqa: E402
from mrg_core.engine import torch_threads  # noqa: E402
from mrg_core.models import GenerationSettings, ReportModel  # noqa: E402
from mrg_core.models.quantize import PRECISIONS, apply_precision, weight_bytes  # noqa: E402
from mrg_core.paths import DEFAULT_MODEL_DIR  # noqa: E402
from mrg_core.samples import make_ct_phantom, write_ct_dicom  # noqa: E402


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _loadavg() -> float | None:
    """1-minute load average: other work on the machine makes every figure slower."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def make_study_files(folder: Path, n: int) -> list[Path]:
    """n distinct synthetic CT slices written as real DICOM files (different pixels each)."""
    paths = []
    for i in range(n):
        p = folder / f"ct_{i}.dcm"
        write_ct_dicom(p, make_ct_phantom(seed=100 + i, covid=bool(i % 2)), seed=f"bench{i}")
        paths.append(p)
    return paths


def lm_weight_bytes(model: ReportModel) -> int:
    """Bytes of LM weights read per decoded token (tied embeddings counted once; int8 layers
    at one byte per weight). With a restricted output layer (config.head_vocab, used by the lean
    Llama decoder) only its rows are read: the rest of the output matrix is left out. The lean
    decoder reads its output layer in float32 (FastLlamaDecoder.head_w)."""
    from mrg_core.models.fast_llama import FastLlamaDecoder

    total = weight_bytes(model.base_lm)
    dec = model._decoder()  # the decoder a draft uses
    if isinstance(dec, FastLlamaDecoder):
        head = model.base_lm.lm_head.weight
        total -= head.numel() * head.element_size() - dec.head_w.numel() * dec.head_w.element_size()
    return total


def load_model(model_dir: Path, precision: str) -> tuple[ReportModel, float]:
    t0 = time.perf_counter()
    model = apply_precision(ReportModel.from_pretrained(model_dir), precision)
    return model, time.perf_counter() - t0


def packaged_lm_load_s(model: ReportModel) -> float | None:
    """Seconds to load a packaged LLM from its converted cache folder (config + safetensors),
    as every later start does; None for a model without one. The folder exists by now: loading
    the model converted it."""
    from transformers import AutoModelForCausalLM

    from mrg_core.models.language_model import lm_folder

    if not model.config.lm.package:
        return None
    folder = lm_folder(model.config.lm)
    t = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return time.perf_counter() - t


def time_draft(model: ReportModel, study, settings: GenerationSettings,
               decode_threads: int | None = None) -> dict:
    """One draft as the page streams it: first piece, whole draft, decode rate."""
    with torch_threads(decode_threads):
        t = time.perf_counter()
        stamps, pieces = [], []
        for piece in model.stream_report(study, settings):
            stamps.append(time.perf_counter())
            pieces.append(piece)
    text = "".join(pieces)
    return {"first": stamps[0] - t, "draft": stamps[-1] - t, "text": text,
            "tokens": len(model.tokenizer(text.lower()).input_ids),
            "tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None}


def bandwidth_bound(model: ReportModel, tokens_per_s: float, bw: float | None = None) -> dict:
    """Each decoded token reads every LM weight once: tokens/s can't beat bandwidth / bytes."""
    bw = bw or measure_read_bandwidth()
    wbytes = lm_weight_bytes(model)
    bound = bw / wbytes
    return {"bandwidth_gb_s": bw / 1e9, "lm_weight_mb": wbytes / 2**20,
            "bandwidth_bound_tokens_per_s": bound, "bandwidth_fraction": tokens_per_s / bound}


def hf_generate_rate(model: ReportModel, n_new: int, decode_threads: int | None = None) -> float:
    """Plain transformers.generate on the same LM, same number of new tokens, greedy, KV cache."""
    lm, tok = model.base_lm, model.tokenizer
    ids = torch.tensor([[tok.bos_token_id]], device=model.device)
    with torch.inference_mode(), torch_threads(decode_threads):
        lm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                    pad_token_id=tok.pad_token_id)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            lm.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                        use_cache=True, pad_token_id=tok.pad_token_id)
            runs.append(n_new / (time.perf_counter() - t))
    return _median(runs)


def make_studies(n: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        return [load_study([f]) for f in make_study_files(Path(tmp), n)]


def bench_model(model_dir: Path, n_studies: int, settings: GenerationSettings,
                precision: str = "fp32", decode_threads: int | None = None,
                full_length: bool = False) -> dict:
    model, load_s = load_model(model_dir, precision)
    if full_length:  # the end token suppressed: every draft is max_new_tokens long
        model.suppress_ids = [*model.suppress_ids, model.tokenizer.eos_token_id]
    out: dict = {"load_s": load_s, "packaged_lm_load_s": packaged_lm_load_s(model),
                 "precision": precision,
                 "decode_threads": decode_threads or torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        files = make_study_files(Path(tmp), 3 * n_studies + 1)
        t_load, studies = [], []
        for f in files:
            t = time.perf_counter()
            studies.append(load_study([f]))
            t_load.append(time.perf_counter() - t)
    out["load_study_s"] = _median(t_load)
    warm = studies.pop()  # first call pays one-off costs (allocator, kernels)
    model.analyze(warm)
    time_draft(model, warm, settings, decode_threads)

    prob, cam, analyze, first, draft, tps, ntok = [], [], [], [], [], [], []
    for i in range(n_studies):
        s_prob, s_cam, s_full = studies[3 * i], studies[3 * i + 1], studies[3 * i + 2]
        t = time.perf_counter()
        model.predict(s_prob)
        prob.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.explain(s_cam)
        cam.append(time.perf_counter() - t)
        # What the page does: analyze on upload, then Generate streams the draft.
        t = time.perf_counter()
        model.analyze(s_full)
        analyze.append(time.perf_counter() - t)
        d = time_draft(model, s_full, settings, decode_threads)
        first.append(d["first"])
        draft.append(d["draft"])
        ntok.append(d["tokens"])
        if d["tps"]:
            tps.append(d["tps"])
    out.update(probability_s=_median(prob), gradcam_s=_median(cam), analyze_s=_median(analyze),
               first_token_s=_median(first), draft_s=_median(draft),
               tokens_per_s=_median(tps) if tps else 0.0, draft_tokens=_median(ntok))
    out.update(bandwidth_bound(model, out["tokens_per_s"]))
    out["hf_generate_tokens_per_s"] = hf_generate_rate(model, max(8, int(out["draft_tokens"])),
                                                       decode_threads)
    out["model"] = {k: model.info.get(k) for k in ("name", "version", "method", "n_params")}
    return out


def sweep(model_dir: Path, n_studies: int, settings: GenerationSettings, rounds: int = 3,
          precisions=PRECISIONS, threads=None) -> dict:
    """Every precision × decode-thread setting on the same studies, interleaved per round."""
    threads = threads or sorted({1, os.cpu_count() or 1})
    models = {p: load_model(model_dir, p)[0] for p in precisions}
    studies = make_studies(n_studies + 1)
    warm = studies.pop()
    for m in models.values():
        m.analyze(warm)
        for n in threads:
            time_draft(m, warm, settings, n)
        for s in studies:
            m.encode(s)  # the page analyses on load: drafts start from cached features
    keys = [(p, n) for p in precisions for n in threads]
    runs: dict = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):  # alternate order: no setting always first
            runs[k] += [time_draft(models[k[0]], s, settings, k[1]) for s in studies]
    bw = measure_read_bandwidth()
    out = {}
    for (p, n), ds in runs.items():
        ref = runs[(precisions[0], n)]
        tps = _median([d["tps"] for d in ds if d["tps"]])
        out[f"{p}/threads={n}"] = {
            "precision": p, "decode_threads": n, "drafts": len(ds),
            "first_token_s": _median([d["first"] for d in ds]),
            "draft_s": _median([d["draft"] for d in ds]),
            "tokens_per_s": tps,
            "same_text_as_first_precision": sum(a["text"] == b["text"] for a, b in zip(ds, ref))
            / len(ds),
            **bandwidth_bound(models[p], tps, bw)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--quick", action="store_true", help="single-user set only (< 2 min)")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--studies", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    ap.add_argument("--decode-threads", type=int, default=None,
                    help="torch threads while a draft decodes (default: --threads)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="inference precision of the language model (mrg_core.models.quantize)")
    ap.add_argument("--sweep", action="store_true",
                    help="only compare every precision × decode-thread setting, back to back")
    ap.add_argument("--rounds", type=int, default=3, help="--sweep rounds")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                    help="--sweep: these precisions only (the first is the text reference)")
    ap.add_argument("--full-length", action="store_true",
                    help="never end a draft early (untrained models, per-token speed only)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    res = {"machine": machine()}
    if args.sweep:
        res["sweep"] = sweep(args.model, args.studies, settings, args.rounds,
                             tuple(args.precisions))
    else:
        res.update(bench_model(args.model, args.studies, settings, args.precision,
                               args.decode_threads, args.full_length))
    res["machine"]["load_average_at_end"] = _loadavg()
    if not (args.quick or args.sweep):
        from bench.app_load import bench_app
        res["app"] = bench_app(args.model, users=(1, 4, 8))
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
