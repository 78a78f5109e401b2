"""MRG Studio benchmarks: the radiologist's wait, measured step by step.

    python bench/run.py --quick --json bench/results/cpu.json       # single user, < 2 min
    python bench/run.py --json bench/results/cpu_full.json           # + app server, 1/4/8 users

Keys (seconds unless named): load_s, load_study_s, probability_s, gradcam_s, analyze_s,
first_token_s, tokens_per_s, draft_s, bandwidth_fraction, hf_generate_tokens_per_s, ...
Each step is run on studies the model has not seen (the encoder cache would hide its cost) and
the median is reported. Speed targets live here, not in the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
from mrg_core.io import load_study  # noqa: E402
from mrg_core.models import GenerationSettings, ReportModel  # noqa: E402
from mrg_core.paths import DEFAULT_MODEL_DIR  # noqa: E402
from mrg_core.samples import make_ct_phantom, write_ct_dicom  # noqa: E402


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def make_study_files(folder: Path, n: int) -> list[Path]:
    """n distinct synthetic CT slices written as real DICOM files (different pixels each)."""
    paths = []
    for i in range(n):
        p = folder / f"ct_{i}.dcm"
        write_ct_dicom(p, make_ct_phantom(seed=100 + i, covid=bool(i % 2)), seed=f"bench{i}")
        paths.append(p)
    return paths


def lm_weight_bytes(model: ReportModel) -> int:
    """Bytes of LM weights read per decoded token (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.base_lm.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def bench_model(model_dir: Path, n_studies: int, settings: GenerationSettings) -> dict:
    t0 = time.perf_counter()
    model = ReportModel.from_pretrained(model_dir)
    load_s = time.perf_counter() - t0
    out: dict = {"load_s": load_s}
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
    "".join(model.stream_report(warm, settings))

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
        t = time.perf_counter()
        stamps, pieces = [], []
        for piece in model.stream_report(s_full, settings):
            stamps.append(time.perf_counter())
            pieces.append(piece)
        first.append(stamps[0] - t)
        draft.append(stamps[-1] - t)
        n = len(model.tokenizer("".join(pieces).lower()).input_ids)
        ntok.append(n)
        if len(stamps) > 1:
            tps.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    out.update(probability_s=_median(prob), gradcam_s=_median(cam), analyze_s=_median(analyze),
               first_token_s=_median(first), draft_s=_median(draft),
               tokens_per_s=_median(tps) if tps else 0.0, draft_tokens=_median(ntok))

    # Bandwidth bound: each decoded token reads every LM weight once.
    bw = measure_read_bandwidth()
    wbytes = lm_weight_bytes(model)
    bound = bw / wbytes
    out.update(bandwidth_gb_s=bw / 1e9, lm_weight_mb=wbytes / 2**20,
               bandwidth_bound_tokens_per_s=bound,
               bandwidth_fraction=out["tokens_per_s"] / bound)

    # Plain transformers.generate on the same LM, same number of new tokens, greedy, KV cache.
    lm, tok = model.base_lm, model.tokenizer
    n_new = max(8, int(out["draft_tokens"]))
    ids = torch.tensor([[tok.bos_token_id]], device=model.device)
    with torch.inference_mode():
        lm.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                    pad_token_id=tok.pad_token_id)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            lm.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                        use_cache=True, pad_token_id=tok.pad_token_id)
            runs.append(n_new / (time.perf_counter() - t))
    out["hf_generate_tokens_per_s"] = _median(runs)
    out["model"] = {k: model.info.get(k) for k in ("name", "version", "method", "n_params")}
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
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    res = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(),
                       "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                       else None}}
    res.update(bench_model(args.model, args.studies, settings))
    if not args.quick:
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
