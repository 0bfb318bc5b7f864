"""The evaluation report: JSON and HTML written together, and the HTML checked in a real browser
(Debian's chromium driven by playwright; scripts/install_browser.sh installs both)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from matplotlib.colors import to_rgba

from mistral_tune import plots
from mistral_tune.chat import load_tokenizer
from mistral_tune.config import EvalConfig
from mistral_tune.errors import OutputError
from mistral_tune.evaluate.base import ModelPair
from mistral_tune.evaluate.report import REPORT_HTML, REPORT_JSON, _examples, write_report
from mistral_tune.evaluate.run import Evaluator, build_evaluations
from mistral_tune.models.load import load_model
from mistral_tune.models.lora import LoraLinear, LoraSpec, apply_lora
from mistral_tune.quickstart import data_dir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def report_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A report of every kind of evaluation on the tiny model with a random (non-zero) adapter."""
    model, _ = load_model(str(tiny_model_dir))
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.05, generator=gen)
    tokenizer = load_tokenizer(None, tiny_model_dir)
    general = {"path": str(data_dir() / "general.jsonl"), "format": "text"}
    cfg = EvalConfig.model_validate({
        "tasks": {"dataset": {"path": str(data_dir() / "heldout.jsonl")}, "max_samples": 6, "max_new_tokens": 3,
                  "metrics": ["exact_match", "token_f1", "rouge_l", "chrf"]},
        "forgetting": {"dataset": general, "max_samples": 6, "max_tokens": 48},
        "needle": {"lengths": [32, 64], "depths": [0.0, 1.0], "trials": 1, "documents": general,
                   "documents_max_samples": 4},
    })
    evaluator = Evaluator(build_evaluations(cfg, tokenizer, model.config, 64), echo=lambda _: None)
    evaluator.run(ModelPair(model, tokenizer))
    report = evaluator.report("tiny <run>", str(tiny_model_dir), "adapters off", 20)
    history = [{"step": 10, "tasks.exact_match": 0.0, "tasks.exact_match@base": 0.0, "forgetting.kl": 0.01},
               {"step": 20, "tasks.exact_match": 0.5, "forgetting.kl": 0.02}, {"step": 20, "eval_loss": 9.1},
               {"step": 10, "eval_loss": 9.3}]
    return write_report(tmp_path_factory.mktemp("run") / "eval", report, history)


def test_report_json_and_html_hold_every_evaluation(report_dir: Path):
    report = json.loads((report_dir / REPORT_JSON).read_text())
    names = [ev["name"] for ev in report["evaluations"]]
    assert names == ["tasks", "loss", "forgetting", "needle", "long_ppl"]
    for ev in report["evaluations"]:
        for metric, sides in ev["metrics"].items():
            assert sides["tuned"] is not None, metric
    assert set(report["evaluations"][2]["metrics"]) == {"ppl", "ppl_increase", "kl"}
    grids = report["evaluations"][3]["figures"][0]["grids"]
    assert set(grids) == {"base", "tuned"} and len(grids["tuned"]) == 2 and len(grids["tuned"][0]) == 2
    page = (report_dir / REPORT_HTML).read_text()
    assert "tiny &lt;run&gt;" in page  # text is escaped
    images = [p.split("'")[0] for p in page.split("<img src='")[1:]]
    assert "plots/curves.png" in images and "plots/needle_needle.png" in images
    for src in images:
        assert (report_dir / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src


def test_report_replaces_its_own_folder_and_nothing_else(report_dir: Path, tmp_path: Path):
    report = json.loads((report_dir / REPORT_JSON).read_text())
    report["evaluations"] = report["evaluations"][:1]
    out = tmp_path / "eval"
    write_report(out, report, [])
    (out / "stale.txt").write_text("from an earlier report")
    write_report(out, report, [])
    assert not (out / "stale.txt").exists()  # the folder was replaced whole
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="mine"):  # fsutil's ownership rule: not written by mistral-tune
        write_report(foreign, report, [])
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "mine"]  # no temporary folder left behind


LAPTOP = {"width": 1366, "height": 768}
# What a page looks like in the browser: its size, whether anything is wider than the window, and the box
# (x, y, width, height) of the elements the checks name.
LAYOUT = """() => {
  const box = el => { const r = el.getBoundingClientRect(); return [r.x, r.y + window.scrollY, r.width, r.height]; };
  return {width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
          window: window.innerWidth,
          wide: [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right >
                window.innerWidth + 1).map(e => e.tagName),
          summary: [...document.querySelectorAll('.summary')].map(box),
          charts: [...document.querySelectorAll('img, svg.chart')].map(box),
          config: [...document.querySelectorAll('details table')].map(e => e.checkVisibility()),
          empty: [...document.querySelectorAll('.empty')].map(e => [e.textContent, e.offsetWidth > 0])};
}"""


