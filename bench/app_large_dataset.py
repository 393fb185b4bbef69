"""App large dataset: a large synthetic dataset chosen, examined and trained on from the app, in a
real browser, with the app's and the trainer's peak memory (issue #16: "a 400k-image synthetic
dataset trains from the app with bounded memory").

For each size N: the first N of a folder of synthetic 64x64 RGB PNGs in 8 class folders, named
by a label list `labels-N.txt` (made by bench/dataset_memory.py's `generate` and
`write_label_file`, once into --keep DIR and reused by later runs). Then, as a user would:
  1. `streamlit run streamlit_app.py` on a free 127.0.0.1 port, its runs, checkpoints, cache,
     data and demo folders in a fresh temporary folder (so every decode is a first one);
  2. Debian's Chromium (headless, driven by playwright; no browser is downloaded) opens the Data
     page, chooses "Local folder", types the label list's path and waits for the overview's
     Images metric ("data page s", overview: the app decodes every image at 48 px grey; then
     whole: until the rest of the page is drawn, sample faces included). The page opens on the
     built-in demo first, as it does for a user, so the app draws the small demo set too;
  3. with --doctor, "Examine this dataset", until the doctor's report says what it examined;
  4. "Train on this dataset", and on the Train page's form (preset cpu-fast, the default for a
     folder): experiment `app-N`, image size 64 with the ImageNet stem (as `dataset_memory.py
     --resnet18` trains), Stored face size 64, colour RGB, Max training images per class
     --max-per-class (default 1,500: the same training work at every size), 1 epoch, ImageNet
     weights off, test-time augmentation off; every other field as the preset has it. Launch,
     then wait for the run's status.json to say it finished ("job s": from the click).
Measured: the Streamlit server's peak resident memory (VmHWM of its process, which runs every
page script, the doctor included; read after the data page, after the doctor and just before it
is stopped); the trainer's peak RSS as it records it at the end of its epoch (`peak_rss_mb` in
metrics.jsonl) and its VmHWM sampled every second until it exits (the test split included). A
folder of 2,048 files or more is decoded in worker processes of their own, in neither figure.
Where each process kept the images: in memory, or file-backed in the store, read a batch at a
time (the app holds at most pages/_shared.py's APP_IN_MEMORY_BYTES, 256 MiB; the trainer
fer_core.store.in_memory_limit(), 1 GiB). The synthetic labels carry no signal: test accuracy
is chance (1/8), reported only to show the run was scored on its whole test split.

Disk: the PNGs about 12 KB an image in --keep; each size's temporary folder holds the app's store
(2.3 KB an image) and the trainer's (12 KB an image) until that size is done.

Usage: python bench/app_large_dataset.py [--sizes 20000 400000] [--keep DIR] [--max-per-class N]
                                         [--doctor] [--work-root DIR]
Smoke check: --sizes 2000 --keep /tmp/app_bench_data --max-per-class 100 --doctor (a few minutes
on 2 cores).
The last line is machine readable: one JSON object per size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))  # served_app: the app and Chromium as the browser test runs them
sys.path.insert(0, str(ROOT))

import dataset_memory  # noqa: E402
from playwright.sync_api import Locator, Page, expect, sync_playwright  # noqa: E402
from served_app import CHROMIUM, CHROMIUM_ARGS, serving, stop_training_processes  # noqa: E402

from fer_core import runs  # noqa: E402
from fer_core.config import STEM_LABELS  # noqa: E402
from fer_core.image_format import ImageFormat  # noqa: E402
from fer_core.store import STATE_FILE, in_memory_limit  # noqa: E402

STEP_TIMEOUT_MS = 120_000
POLL_S = 1.0
STORE_SIZE, COLOUR = 64, "rgb"
APP_FORMAT, TRAIN_FORMAT = ImageFormat(48, "grey"), ImageFormat(STORE_SIZE, COLOUR)
CHANCE = 1 / dataset_memory.CLASSES


@dataclass(frozen=True)
class Options:
    max_per_class: int
    doctor: bool
    page_timeout_s: float
    train_timeout_s: float
    work_root: Path | None


# ---- the app ------------------------------------------------------------------------------

def app_folders(work: Path) -> dict[str, str]:
    return {"FER_RUNS_DIR": str(work / "runs"), "FER_CHECKPOINTS_DIR": str(work / "checkpoints"),
            "FER_CACHE_DIR": str(work / "cache"), "FER_DATA_HOME": str(work / "data"),
            "FER_DEMO_DIR": str(work / "demo")}


@contextlib.contextmanager
def served_app(work: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """The app on a free 127.0.0.1 port (tests/served_app.py, as the browser test starts it), its
    folders under `work`; stopped afterwards with every training process it started."""
    with serving(app_folders(work), work / "streamlit.log") as (url, server):
        try:
            yield url, server
        finally:
            stop_training_processes(work / "runs")


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a live process (its peak resident memory since exec), or None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), None)


# ---- the browser --------------------------------------------------------------------------

@contextlib.contextmanager
def browser_page() -> Iterator[Page]:
    """A headless Chromium page (1400x1000), closed afterwards."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def wait_until_idle(page: Page, timeout_s: float) -> None:
    """Until the script run ends (Streamlit's 'running' indicator is gone)."""
    deadline = time.monotonic() + timeout_s
    time.sleep(0.5)
    while page.locator("[data-testid='stStatusWidget']").count() and time.monotonic() < deadline:
        time.sleep(0.25)


