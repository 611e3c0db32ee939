"""The report in a real browser: Debian's Chromium, headless, driven by playwright (never its own browser build).

`.ci/run` installs Chromium when it is missing (`apt-get install -y chromium`);
the test is skipped, saying so, only where there is no /usr/bin/chromium.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from results_fixtures import HOSTILE

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# no background connections: this machine has no network beyond the package registries
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium at /usr/bin/chromium: install it with `apt-get install -y chromium` "
                    "(.ci/run does this on CI)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def test_report_in_chromium(results_run, browser, tmp_path):
    cfg, _, _ = results_run
    report = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", cfg.data.output, "--out", str(report)])
    assert result.exit_code == 0, result.output

    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    console, errors, dialogs, requests = [], [], [], []
    page.on("console", lambda m: console.append((m.type, m.text)))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri(), wait_until="load")

    body = page.inner_text("body")
    for qid, prompt, completion in (("q-cat", "the cat", "sits on the hill"), ("q-fish", "a blue fish", "swims under"),
                                    ("q-dog", "the big dog", "eats quickly")):
        section = page.locator(f"section#q-{qid}")
        assert section.count() == 1
        text = section.inner_text()
        assert prompt in text and completion in text and "Measurement f = log p(completion | prompt)" in text
        top = [d.inner_text() for d in section.locator("details.top .doc").all()]
        notes = section.locator("details.top p.note").all_inner_texts()  # rows of top_k = 20 with a negative score
        hidden = int(notes[0].split()[0]) if notes else 0
        assert len(top) + hidden == 20 and len(top) >= 10 and top[0].endswith(":0")
        assert section.locator("svg").count() == 3  # layers, distribution, truncation error
    assert "Proponents" in body and "Opponents" in body and "Versions" in body

    # token spans carry colours: green for positive contributions, red for negative ones
    colours = page.eval_on_selector_all("span.tok", "els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert len(colours) > 500
    greens = [c for c in colours if c.startswith("rgba(26, 152, 80")]
    reds = [c for c in colours if c.startswith("rgba(215, 48, 39")]
    assert len(greens) > 50 and len(reds) > 50 and len(set(colours)) > 100
    assert page.locator(".legend .ramp").count() == 3

    # hostile documents are text: no script or img element exists, nothing ran
    assert page.locator("script").count() == 0 and page.locator("img").count() == 0
    assert page.locator("[onerror]").count() == 0
    rows = page.locator(".row").all_inner_texts()
    shown = " ".join(r for r in rows if "evil-" in r)
    assert HOSTILE["evil-script"] in shown and HOSTILE["evil-img"] in shown
    assert dialogs == [] and errors == []
    assert [c for c in console if c[0] in ("error", "warning")] == []
    assert all(u.startswith("file://") for u in requests)  # nothing fetched from anywhere else

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 20_000
    page.close()
