"""Print bench/accuracy.md rows for finished runs, read from their run directories.

Usage: python bench/accuracy_table.py [--calibration] RUN_DIR [RUN_DIR ...]
Every number comes from the run's own files (config.json, status.json, evaluation.json,
metrics.jsonl, and with --calibration calibration.json); nothing is estimated.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fer_core.calibration import read_report
from fer_core.runs import RunLayout, load_run

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


CALIBRATION_HEADER = ("| run | test acc | temperature | test ECE before → after | test NLL before → after "
                      "| uncertain below | test faces flagged |\n"
                      "|---|---|---|---|---|---|---|")


def calibration_row(run_dir: Path) -> str:
    """Temperature scaling's effect on the test split (ECE over 15 bins, NLL), from calibration.json."""
    run = load_run(run_dir)
    report, problem = read_report(RunLayout(run_dir).calibration_file)
    if report is None:
        raise SystemExit(f"{run_dir}: {problem or 'not calibrated (fer calibrate RUN_DIR)'}")
    return (f"| {run.experiment}, {len(run.metrics)} epochs | {(run.evaluation or {}).get('accuracy', 0) * 100:.1f}% "
            f"| {report['temperature']:.3f} | {report['ece_before'] * 100:.1f}% → {report['ece_after'] * 100:.1f}% "
            f"| {report['nll_before']:.3f} → {report['nll_after']:.3f} | {report['uncertain_below'] * 100:.0f}% "
            f"| {report['flagged_share_after'] * 100:.0f}% |")


def levers(config: dict) -> str:
    """The optional levers a run turned on, each with its value (none: "")."""
    shown = [f"{flag} {config[key]:g}" for key, flag in (("ema_decay", "EMA"), ("mixup", "MixUp"), ("cutmix", "CutMix"))
             if config.get(key)]
    return "".join(f", {item}" for item in shown)


if __name__ == "__main__":
    calibration = "--calibration" in sys.argv[1:]
    print(CALIBRATION_HEADER if calibration else HEADER)
    for path in (a for a in sys.argv[1:] if a != "--calibration"):
        print((calibration_row if calibration else row)(Path(path)))
