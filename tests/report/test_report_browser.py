"""The report in a real browser: headless Chromium renders it offline, without errors, to a non-blank page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bdscan.report.html import render_html

pytestmark = pytest.mark.slow


def chromium() -> str | None:
    for c in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and os.path.exists(c):
            return c
    return None


def run_chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the CI script installs it")
    profile = tmp / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
           "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(tmp)}  # keep chromium's caches out of the real home
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


#: console / network trouble chromium logs with --enable-logging=stderr (dbus and GPU noise is not an error of ours)
PAGE_ERRORS = re.compile(r"CONSOLE[:(]|Uncaught|Failed to load resource|net::ERR_|Refused to (load|apply|execute)", re.I)


def test_headless_chromium_renders_report(flagged_doc: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(flagged_doc), encoding="utf-8")
    shot = tmp_path / "report.png"
    r = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", "--enable-logging=stderr", "--v=0",
                     page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    bad = [ln for ln in r.stderr.splitlines() if PAGE_ERRORS.search(ln)]
    assert not bad, "\n".join(bad[:10])
    from PIL import Image, ImageChops

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 3000)
        # not blank: something other than the white background is drawn in the top and the bottom half
        white = Image.new("RGB", rgb.size, (255, 255, 255))
        diff = ImageChops.difference(rgb, white)
        assert diff.crop((0, 0, 1200, 1500)).getbbox() is not None
        assert diff.crop((0, 1500, 1200, 3000)).getbbox() is not None
    out = os.environ.get("BDSCAN_SCREENSHOT_DIR")
    if out:  # keep the picture for a person to look at
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / "report.png")


def test_headless_chromium_dom_is_complete(flagged_doc: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(flagged_doc), encoding="utf-8")
    r = run_chromium(tmp_path, "--dump-dom", "--enable-logging=stderr", "--v=0", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    # 9 sections: the verdict, the Detectors table (the default runs neuron noise beside Neural Cleanse), and the rest
    assert dom.count("<section") == 9 and "Backdoor suspected" in dom and dom.count("<svg") >= 3
    bad = [ln for ln in r.stderr.splitlines() if PAGE_ERRORS.search(ln)]
    assert not bad, "\n".join(bad[:10])