def _browse(tmp_path: Path, page_path: Path, shot: str) -> tuple[dict, list[str], str]:
    """The page opened at a laptop's width in chromium: its layout, the errors it logged, its title."""
    if CHROMIUM is None or not _has_playwright():
        if os.environ.get("MISTRAL_TUNE_REQUIRE_BROWSER") == "1":
            pytest.fail("MISTRAL_TUNE_REQUIRE_BROWSER=1 but chromium or playwright is missing: "
                        "run bash scripts/install_browser.sh")
        pytest.skip("chromium and playwright are not installed (bash scripts/install_browser.sh)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=LAPTOP)
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"failed to load {req.url}"))
            page.goto(page_path.as_uri(), wait_until="load")
            layout = page.evaluate(LAYOUT)
            layout["images"] = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), "
                                                                "e.complete, e.naturalWidth])")
            title = page.title()
            page.screenshot(path=str(tmp_path / shot), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / shot).stat().st_size > 10_000
    return layout, errors, title


def test_report_renders_in_chromium(report_dir: Path, tmp_path: Path):
    layout, errors, title = _browse(tmp_path, report_dir / REPORT_HTML, "report.png")
    assert errors == []
    images = layout["images"]
    assert len(images) >= 6
    assert [src for src, complete, width in images if not (complete and width > 0)] == []
    assert title == "Evaluation: tiny <run>"
    # At a laptop's width nothing runs off the side, every plot fits the window, the page stays short.
    assert layout["width"] <= layout["window"] and layout["wide"] == []
    assert all(x >= 0 and x + w <= LAPTOP["width"] for x, _, w, _ in layout["charts"])
    assert 1500 < layout["height"] < 9000


def test_run_report_renders_in_chromium(tmp_path: Path):
    """The run report at a laptop's width: the summary at the top, the charts within the window, the
    150 keys of a config folded away (the page is a screen or two, not 8,000 px)."""
    from mistral_tune.fsutil import mark_output
    from mistral_tune.train.report import record_session, write_run_report

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 3 / s, "lr": 0.0007519, "grad_norm": 1.0, "tokens_per_s": 900.0} for s in range(1, 41)]
    lines += [{"step": s, "eval_loss": 2 / s, "tasks.exact_match": s / 40, "tasks.exact_match@base": 0.1}
              for s in (10, 20, 30, 40)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "config.yaml").write_text(json.dumps({"max_steps": 40, **{f"key_{i}": "value " * 8 for i in range(150)}}))
    (run / "data_report.json").write_text(json.dumps({"samples": 40, "warnings": []}))
    mark_output(run, "run")
    record_session(run, device="CPU", processes=1, resumed_from=None)
    record_session(run, outcome="complete", step=40)
    layout, errors, title = _browse(tmp_path, write_run_report(run), "run.png")
    assert errors == [] and title == "Training run: run"
    assert layout["width"] <= layout["window"] and layout["wide"] == []
    (x, y, w, h), = layout["summary"]
    assert y < 200 and h < 300 and x + w <= LAPTOP["width"]  # first thing on the page, a few lines
    (cx, cy, cw, ch), = layout["charts"]
    assert cy > y + h and cx >= 0 and cx + cw <= LAPTOP["width"] and 300 < ch < 1800
    assert layout["config"] == [False]  # folded: hidden until opened
    assert layout["height"] < 3000


def test_a_small_metric_gets_a_visible_bar_and_empty_answers_a_marker(report_dir: Path):
    """A KL of 0.0004 beside shares near 1 is a bar of its own scale; an empty answer shows '(empty)'."""
    fig = plots.bars("forgetting", {"ppl": {"base": 30.0, "tuned": 31.0}, "ppl_increase": {"base": None, "tuned": 0.03},
                                    "kl": {"base": None, "tuned": 0.0004}, "exact_match": {"base": 0.9, "tuned": 1.0}})
    heights = {}
    for ax in fig.axes:
        names = [t.get_text() for t in ax.get_xticklabels()]
        for patch in ax.patches:
            name = names[round(patch.get_x() + patch.get_width() / 2)]
            heights[(name, patch.get_facecolor())] = patch.get_height() / ax.get_ylim()[1]
    plots.pyplot().close(fig)
    blue, grey = to_rgba(plots.TUNED), to_rgba(plots.BASE)
    assert heights[("kl", blue)] > 0.5 and heights[("ppl_increase", blue)] > 0.5
    assert heights[("exact_match", grey)] == pytest.approx(0.9 / 1.15)  # base grey, tuned blue, as on the run page
    report = json.loads((report_dir / REPORT_JSON).read_text())
    ev = next(e for e in report["evaluations"] if e.get("examples"))
    ev = {**ev, "examples": [{**ev["examples"][0], "base": "", "tuned": "  "}]}
    cells = re.findall(r"<td>(.*?)</td>", _examples(ev))
    assert cells[-2:] == ["<span class='empty'>(empty)</span>"] * 2


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True
