"""Screenshot a run's ``report.html`` in headless Chromium (not part of the tests or CI).

    python scripts/screenshot_report.py runs/hopper docs/report-screenshot.png [--height 2400]

Needs a Chromium binary (Debian: ``apt-get install -y chromium``, found as ``chromium``,
``chromium-browser`` or ``google-chrome``). The browser runs with networking features off, so
the screenshot also shows that the report needs nothing from the network. The PNG is reduced to
a 256-colour palette with Pillow when it is installed, to keep it small enough for a repository.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def screenshot(html: Path, out: Path, width: int = 1280, height: int = 2400) -> None:
    """Render ``html`` at ``width``×``height`` CSS pixels into the PNG ``out``."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        sys.exit("no Chromium found: apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        tmp = Path(profile) / "shot.png"
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}/user",
            f"--screenshot={tmp}",
            f"--window-size={width},{height}",
            html.resolve().as_uri(),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if not tmp.is_file():
            sys.exit(f"chromium wrote no screenshot (exit {res.returncode}):\n{res.stderr[-2000:]}")
        try:
            from PIL import Image
        except ImportError:
            shutil.copyfile(tmp, out)
            return
        img = Image.open(tmp).convert("RGB")
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="run directory holding report.html")
    ap.add_argument("out", type=Path, help="PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    a = ap.parse_args()
    html = a.run_dir / "report.html" if a.run_dir.is_dir() else a.run_dir
    if not html.is_file():
        sys.exit(f"{html}: not found (run `compress report {a.run_dir}` first)")
    screenshot(html, a.out, a.width, a.height)
    print(f"wrote {a.out} ({a.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
