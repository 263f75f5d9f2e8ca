"""profiling/comm_report.py on real 2-rank runs: numbers equal the ledger's, plots are real
PNGs with titles and units, and the HTML is self-contained and renders in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.launch import check, run, summary

CLI = str(ROOT / "profiling/comm_report.py")
SMALL = ["--set", "model.num_layers=1", "--set", "train.max_steps=8",
         "--set", "train.checkpoint_interval=8", "--set", "data.max_train_items=1024",
         "--set", "data.max_eval_items=256", "--set", "data.global_batch_size=32",
         "--set", "dispatch.timing=on"]
RUNS = ("baseline", "epruntime")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """One --run report: a baseline (alltoall) and a dedup training, 1 layer, 8 steps."""
    out = tmp_path_factory.mktemp("comm_report")
    check(run([sys.executable, CLI, "--run", *SMALL, "--out", str(out)]))
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


class _Tables(HTMLParser):
    """Cells of the report's tables: {table class: {row label: {data-key: text}}}."""

    def __init__(self):
        super().__init__()
        self.tables, self.refs = {}, []
        self._table = self._row = self._key = None
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href"):
            if name in a:
                self.refs.append(a[name])
        if tag == "table":
            self._table = self.tables.setdefault(a["class"], {})
        elif tag == "th" and self._table is not None:
            self._in_th, self._row = True, None
        elif tag == "td":
            self._key = a["data-key"]

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False
        elif tag == "td":
            self._key = None

    def handle_data(self, data):
        if self._in_th and data.strip() and self._row is None:
            self._row = self._table.setdefault(data.strip(), {})
        elif self._key is not None and self._row is not None:
            self._row[self._key] = data


def _parse(text: str):
    return None if text == "" else json.loads(text)


# ---- (a) numbers and files --------------------------------------------------------------------
def test_report_json_equals_the_ledger(report_dir):
    report = _report(report_dir)
    assert set(report["runs"]) == set(RUNS)
    for name in RUNS:
        s, rec = summary(report_dir / "runs" / name), report["runs"][name]
        assert rec["comm"] == s["comm"] and rec["eval_comm"] == s["eval_comm"]
        assert rec["comm_time"] == s["comm_time"] and rec["eval_comm_time"] == s["eval_comm_time"]
        assert rec["comm_time"]["seconds"] > 0 and rec["comm_time"]["calls"] > 0
        assert rec["routing_per_layer"] == s["routing_per_layer"]
        assert len(rec["comm"]["per_layer"]) == 1 and rec["steps"] == 8
    # The runs are what they claim: megatron-core sends one row per (token, expert), dedup one
    # per (token, remote rank), which at EP=2 is exactly the floor.
    base, ep = report["runs"]["baseline"]["comm"], report["runs"]["epruntime"]["comm"]
    assert base["rows_sent"] == base["expert_rows"] > base["floor_rows"]
    assert ep["rows_sent"] == ep["floor_rows"] and ep["cross_rank_bytes"] < base["cross_rank_bytes"]


