"""Refresh the README's pictures that show a model trained on real faces.

`FER_UPDATE_SCREENSHOTS=1 make test` refreshes the other pictures from the browser test's tiny
demo model. A model that learnt cartoons reads a real photo at chance, so Evaluate, Predict,
Grad-CAM, calibration and live mode are shot here instead, from a run trained on FER2013:

    .venv/bin/python docs/screenshots.py RUNS_DIR [--shots gradcam,calibration,live]

RUNS_DIR is a runs folder (as `fer train --runs-dir` writes) holding the run to show; the app
opens its newest run. The app runs on 127.0.0.1 with its other folders in a temporary
directory, and Chromium is Debian's (`/usr/bin/chromium`), as in the browser test.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the browser test's app server and its two-face camera video
from served_app import CHROMIUM, CHROMIUM_ARGS, FAKE_CAMERA_ARGS, served_app  # noqa: E402

PAGE_SIZE = {"width": 1400, "height": 1500}
LIVE_SIZE = {"width": 1400, "height": 1000}
SHOTS = ("evaluate", "calibration", "predict", "gradcam", "live")
DEFAULT_SHOTS = ("gradcam", "calibration", "live")


@contextlib.contextmanager
def serve(runs_dir: Path, scratch: Path) -> Iterator[str]:
    """The app showing `runs_dir`, its other folders in `scratch`; its URL."""
    folders = {"FER_RUNS_DIR": str(runs_dir), "FER_CHECKPOINTS_DIR": str(scratch / "checkpoints"),
               "FER_CACHE_DIR": str(scratch / "cache"), "FER_DEMO_DIR": str(scratch / "demo"),
               "FER_DATA_HOME": str(scratch / "data")}
    with served_app(folders, scratch / "streamlit.log") as url:
        yield url


def settle(page) -> None:
    """Wait for the script run to end and the page to stop fading stale elements."""
    time.sleep(1.0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (page.locator("[data-testid='stStatusWidget']").count()
                                           or page.locator("[data-stale='true']").count()):
        time.sleep(0.25)
    page.mouse.move(0, 0)
    time.sleep(1.0)


def shoot_evaluate(page, url: str, out: Path, shots: set[str]) -> None:
    page.set_viewport_size(PAGE_SIZE)
    page.goto(f"{url}/evaluate")
    page.locator("[data-testid='stPlotlyChart'] g.hm").first.wait_for(timeout=300_000)
    settle(page)
    if "evaluate" in shots:
        page.screenshot(path=str(out / "evaluate.png"))
    if "calibration" in shots:
        page.get_by_role("tab", name="Confidence").click()
        page.get_by_text("after (temperature scaling)").first.wait_for()
        settle(page)
        page.locator("[role='tabpanel']:visible").first.screenshot(path=str(out / "calibration.png"))


def shoot_predict(page, url: str, out: Path, shots: set[str], face: Path) -> None:
    page.set_viewport_size(PAGE_SIZE)
    page.goto(f"{url}/predict")
    page.get_by_text("Drop one or more photos here").wait_for()
    page.locator("[data-testid='stFileUploaderDropzoneInput']").first.set_input_files(str(face))
    page.get_by_text("1 face found").first.wait_for()
    settle(page)
    if "predict" in shots:
        page.screenshot(path=str(out / "predict.png"))
    if "gradcam" in shots:
        page.get_by_text("Why? Show the Grad-CAM heat map").first.click()
        page.get_by_text("On the photo").first.wait_for()
        settle(page)
        cards = page.locator("[data-testid='stVerticalBlock']").filter(has_text="1 face found").filter(
            has_text="On the photo").all()
        bordered = [c for c in cards if c.evaluate("e => parseFloat(getComputedStyle(e).borderTopWidth)") > 0]
        (bordered or cards)[-1].screenshot(path=str(out / "gradcam.png"))  # the photo's card


def shoot_live(browser_type, url: str, out: Path, scratch: Path) -> None:
    from test_live import two_face_frame, write_y4m

    frames = [two_face_frame(shift) for shift in (*range(0, 16, 2), *range(16, 0, -2))]
    video = write_y4m(scratch / "two-faces.y4m", frames)
    camera = [*FAKE_CAMERA_ARGS, f"--use-file-for-fake-video-capture={video}"]
    browser = browser_type.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *camera])
    try:
        page = browser.new_page(viewport=LIVE_SIZE)
        page.set_default_timeout(120_000)
        page.goto(f"{url}/predict")
        page.get_by_role("tab", name="Live").click()
        page.get_by_text("Turn on live mode").click()
        page.frame_locator("iframe[title*='webrtc']").get_by_role("button", name="START").click()
        page.get_by_text(re.compile(r"2 faces in view")).first.wait_for(timeout=180_000)
        time.sleep(20)  # some seconds of timeline
        page.get_by_text("Options", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
        settle(page)
        page.screenshot(path=str(out / "live.png"))
        fps = [text.replace("\n", " ") for text in page.locator("[data-testid='stMetric']").all_inner_texts()
               if "fps" in text or "Dropped" in text]
        print("live mode as the page showed it:", "; ".join(fps), "|",
              page.get_by_text(re.compile(r"frames read")).first.inner_text())
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="a runs folder holding the trained run to show")
    parser.add_argument("--shots", default=",".join(DEFAULT_SHOTS),
                        help=f"comma-separated, of {', '.join(SHOTS)} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the pictures go (default: docs/)")
    args = parser.parse_args(argv)
    shots = {s.strip() for s in args.shots.split(",") if s.strip()}
    if unknown := shots - set(SHOTS):
        parser.error(f"unknown shot(s): {', '.join(sorted(unknown))}")
    if not args.runs_dir.is_dir():
        parser.error(f"no such runs folder: {args.runs_dir}")
    from playwright.sync_api import sync_playwright
    from skimage import data as skdata

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fer-shots-") as folder:
        scratch = Path(folder)
        face = scratch / "astronaut.jpg"
        Image.fromarray(skdata.astronaut()).save(face, quality=90)
        with serve(args.runs_dir.resolve(), scratch) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=PAGE_SIZE)
                page.set_default_timeout(120_000)
                if shots & {"evaluate", "calibration"}:
                    shoot_evaluate(page, url, args.out, shots)
                if shots & {"predict", "gradcam"}:
                    shoot_predict(page, url, args.out, shots, face)
            finally:
                browser.close()
            if "live" in shots:
                shoot_live(playwright.chromium, url, args.out, scratch)
    print(f"wrote {', '.join(sorted(f'{s}.png' for s in shots))} in {args.out}")


if __name__ == "__main__":
    main()
