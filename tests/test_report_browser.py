"""report.html in a real headless browser (Debian's chromium): it loads offline, its map has points
with hover text, highlighting a finding lights up its cluster, numbers are formatted and there is
one row per finding.  Skipped, saying why, when no chromium is installed (`apt-get install chromium`).

The DOM is read after the page's scripts ran (``--dump-dom``); a probe script appended to a copy of
the report hovers a point and picks a finding the way a reader would, and writes what it saw into
the page.  A screenshot is taken too (set AUTOINTERV_SCREENSHOT_DIR to keep it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
from report_fixture import build_run

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium to load the report in: "
                                "`apt-get install -y chromium` (Debian) enables this test")

PROBE = """<script>
(function(){
 const pts = document.querySelectorAll('#map circle.pt');
 const first = pts[0], box = first.getBoundingClientRect();
 first.dispatchEvent(new MouseEvent('mousemove', {bubbles: true, clientX: box.x + 1, clientY: box.y + 1}));
 const tip = document.getElementById('tip');
 const seen = {points: pts.length, tip: tip.textContent, tip_display: tip.style.display};
 const sel = document.getElementById('mapsel');
 sel.value = sel.options[1].value; sel.dispatchEvent(new Event('change'));
 seen.option = sel.options[1].textContent;
 const lit = [...document.querySelectorAll('#map circle.pt.on')];
 seen.lit = lit.length;
 seen.lit_clusters = [...new Set(lit.map(p => p.getAttribute('data-c')))];
 seen.dimmed = document.getElementById('map').classList.contains('sel');
 seen.finding_rows = document.querySelectorAll('tr.finding').length;
 seen.map_width = document.getElementById('map').getBoundingClientRect().width;
 const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(seen);
 document.body.appendChild(pre);
})();
</script>"""


def _chromium(tmp: Path, *args: str) -> str:
    profile = tmp / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--window-size=1300,2400", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_run(tmp_path_factory.mktemp("browser")) / "report.html"


def test_report_in_a_headless_browser(report: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", probe.as_uri())
    seen = json.loads(unescape(dom.split('<pre id="probe">')[1].split("</pre>")[0]))
    assert seen["points"] == 60 and seen["finding_rows"] == 3
    assert seen["tip_display"] == "block" and " · cluster " in seen["tip"]  # model · cluster, then the text
    assert any(m in seen["tip"] for m in ("(sim-base)", "(sim-intervention)")) and "number" in seen["tip"]
    assert seen["option"].startswith("finding #1") and seen["dimmed"]
    assert seen["lit"] == 15 and sorted(seen["lit_clusters"]) == ["3", "4"]  # the cats texts: finding 1's
    assert seen["map_width"] > 800  # the map takes the page's width


def test_report_dom_and_screenshot(report: Path, tmp_path: Path) -> None:
    dom = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert dom.count('class="finding"') == 3 and dom.count("<circle") == 60
    assert "3.8e11" in dom and "381740047990" not in dom and "1.2e-7" in dom
    shot = Path(os.environ.get("AUTOINTERV_SCREENSHOT_DIR", tmp_path)) / "report-fixture.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(tmp_path, f"--screenshot={shot}", report.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one
