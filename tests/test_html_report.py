"""The run's HTML report: every section filled from a real (tiny) train-eval run, checked as text and in Chromium.

The browser test renders the page in headless Chromium (Debian package
`chromium`; `make setup`/.ci/run install it) at a laptop's and a phone's width,
reads the DOM back and takes screenshots. It installs nothing and skips,
saying why, where no browser is present.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from science_fixtures import write_dataset

from ferpipe.crossval.html_report import REPORT_FILE, SECTIONS
from ferpipe.crossval.train_eval import train_eval
from ferpipe.data.manifest import read_manifest, write_manifest
from ferpipe.data.subject_meta import join_subject_meta, read_subject_meta
from ferpipe.preprocess.imaging import decode_png, encode_png

pytestmark = pytest.mark.slow
SCREENSHOTS = Path(__file__).resolve().parents[1] / "runs" / "test-report"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """EL on a generated 8-subject set with subject metadata and two rejects, two folds, smoke profile."""
    root = write_dataset(tmp_path_factory.mktemp("data"), subjects=8, per_class=2, folds=4)
    manifest = read_manifest(root)
    original = root / "originals" / "no_face.png"  # a reject's original, for the data quality thumbnails
    original.parent.mkdir()
    original.write_bytes(encode_png(np.full((64, 64, 3), 90, np.uint8)))
    manifest.loc[manifest["status"] != "ok", "source"] = str(original)
    unreadable = {**manifest.iloc[-1].to_dict(), "image_id": "998_bad", "subject": "998", "status": "unreadable",
                  "detail": "empty file", "source": str(root / "missing.jpg")}
    manifest.loc[len(manifest)] = unreadable
    meta = "subject,age,gender\n" + "".join(f"{s:03d},{20 + 7 * s},{'female' if s % 2 else 'male'}\n" for s in range(8))
    write_manifest(join_subject_meta(manifest, read_subject_meta(meta)), root)
    out = tmp_path_factory.mktemp("run")
    results = train_eval(root, "el", "smoke", out, folds=[0, 1], dataset="jaffe")
    return out, results


class Page(HTMLParser):
    """Sections, table body rows per section, and image sources, as the parser meets them."""

    def __init__(self):
        super().__init__()
        self.sections, self.rows, self.images, self.current = [], {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = attrs.get("id")
            self.sections.append(self.current)
        elif tag == "tr" and self.current:
            self.rows[self.current] = self.rows.get(self.current, 0) + 1
        elif tag == "img":
            self.images.append((self.current, attrs["src"]))


def test_report_has_every_section_filled_and_only_embedded_pictures(run):
    out, results = run
    text = (out / REPORT_FILE).read_text()
    page = Page()
    page.feed(text)
    assert page.sections == list(SECTIONS)
    for section in ("run", "results", "groups", "landmarks", "complexity", "data-quality", "model"):
        assert page.rows.get(section, 0) >= 2, section  # a header and at least one row
    pictured = {section for section, _ in page.images}
    assert {"confusion", "gradcam", "landmarks", "data-quality"} <= pictured
    for _, source in page.images:
        assert source.startswith("data:image/png;base64,")  # nothing to fetch
        assert decode_png(base64.b64decode(source.split(",", 1)[1])).size > 0
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    assert "97.14" in text  # the paper's JAFFE ensemble beside ours
    # Beside accuracy: the companion table (a row per member and the ensemble) and the fold spread.
    assert "Beside accuracy" in text and "macro-F1" in text and "recall happy" in text
    assert "<b>median fold</b>" in text and "optimistic" not in text  # a strict run shows no optimistic figure
    ensemble = results["overall"]
    assert f"{100 * ensemble['macro_f1']['ensemble']:.2f}" in text
    assert f"{100 * ensemble['balanced_accuracy']['ensemble']:.2f}" in text
    matrix = np.array(results["overall"]["confusion"]["ensemble"])
    wrong = int(matrix.sum() - np.trace(matrix))  # the misses section says what the confusion matrix says
    if wrong:
        assert "misses" in pictured and f"{wrong} of {results['overall']['images']} test images" in text
    else:
        assert "got every test image right" in text
    assert "too few to say" in text and "18-24" in text and "female" in text
    assert "empty file" in text and "no_face" in text  # both reject kinds, with their reasons
    assert results["groups"]["attributes"]["gender"][0]["images"] == results["overall"]["images"] // 2
    assert set(results["landmark_study"]["members"]) == {"eyebrows", "eyes", "nose", "mouth", "jaw"}
    stored = json.loads((out / "results.json").read_text())
    assert stored["groups"]["overall"]["images"] == results["overall"]["images"] == 16  # 2 folds x 2 subjects x 4


PROBE = """<script>
addEventListener('load', () => {
  const images = [...document.images];
  const tables = [...document.querySelectorAll('section table')];
  const report = {
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    filled: [...document.querySelectorAll('section')].filter(s => s.innerText.trim().length > 40).map(s => s.id),
    images: images.length,
    decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    tables: tables.length,
    emptyTables: tables.filter(t => t.tBodies[0].rows.length === 0).length,
    overflow: document.documentElement.scrollWidth - innerWidth,
  };
  document.body.setAttribute('data-probe', JSON.stringify(report));
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    command = [shutil.which("chromium") or shutil.which("chromium-browser"), "--headless", "--no-sandbox",
               "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no chromium on PATH (Debian package `chromium`; `make setup` or .ci/run installs it)")
@pytest.mark.parametrize("width", [1280, 390], ids=["laptop", "phone"])
def test_report_renders_in_chromium(run, width, tmp_path_factory):
    out, _ = run
    probe = tmp_path_factory.mktemp("probe") / "probed.html"
    probe.write_text((out / REPORT_FILE).read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(f"--window-size={width},900", "--dump-dom", probe.as_uri())
    found = re.search(r"data-probe=\"([^\"]*)\"", dom.stdout)
    assert found, dom.stderr[-2000:]
    report = json.loads(found.group(1).replace("&quot;", '"'))
    assert report["sections"] == list(SECTIONS) and report["filled"] == list(SECTIONS)
    assert report["images"] >= 8 and report["decoded"] == report["images"]
    assert report["tables"] >= 6 and report["emptyTables"] == 0
    assert report["overflow"] <= 1, "the page is wider than the screen"
    # Kept in runs/test-report/ (git-ignored), not in pytest's tmp folders, which keep only the last few
    # sessions of every user: a person can look at what the test saw after `make test`.
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / REPORT_FILE, SCREENSHOTS / REPORT_FILE)
    shot = SCREENSHOTS / f"report-{width}.png"
    chromium(f"--window-size={width},2400", f"--screenshot={shot}", (out / REPORT_FILE).as_uri())
    pixels = decode_png(shot.read_bytes())
    assert pixels.shape[1] == width and pixels.std() > 10  # drawn, not blank
    print(f"screenshot: {shot}")
