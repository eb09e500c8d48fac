"""The HTML map as a browser draws it: headless Chromium loads map.html from a file:// URL.

Skipped when no Chromium is installed (set SIMCLR_CHROMIUM to a binary, or install e.g.
Debian's `chromium`). The screenshot is kept in $SIMCLR_TEST_ARTIFACTS when that is set.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_cli.engine.embeddings import load_embeddings
from simclr_cli.engine.layout import compute_layout, write_map_html

WINDOW = (1000, 1100)  # CSS pixels; the 1600-unit SVG is drawn 1000 px wide

_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chrome",
    "chrome-headless-shell",
    "headless_shell",
)


def chromium_binary() -> str | None:
    named = os.environ.get("SIMCLR_CHROMIUM")
    if named:
        return named if shutil.which(named) else None
    return next((found for name in _NAMES if (found := shutil.which(name))), None)


CHROMIUM = chromium_binary()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary found (install chromium or set SIMCLR_CHROMIUM)",
)

# Added to a copy of the page. While the page is parsed it asks the browser to decode each
# thumbnail's picture as a hidden <img> (the load event waits for those); on load it records
# what the browser laid out and what hovering shows, in a hidden element --dump-dom prints.
_PROBE = """<script>
const probed = [...document.querySelectorAll("g.t")].map((group) => {
  const decoded = document.createElement("img");
  decoded.hidden = true;
  decoded.src = group.querySelector("image").href.baseVal;
  document.body.appendChild(decoded);
  return [group, decoded];
});
window.addEventListener("load", () => {
  const report = {thumbnails: [], dots: document.querySelectorAll("circle").length};
  for (const [group, decoded] of probed) {
    const image = group.querySelector("image");
    const box = image.getBoundingClientRect();
    const title = group.querySelector("title");
    report.thumbnails.push({
      path: group.dataset.path,
      title: title ? title.textContent : null,
      natural: [decoded.naturalWidth, decoded.naturalHeight],
      box: [box.left, box.top, box.width, box.height],
      href: image.href.baseVal,
    });
  }
  // Hover the last thumbnail (already drawn last, so hovering reorders nothing).
  const last = probed[probed.length - 1][0];
  last.dispatchEvent(new MouseEvent("mouseenter"));
  report.hovered = last.dataset.path;
  report.header = document.getElementById("name").textContent;
  const out = document.createElement("pre");
  out.id = "probe";
  out.hidden = true;
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>
"""


def run_chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on a local page, kept off the network."""
    assert CHROMIUM is not None
    flags = [
        "--headless",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-breakpad",
        "--no-proxy-server",
        # Any host name fails to resolve: nothing on the page (or in the browser) can go out.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(
        [CHROMIUM, *flags, *extra, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def artefact_folder(tmp_path: Path) -> Path:
    named = os.environ.get("SIMCLR_TEST_ARTIFACTS")
    folder = Path(named) if named else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def decode_data_uri(uri: str) -> Image.Image:
    head, data = uri.split(",", 1)
    assert head == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def visible_mask(boxes: list[tuple[int, int, int, int]], index: int) -> np.ndarray:
    """Pixels of thumbnail `index` not covered by a thumbnail (or its frame) drawn after it."""
    left, top, width, height = boxes[index]
    mask = np.ones((height, width), dtype=bool)
    for other_left, other_top, other_width, other_height in boxes[index + 1 :]:
        x0 = max(other_left - 2 - left, 0)
        y0 = max(other_top - 2 - top, 0)
        x1 = min(other_left + other_width + 2 - left, width)
        y1 = min(other_top + other_height + 2 - top, height)
        if x0 < x1 and y0 < y1:
            mask[y0:y1, x0:x1] = False
    return mask


def test_map_page_shows_every_thumbnail_and_names_it_on_hover(
    photo_index: Path, tmp_path: Path
) -> None:
    # The page the product writes, drawn by a real browser: each thumbnail decodes, sits where
    # the layout put it, and the screenshot at that place shows that picture (not a blank or
    # broken-image box); each carries its file name as a tooltip, and hovering names it.
    embeddings = load_embeddings(photo_index)
    layout = compute_layout(embeddings.vectors, method="pca")
    page, thumbs = write_map_html(layout, embeddings.paths, tmp_path / "map.html")
    assert thumbs >= 16

    probed = tmp_path / "map-probe.html"
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dumped = run_chromium(probed.as_uri(), tmp_path / "profile-dom", "--dump-dom")
    match = re.search(r'<pre id="probe"[^>]*>(.*?)</pre>', dumped.stdout, re.S)
    assert match, f"the probe did not report; Chromium said:\n{dumped.stderr[-2000:]}"
    report = json.loads(html.unescape(match.group(1)))

    folder = artefact_folder(tmp_path)
    screenshot = folder / "map-screenshot.png"
    shot = run_chromium(page.as_uri(), tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert screenshot.is_file(), f"no screenshot; Chromium said:\n{shot.stderr[-2000:]}"
    print(f"\nscreenshot of the map: {screenshot}")

    items = report["thumbnails"]
    assert len(items) == thumbs
    names = {str(path) for path in embeddings.paths}
    assert all(item["path"] in names and item["title"] == item["path"] for item in items)
    assert all(item["natural"][0] > 0 and item["natural"][1] > 0 for item in items)
    assert report["header"] == report["hovered"] == items[-1]["path"]
    assert len(items) + report["dots"] == len(embeddings.paths)

    with Image.open(screenshot) as image:
        assert image.size == WINDOW
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    boxes = [tuple(round(v) for v in item["box"]) for item in items]
    # No thumbnail hides another on screen (1 px of rounding allowed).
    for number, (left, top, width, height) in enumerate(boxes):
        for other_left, other_top, other_width, other_height in boxes[number + 1 :]:
            assert (
                left + width <= other_left + 1
                or other_left + other_width <= left + 1
                or top + height <= other_top + 1
                or other_top + other_height <= top + 1
            ), (items[number]["path"], "overlaps another thumbnail")
    matched = 0
    for index, (item, (left, top, width, height)) in enumerate(zip(items, boxes, strict=True)):
        assert width > 0 and height > 0
        assert left >= 0 and top >= 0 and left + width <= WINDOW[0]
        if top + height > WINDOW[1]:
            continue  # below the fold of the screenshot
        mask = visible_mask(boxes, index)
        if mask.mean() < 0.3:
            continue  # mostly under later thumbnails
        expected = np.asarray(
            decode_data_uri(item["href"]).resize((width, height), Image.Resampling.BILINEAR),
            dtype=np.float64,
        )
        # The browser places a thumbnail at fractional pixels (the SVG is scaled), so a sharp
        # silhouette can sit half a pixel off the rounded box: compare at the best 1 px shift.
        error = min(
            np.abs(pixels[top + dy : top + dy + height, left + dx : left + dx + width] - expected)
            .mean(axis=2)[mask]
            .mean()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if top + dy >= 0
            and left + dx >= 0
            and top + dy + height <= WINDOW[1]
            and left + dx + width <= WINDOW[0]
        )
        blank = np.abs(255 - expected).mean(axis=2)[mask].mean()
        # The picture is there: close to the thumbnail, and (unless the thumbnail is nearly
        # white itself, like the horse silhouette) far closer than a white box would be.
        assert error < 20 and (error < blank / 3 or blank < 30), (item["path"], error, blank)
        matched += 1
    print(f"{matched} of {thumbs} thumbnails compared with the screenshot, all matching")
    assert matched >= thumbs // 2, f"only {matched} of {thumbs} thumbnails checked on screen"
