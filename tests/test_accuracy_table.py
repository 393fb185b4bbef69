"""bench/accuracy_table.py: the rows of bench/accuracy.md come from run folders alone."""

import sys
from pathlib import Path

from fer_core import runs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import accuracy_table  # noqa: E402


def test_a_row_reads_its_figures_from_the_run_folder(trained_run):
    cells = [cell.strip() for cell in accuracy_table.row(trained_run).strip().strip("|").split("|")]
    header = [cell.strip() for cell in accuracy_table.HEADER.splitlines()[0].strip("|").split("|")]
    evaluation = runs.read_json(trained_run / "evaluation.json")
    assert len(cells) == len(header)
    assert cells[header.index("test acc")] == f"{evaluation['accuracy'] * 100:.1f}%"
    assert cells[header.index("epochs")] == str(len(runs.read_metrics(trained_run)[0]))
    recalls = cells[header.index("recall angry/disgust/fear/happy/neutral/sad/surprise")].split("/")
    assert len(recalls) == len(evaluation["classes"])


def test_the_levers_a_run_turned_on_are_named_and_the_others_are_not():
    assert accuracy_table.levers({"ema_decay": 0.999, "mixup": 0.2, "cutmix": 0.0}) == ", EMA 0.999, MixUp 0.2"
    assert accuracy_table.levers({"ema_decay": 0.0}) == ""
    assert accuracy_table.levers({}) == ""  # runs from before the levers


def test_a_calibration_row_reads_the_runs_calibration_report(trained_run):
    cells = [cell.strip() for cell in accuracy_table.calibration_row(trained_run).strip().strip("|").split("|")]
    header = [cell.strip() for cell in accuracy_table.CALIBRATION_HEADER.splitlines()[0].strip("|").split("|")]
    report = runs.read_json(trained_run / runs.CALIBRATION_FILE)
    assert len(cells) == len(header)
    assert cells[header.index("temperature")] == f"{report['temperature']:.3f}"
    assert cells[header.index("test ECE before → after")] == \
        f"{report['ece_before'] * 100:.1f}% → {report['ece_after'] * 100:.1f}%"
    assert cells[header.index("test NLL before → after")] == f"{report['nll_before']:.3f} → {report['nll_after']:.3f}"
    assert cells[0].endswith(f", {len(runs.read_metrics(trained_run)[0])} epochs")
