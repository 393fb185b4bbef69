"""Print bench/accuracy.md rows for finished runs, read from their run directories.

Usage: python bench/accuracy_table.py RUN_DIR [RUN_DIR ...]
Every number comes from the run's own files (config.json, status.json, evaluation.json,
metrics.jsonl); nothing is estimated.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fer_core.runs import load_run

HEADER = ("| configuration | weights | input px | epochs | train minutes | test acc | macro-F1 "
          "| recall angry/disgust/fear/happy/neutral/sad/surprise | peak RSS MB |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(run_dir: Path) -> str:
    run = load_run(run_dir)
    config, evaluation = run.config, run.evaluation or {}
    minutes = (run.duration_s or 0) / 60
    recalls = "/".join(f"{evaluation['report'][c]['recall'] * 100:.0f}" for c in evaluation.get("classes", []))
    peak = max((m.get("peak_rss_mb", 0) for m in run.metrics), default=0)
    name = f"{config.get('preset') or 'custom'}: {config['mode']}, stem {config['stem']}, {config['optimizer']} " \
           f"lr {config['lr']}, {config['scheduler']}, ls {config['label_smoothing']}, " \
           f"aug {'on' if config['augment'] else 'off'}, TTA {'on' if config.get('tta') else 'off'}, " \
           f"val {config['val_fraction']}" + (", class weights" if config.get("class_weights") else "") + levers(config)
    return (f"| {name} | {config.get('weights_source')} | {config['img_size']} | {len(run.metrics)} "
            f"| {minutes:.1f} | {evaluation.get('accuracy', 0) * 100:.1f}% | {evaluation.get('macro_f1', 0) * 100:.1f} "
            f"| {recalls} | {peak:.0f} |")


def levers(config: dict) -> str:
    """The optional levers a run turned on, each with its value (none: "")."""
    shown = [f"{flag} {config[key]:g}" for key, flag in (("ema_decay", "EMA"), ("mixup", "MixUp"), ("cutmix", "CutMix"))
             if config.get(key)]
    return "".join(f", {item}" for item in shown)


if __name__ == "__main__":
    print(HEADER)
    for path in sys.argv[1:]:
        print(row(Path(path)))
