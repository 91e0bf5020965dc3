"""Make ``docs/report.png``: a screenshot of ``status/report.html`` in headless chromium.

    python docs/screenshot.py                          # a report of a fabricated status folder
    python docs/screenshot.py --status_dir status      # the report of a real one (e.g. after make demo)

Needs Debian's chromium and chromedriver and selenium (the ``dev`` extra). The page is
captured whole at 1000 pixels wide, then quantised to 64 colours to keep the PNG small.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers import fake_status_folder, headless_chromium, missing_browser  # noqa: E402

from daemon.views.report import write_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status_dir", help="A status folder to report on (default: a fabricated one).")
    parser.add_argument("--output", default=str(REPO / "docs" / "report.png"))
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=0, help="Crop to this many pixels (0: the whole page).")
    args = parser.parse_args()
    why = missing_browser()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        status_dir = Path(args.status_dir) if args.status_dir else fake_status_folder(Path(tmp) / "status")
        report = write_report(status_dir)
        driver = headless_chromium(Path(tmp) / "profile", width=args.width)
        try:
            driver.get(report.resolve().as_uri())
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(args.width, args.height or height)
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    from io import BytesIO

    from matplotlib import image as mpimg  # noqa: F401 - Pillow comes with matplotlib
    from PIL import Image

    image = Image.open(BytesIO(png)).convert("RGB").quantize(colors=64)
    image.save(args.output, optimize=True)
    print(f"{args.output}: {image.size[0]}x{image.size[1]}, {Path(args.output).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