def set_toggle(page: Page, label: str, on: bool) -> None:
    """Switch a toggle by clicking its label, as a user does (its input is visually hidden)."""
    switch = page.get_by_label(label, exact=True)
    for _ in range(3):
        if switch.is_checked() == on:
            return
        page.locator("label").filter(has=switch).get_by_text(label, exact=True).click()
        with contextlib.suppress(AssertionError):
            expect(switch).to_be_checked(checked=on, timeout=5_000)
    if switch.is_checked() != on:
        raise RuntimeError(f"the toggle {label!r} did not switch {'on' if on else 'off'}")


def choose_radio(page: Page, option: str) -> None:
    radio = page.get_by_role("radio", name=option, exact=True)
    if not radio.is_checked():
        page.locator("label").filter(has=radio).click()
    expect(radio).to_be_checked()


def set_number(page: Page, label: str, value: int) -> None:
    field = page.get_by_role("spinbutton", name=label, exact=True)
    field.fill(str(value))
    field.press("Tab")


def set_text(page: Page, label: str, value: str) -> None:
    field = page.get_by_role("textbox", name=label, exact=True)
    field.fill(value)
    field.press("Tab")


def images_metric(page: Page, count: int) -> Locator:
    """The overview's Images metric once it reads `count` (matched on its textContent, "Images2,000")."""
    return page.locator("[data-testid='stMetric']").filter(has_text=re.compile(rf"^\s*Images\s*{count:,}\s*$"))


def open_dataset(page: Page, url: str, label_file: Path, count: int, timeout_s: float) -> tuple[float, float]:
    """The Data page on the label list: seconds until its overview shows `count` images, and until
    the whole page is drawn."""
    page.goto(f"{url}/data")
    local = page.get_by_role("radio", name="Local folder or fer2013.csv", exact=True)  # a segmented control
    local.wait_for()
    wait_until_idle(page, timeout_s)  # the page opens on the built-in demo, drawn on first use
    local.click()
    expect(local).to_be_checked()
    path_field = page.get_by_role("textbox", name="Path to a folder or fer2013.csv")
    path_field.wait_for()
    wait_until_idle(page, timeout_s)
    path_field.fill(str(label_file))
    started = time.perf_counter()
    path_field.press("Enter")
    images_metric(page, count).wait_for(timeout=timeout_s * 1000)
    overview = time.perf_counter() - started
    page.get_by_role("button", name="Examine this dataset").wait_for(timeout=timeout_s * 1000)
    wait_until_idle(page, timeout_s)
    return overview, time.perf_counter() - started


def run_doctor(page: Page, count: int, timeout_s: float) -> float:
    """Seconds from "Examine this dataset" to the report's last line."""
    started = time.perf_counter()
    page.get_by_role("button", name="Examine this dataset").click()
    page.get_by_text(re.compile(rf"Examined {count:,} images in")).wait_for(timeout=timeout_s * 1000)
    seconds = time.perf_counter() - started
    wait_until_idle(page, timeout_s)
    return seconds


def fill_train_form(page: Page, experiment: str, max_per_class: int) -> None:
    set_text(page, "Experiment name", experiment)
    set_number(page, "Epochs", 1)
    set_number(page, "Image size (px)", STORE_SIZE)
    choose_radio(page, STEM_LABELS["imagenet"])
    set_toggle(page, "Start from ImageNet weights", False)
    set_number(page, "Stored face size (px)", STORE_SIZE)
    choose_radio(page, "RGB (3 channels)")
    set_number(page, "Max training images per class (0 = all)", max_per_class)
    page.get_by_text("Advanced", exact=True).click()
    set_toggle(page, "Test-time augmentation (10 views)", False)


def launch_training(page: Page, experiment: str, max_per_class: int, timeout_s: float) -> float:
    """From the Data page to a launched run: returns the launch click's time (perf_counter)."""
    page.get_by_role("button", name="Train on this dataset").click()
    launch = page.get_by_role("button", name="Launch training")
    launch.wait_for(timeout=timeout_s * 1000)
    wait_until_idle(page, timeout_s)
    fill_train_form(page, experiment, max_per_class)
    launched = time.perf_counter()
    launch.click()
    return launched


