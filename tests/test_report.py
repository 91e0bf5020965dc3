"""status/report.html: its content from a fabricated status folder, and how it renders in headless chromium."""

from __future__ import annotations

import logging
import re
import time

import pytest
from helpers import fake_status_folder, headless_chromium, missing_browser

from daemon.quality.forgetting import build_matrix, read_rows
from daemon.views.report import REPORT_FILE, main, matrix_figure, write_report, write_report_logged


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    status_dir = fake_status_folder(tmp_path_factory.mktemp("report") / "status")
    return write_report(status_dir)


def test_the_report_has_one_heat_map_with_files_as_rows(report):
    text = report.read_text(encoding="utf-8")
    assert len(re.findall(r'<img class="heatmap"', text)) == 1
    fig = matrix_figure(build_matrix(read_rows(report.parent)))
    ax = fig.axes[0]
    rows = [label.get_text() for label in ax.get_yticklabels()]
    assert rows == ["1 drop-2026-01-01.jsonl", "2 drop-2026-01-02.jsonl", "3 drop-2026-01-03.jsonl"]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["#1", "#2", "#3", "e1"]
    assert ax.get_images()[0].get_array().shape == (3, 4)


def test_the_report_references_nothing_outside_itself(report):
    text = report.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)


def test_failed_reasons_and_samples_are_escaped(report):
    text = report.read_text(encoding="utf-8")
    assert "bad&lt;script&gt;.jsonl" in text and "bad<script>" not in text
    assert "no usable examples: &lt;b&gt;not JSON&lt;/b&gt; &amp; empty" in text
    assert "return &lt;tag&gt; &amp; &#x27;x&#x27;" in text
    assert "drop-2026-01-09.jsonl, drop-2026-01-10.jsonl" in text  # the queue


def test_the_report_command_writes_the_report_of_a_fresh_status_folder(tmp_path, capsys):
    assert main(["--status_dir", str(tmp_path)]) == 0
    text = (tmp_path / REPORT_FILE).read_text(encoding="utf-8")
    assert "No training loss recorded yet." in text and "No evaluations yet." in text
    assert capsys.readouterr().out.strip() == str(tmp_path / REPORT_FILE)
    assert main(["--status_dir", str(tmp_path / "missing")]) == 1


def test_a_report_that_cannot_be_drawn_is_logged_and_never_raised(tmp_path, caplog):
    (tmp_path / "history.jsonl").write_text('{"outcome": "done", "file": "a.jsonl"}\n')  # no steps: a plot breaks
    with caplog.at_level(logging.ERROR, logger="daemon.views.report"):
        assert write_report_logged(tmp_path) is None
    assert "could not write" in caplog.text


@pytest.mark.timeout(90)
def test_the_report_renders_in_headless_chromium_without_errors(report, tmp_path):
    why = missing_browser()
    if why:
        pytest.skip(f"no headless browser: {why}")
    started = time.monotonic()
    driver = headless_chromium(tmp_path / "profile")
    try:
        driver.get(report.resolve().as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.querySelectorAll('img, svg')).map(e => {"
            " const r = e.getBoundingClientRect();"
            " return [e.className.baseVal ?? e.className, e.complete === false ? 0 : (e.naturalWidth ?? 1),"
            " r.width, r.height]; })"
        )
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert errors == []
    assert len(sizes) == 4
    for name, natural, width, height in sizes:
        assert natural > 0 and width > 0 and height > 0, f"{name} renders empty"
    assert time.monotonic() - started < 60