def test_recorded_runs_give_the_same_report(report_dir, tmp_path):
    runs = report_dir / "runs"
    check(run([sys.executable, CLI, str(runs / "epruntime"), "--baseline", str(runs / "baseline"),
               "--out", str(tmp_path)]))
    assert _report(tmp_path)["runs"] == _report(report_dir)["runs"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == \
        sorted(p.name for p in report_dir.glob("*.png"))


def test_html_tables_equal_the_ledger(report_dir):
    tables = _Tables()
    tables.feed((report_dir / "report.html").read_text())
    for key in ("comm", "eval_comm"):
        totals = tables.tables[f"totals {key}"]
        for name in RUNS:
            ledger = summary(report_dir / "runs" / name)[key]
            cells = totals[name]
            assert cells and {k: _parse(v) for k, v in cells.items()} == \
                {k: ledger[k] for k in cells}
            layers = tables.tables[f"per-layer {key} run-{name}"]
            for i, fig in enumerate(ledger["per_layer"]):
                cells = layers[f"layer {i + 1}"]
                assert "cross_rank_bytes" in cells and "floor_rows" in cells
                assert {k: _parse(v) for k, v in cells.items()} == {k: fig[k] for k in cells}
    for key in ("comm_time", "eval_comm_time"):
        parts = tables.tables[f"time-parts {key}"]
        for name in RUNS:
            timing = summary(report_dir / "runs" / name)[key]
            for d in ("forward", "backward"):
                for p in ("dispatch", "combine"):
                    cells = parts[f"{name} {d} {p}"]
                    assert "collective" in cells and "total" in cells
                    assert {k: _parse(v) for k, v in cells.items()} == \
                        {k: timing["parts"][d][p][k] for k in cells}


def test_every_png_is_real_and_embedded(report_dir):
    report = _report(report_dir)
    files = [p["file"] for p in report["plots"]]
    expected = {f"{n}_{kind}.png" for n in RUNS
                for kind in ("bytes_total", "bytes_layer1", "expert_modality")}
    assert expected | {"per_layer_bytes.png", "comparison.png", "load_per_rank.png",
                       "phase_time.png"} == set(files)
    assert sorted(p.name for p in report_dir.glob("*.png")) == sorted(files)
    page = (report_dir / "report.html").read_text()
    for f in files:
        data = (report_dir / f).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, f
        with Image.open(report_dir / f) as im:
            im.verify()
        with Image.open(report_dir / f) as im:
            assert 300 <= im.width <= 4000 and 200 <= im.height <= 4000, (f, im.size)
        assert base64.b64encode(data).decode() in page, f"{f} not embedded"
    parser = _Tables()
    parser.feed(page)
    assert parser.refs and all(r.startswith("data:image/png;base64,") for r in parser.refs)
    assert not re.search(r"url\(|@import|<script|<link", page, re.I)


# ---- (b) it renders in a browser ----------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium")
    if path is None:
        proc = subprocess.run(["sh", str(ROOT / "scripts/chromium.sh")], capture_output=True,
                              text=True, timeout=600)
        path = shutil.which("chromium")
        if proc.returncode != 0 or path is None:
            pytest.skip(f"chromium cannot be installed: {proc.stderr.strip()[-500:]}")
    return path


def test_html_renders_in_headless_chromium(report_dir, chromium, tmp_path):
    shot = tmp_path / "shot.png"
    page = (report_dir / "report.html").resolve().as_uri()
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", "--window-size=1280,1600", page],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)  # never None at this size
        assert len(colours) > 1, "blank page"
    # Page errors: script exceptions, console errors, resources that failed to load.
    page_errors = [line for line in proc.stderr.splitlines()
                   if "Uncaught" in line or "net::ERR" in line or "Failed to load" in line
                   or ("CONSOLE" in line and "report.html" in line)]
    assert not page_errors, "\n".join(page_errors)


# ---- (c) plots are readable ---------------------------------------------------------------------
UNITS = ("MiB", "KiB", "(B)", "count", "pairs", "(ms)")


def test_every_plot_has_title_labels_and_units(report_dir):
    sys.path.insert(0, str(ROOT))
    from profiling import comm_report

    runs = _report(report_dir)["runs"]
    figs = comm_report.figures(runs)
    assert {f for f, _, _ in figs} == {p["file"] for p in _report(report_dir)["plots"]}
    for fname, caption, fig in figs:
        assert caption
        plots = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert plots, fname
        for ax in plots:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), fname
            assert ax.texts, f"{fname}: values are not annotated"
            unit_labels = [ax.get_ylabel(), *(b.get_ylabel() for b in bars)]
            assert any(u in label for label in unit_labels for u in UNITS), (fname, unit_labels)
        if "bytes" in fname:
            byte_labels = [b.get_ylabel() for b in bars] or [ax.get_ylabel() for ax in plots]
            assert all(re.search(r"\((MiB|KiB|B)\)", lab) for lab in byte_labels), byte_labels
    # Byte axes read in the unit the size calls for.
    assert comm_report.byte_unit(3 * 2**20)[0] == "MiB"
    assert comm_report.byte_unit(3 * 2**10)[0] == "KiB"
    assert comm_report.human_bytes(1536) == "1.5 KiB"