# ---- the run ------------------------------------------------------------------------------

def find_run(runs_dir: Path, experiment: str, page: Page, timeout_s: float = 120) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [p for p in runs.find_run_dirs(runs_dir) if runs.RunLayout(p).experiment == experiment]
        if found:
            return found[0]
        if page.get_by_text("Nothing was started").count():
            raise RuntimeError("the Train page refused: " + " | ".join(
                page.locator("[data-testid='stAlert']").all_inner_texts()))
        time.sleep(POLL_S)
    raise RuntimeError(f"no run folder for {experiment!r} appeared in {runs_dir} within {timeout_s:.0f} s")


def check_config(run_dir: Path, label_file: Path, max_per_class: int) -> dict[str, Any]:
    """The launched run's config.json holds what the form was given (else the form was not filled)."""
    config = runs.read_json(run_dir / runs.CONFIG_FILE)
    wanted = {"data": str(label_file), "store_size": STORE_SIZE, "colour": COLOUR, "max_per_class": max_per_class,
              "epochs": 1, "img_size": STORE_SIZE, "stem": "imagenet", "pretrained": False, "tta": False,
              "exclude": ""}
    wrong = {key: config.get(key) for key, value in wanted.items() if config.get(key) != value}
    if wrong:
        raise RuntimeError(f"the run's config differs from what the form was given: {wrong} (wanted {wanted})")
    return config


def wait_for_run(run_dir: Path, timeout_s: float) -> tuple[runs.RunStatus, float | None]:
    """The run's final status, and the trainer's VmHWM as last sampled before it exited."""
    deadline = time.monotonic() + timeout_s
    trainer_peak: float | None = None
    while time.monotonic() < deadline:
        status, _ = runs.run_status(run_dir)
        if status.state in runs.FINAL_STATES:
            return status, trainer_peak
        if status.pid:
            trainer_peak = max(filter(None, (trainer_peak, peak_rss_mb(status.pid))), default=None)
        time.sleep(POLL_S)
    raise RuntimeError(f"the run did not finish in {timeout_s:.0f} s: {runs.run_status(run_dir)[0]}")


def page_shows_finished(page: Page, timeout_s: float = 120) -> bool:
    with contextlib.suppress(Exception):
        page.get_by_text("Finished.").first.wait_for(timeout=timeout_s * 1000)
        return True
    return False


def run_results(run_dir: Path) -> dict[str, Any]:
    run = runs.load_run(run_dir)
    report = runs.read_json(run_dir / runs.DATA_REPORT_FILE)
    split = report["split_table"]
    epoch = run.metrics[-1]
    return {"trained": sum(row["train"] for row in split), "test": sum(row["test"] for row in split),
            "test_accuracy": run.test_accuracy, "train_img_s": epoch["images_per_second"],
            "trainer_epoch_peak_rss_mb": epoch["peak_rss_mb"], "trainer_duration_s": run.duration_s}


def store_backing(cache_dir: Path) -> dict[str, str | float]:
    """Where the app (48 px grey) and the trainer (64 px RGB) kept the decoded images: 'memory' or
    'file', by the size of each one's store against its in-memory limit."""
    from pages._shared import APP_IN_MEMORY_BYTES

    limits = {"app": (APP_FORMAT.shape, APP_IN_MEMORY_BYTES), "trainer": (TRAIN_FORMAT.shape, in_memory_limit())}
    backing: dict[str, str | float] = {}
    for state_file in cache_dir.glob(f"store-*/{STATE_FILE}"):
        state = runs.read_json(state_file)
        stored = state["count"] * math.prod(state["item_shape"])
        for who, (shape, limit) in limits.items():
            if tuple(state["item_shape"]) == tuple(shape):
                backing[who] = "memory" if stored <= limit else "file"
                backing[f"{who}_store_mb"] = stored / 2**20
    return backing


# ---- one size -----------------------------------------------------------------------------

def measure_size(label_file: Path, count: int, options: Options) -> dict[str, Any]:
    """Everything the module's docstring lists, for one dataset, in a fresh work folder."""
    with tempfile.TemporaryDirectory(prefix=f"app_large_dataset_{count}_", dir=options.work_root) as folder:
        work = Path(folder)
        try:
            return measure_in(work, label_file, count, options)
        except BaseException:
            print_logs(work)
            raise


