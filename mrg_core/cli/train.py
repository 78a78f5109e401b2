"""python -m mrg_core train --config configs/default.json [--resume] [--out DIR] [--device auto]

Several GPUs: `accelerate launch -m mrg_core train --config configs/default.json` (the tokenizer
and LM pretraining run on the main process; the report model trains data-parallel).
"""
from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config JSON (configs/*.json)")
    ap.add_argument("--out", help="output folder (overrides the config's out_dir)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--data", help="dataset path (COV-CTR folder, annotation.json or a "
                                   "corrections export); overrides the config's data source")
    ap.add_argument("--epochs", type=int, help="override the number of epochs")
    args = ap.parse_args(argv)

    import importlib

    importlib.import_module("sklearn")  # model selection needs it: fail now, not after an epoch

    from mrg_core.data import resolve_data_spec
    from mrg_core.training import DataConfig, TrainConfig, train

    cfg = TrainConfig.load(args.config)
    if args.out:
        cfg.out_dir = args.out
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.data:
        keep = {"iu_reports": cfg.data.iu_reports, "max_train": cfg.data.max_train,
                "max_val": cfg.data.max_val}
        cfg.data = DataConfig(**resolve_data_spec(args.data), **keep)
    history = train(cfg, resume=args.resume, device=args.device)
    best = history.get("best_epoch")
    print(json.dumps({"out_dir": cfg.out_dir, "best_epoch": best,
                      cfg.select_metric: history.get("best_metric"),
                      "best_model": f"{cfg.out_dir}/best" if best else None}))
    return 0 if best else 1
