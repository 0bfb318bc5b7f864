"""The evaluation report: JSON and HTML written together, and the HTML checked in a real browser
(Debian's chromium driven by playwright; scripts/install_browser.sh installs both)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mistral_tune.chat import load_tokenizer
from mistral_tune.config import EvalConfig
from mistral_tune.errors import OutputError
from mistral_tune.evaluate.base import ModelPair
from mistral_tune.evaluate.report import REPORT_HTML, REPORT_JSON, write_report
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


def test_report_renders_in_chromium(report_dir: Path, tmp_path: Path):
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
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"failed to load {req.url}"))
            page.goto((report_dir / REPORT_HTML).as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                                                      "e.naturalWidth])")
            title = page.title()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(images) >= 6
    assert [src for src, complete, width in images if not (complete and width > 0)] == []
    assert title == "Evaluation: tiny <run>"
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True