def measure_in(work: Path, label_file: Path, count: int, options: Options) -> dict[str, Any]:
    experiment = f"app-{count}"
    result: dict[str, Any] = {"images": count, "doctor_s": None, "server_peak_after_doctor_mb": None}
    with served_app(work) as (url, server), browser_page() as page:
        overview_s, idle_s = open_dataset(page, url, label_file, count, options.page_timeout_s)
        result |= {"data_page_s": overview_s, "data_page_idle_s": idle_s,
                   "server_peak_after_data_page_mb": peak_rss_mb(server.pid)}
        if options.doctor:
            result["doctor_s"] = run_doctor(page, count, options.page_timeout_s)
            result["server_peak_after_doctor_mb"] = peak_rss_mb(server.pid)
        launched = launch_training(page, experiment, options.max_per_class, options.page_timeout_s)
        run_dir = find_run(work / "runs", experiment, page)
        check_config(run_dir, label_file, options.max_per_class)
        status, trainer_peak = wait_for_run(run_dir, options.train_timeout_s)
        result["job_s"] = time.perf_counter() - launched
        if status.state != "completed":
            raise RuntimeError(f"the run ended {status.state}: {status.error}")
        result |= {"page_shows_finished": page_shows_finished(page), "server_peak_rss_mb": peak_rss_mb(server.pid),
                   "trainer_peak_rss_mb": trainer_peak, "run": runs.run_id(run_dir)}
    return result | run_results(run_dir) | store_backing(work / "cache")


def print_logs(work: Path) -> None:
    for log in [work / "streamlit.log", *work.glob(f"runs/*/*/*/*/{runs.LOG_FILE}")]:
        if log.is_file():
            print(f"---- {log} (tail)\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)


# ---- the report ---------------------------------------------------------------------------

def whole(value: float | None) -> str:
    """Megabytes or seconds, rounded, for the table ("-" when not measured)."""
    return "-" if value is None else f"{value:,.0f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [f"| {r['images']:,} | {r.get('app', '?')} ({whole(r.get('app_store_mb'))} MB) "
            f"| {r.get('trainer', '?')} ({whole(r.get('trainer_store_mb'))} MB) | {whole(r['data_page_s'])} "
            f"/ {whole(r['data_page_idle_s'])} | {whole(r['doctor_s'])} | {whole(r['job_s'])} "
            f"| {r['trained']:,} / {r['test']:,} | {r['test_accuracy']:.1%} "
            f"| {whole(r['server_peak_after_data_page_mb'])} / {whole(r['server_peak_after_doctor_mb'])} "
            f"/ **{whole(r['server_peak_rss_mb'])}** | {whole(r['trainer_epoch_peak_rss_mb'])} "
            f"/ **{whole(r['trainer_peak_rss_mb'])}** |" for r in results]
    return "\n".join([
        "| images | app keeps (its 48 px grey store) | trainer keeps (its 64 px RGB store) "
        f"| data page s (overview / whole) | doctor s | job s (launch to finished) | trained / test faces "
        f"| test accuracy (chance {CHANCE:.1%}) "
        "| app server peak RSS MB (data page / doctor / end) | trainer peak RSS MB (epoch end / whole run) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows])


def run(sizes: list[int], folder: Path, workers: int, options: Options) -> None:
    started = time.perf_counter()
    dataset_memory.generate(folder, max(sizes), workers)
    print(f"generated {max(sizes):,} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results = []
    for count in sizes:
        print(f"from the app: {count:,} images", file=sys.stderr, flush=True)
        results.append(measure_size(dataset_memory.write_label_file(folder, count), count, options))
    print(table(results))
    if any(not r["page_shows_finished"] for r in results):
        print("note: the Train page did not show 'Finished.' within 2 minutes of the run's end for "
              + ", ".join(f"{r['images']:,}" for r in results if not r["page_shows_finished"]))
    print(f"Synthetic labels carry no signal: test accuracy is chance ({CHANCE:.1%}).")
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 400000])
    parser.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "fer_bench_synth",
                        help="where the synthetic images are generated (and reused)")
    parser.add_argument("--max-per-class", type=int, default=1500,
                        help="the form's Max training images per class: the same training work at every size")
    parser.add_argument("--doctor", action="store_true", help="also run the Data page's dataset doctor")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="processes that generate the images")
    parser.add_argument("--page-timeout", type=float, default=3600, help="seconds for a page step (decode, doctor)")
    parser.add_argument("--train-timeout", type=float, default=7200, help="seconds for the run to finish")
    parser.add_argument("--work-root", type=Path,
                        help="where each size's temporary work folder goes (default: the system's)")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing (apt-get install -y chromium); this benchmark never downloads a browser")
    options = Options(args.max_per_class, args.doctor, args.page_timeout, args.train_timeout, args.work_root)
    run(args.sizes, args.keep, args.workers, options)


if __name__ == "__main__":
    main()
