"""Screenshot a run report (or any local HTML file) with headless Chromium, to see what users see.

    .venv/bin/python bench/screenshot_report.py runs/report.html report.png
    .venv/bin/python bench/screenshot_report.py runs/report.html report.png --width 1280 --height 4000

Chromium is a system package (`apt-get install -y --no-install-recommends chromium`). It runs with no
network features, a throwaway profile and no sandbox (containers run it as root). Prints the PNG's
size and pixel spread; exits 2 when no Chromium is found and 1 when the screenshot failed or is blank.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, else /usr/bin/chromium if present."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2000, browser: str | None = None,
               timeout_s: float = 120.0) -> Path:
    """Render `html` at width x height CSS pixels into `png`; raises RuntimeError on failure."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # a stale file must not pass for a fresh screenshot
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png.resolve()}", html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not png.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("html", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2000)
    args = p.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html}: not found", file=sys.stderr)
        return 2
    try:
        screenshot(args.html, args.png, args.width, args.height)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import cv2

    img = cv2.imread(str(args.png))
    if img is None:
        print(f"error: {args.png}: not a readable PNG", file=sys.stderr)
        return 1
    spread = float(img.std())
    print(f"{args.png}: {img.shape[1]}x{img.shape[0]} px, pixel std {spread:.1f}")
    return 0 if spread > 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
