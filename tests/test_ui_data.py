"""fer_core/ui_data.py: what the pages list and draw, without Streamlit."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_core import ui_data


def test_discover_datasets_lists_the_demo_folders_and_csv_files_and_skips_unreadable_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "data"
    for path in ("faces/angry/a.png", "faces/happy/h.png", "owner__name/fer2013.csv",
                 "lost+found/x", ".hidden/angry/a.png", ".hidden/happy/h.png", "loose.csv"):
        (home / path).parent.mkdir(parents=True, exist_ok=True)
        (home / path).write_bytes(b"")
    unreadable = home / "lost+found"
    real_iterdir = Path.iterdir

    def iterdir(self: Path):
        if self == unreadable:  # as a root-only folder is for the app's user (tests run as root)
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    found = ui_data.discover_datasets(home)
    assert [(c.spec, c.kind) for c in found] == [
        ("demo", "demo"), (str(home / "faces"), "folder"), (str(home / "loose.csv"), "csv"),
        (str(home / "owner__name" / "fer2013.csv"), "csv")]


def test_figures_show_names_from_folders_as_typed_never_as_plotly_markup() -> None:
    from types import SimpleNamespace
    hostile = "<a href='http://x.invalid'>%{y}</a>"
    run = SimpleNamespace(id=f"2026-01-01_00-00-00/{hostile}/finetune", metrics=[{"epoch": 1, "val_acc": 0.5}])
    trace, = ui_data.overlay_figure([run], "val_acc", "Validation accuracy").data
    assert trace.name == run.id.replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")
    assert "%{y}</a>" not in trace.hovertemplate and "<a" not in trace.hovertemplate
    bars, = ui_data.class_distribution_figure({hostile: 3, "sad": 4}).data
    assert list(bars.x) == ["&lt;a href=&#x27;http://x.invalid&#x27;&gt;%{y}&lt;/a&gt;", "sad"]
    split = ui_data.split_distribution_figure([{"class": hostile, "train": 1, "val": 0, "test": 1}])
    assert all("<a" not in str(x) for trace in split.data for x in trace.x)
