"""The model card (README.md) of what a run writes: its adapter, its merged or fully fine-tuned model.

The header is the Hub's metadata, written through huggingface_hub's ModelCardData (base_model,
library_name, license carried from the base model's own card, tags, pipeline_tag), so the Hub and
`huggingface_hub.ModelCard` read it. The body says what went in and what came out: the data
report's counts, the hyper-parameters, the evaluation base vs tuned when the run has one, and how
to load the files with transformers, PEFT, vLLM and llama.cpp.

A card reads only files: the run's config.yaml, data_report.json, metrics.jsonl and evaluation report,
the output's adapter_config.json / config.json, and the base model's README.md.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import yaml

from ..fsutil import MARKER, atomic_write_text, run_folder
from .vllm import min_max_lora_rank

CARD = "README.md"
#: The run's evaluation report, as evaluate/report.py writes it into the run's eval/ (REPORT_JSON).
RUN_EVALUATION = ("eval", "eval_report.json")
# The hyper-parameters a card lists, in this order, where the run's config sets them.
HYPER_PARAMETERS = (
    "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_dora", "use_rslora", "lora_init",
    "learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "optimizer", "weight_decay", "max_grad_norm",
    "num_epochs", "max_steps", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "sample_packing",
    "train_on_inputs", "neftune_noise_alpha", "tokenizer", "seed",
)
_CACHED = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")  # a hub model in huggingface_hub's cache


def hub_id(base: str | None) -> str | None:
    """The Hub id of a base model: its name when it is one, or the id a huggingface_hub cache path holds;
    None for a local model (the Hub's base_model must name a Hub model)."""
    if not base:
        return None
    cached = _CACHED.search(str(base))
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(base)
    except HFValidationError:
        return None
    # OWNER/NAME, and no such local folder (which a relative base_model would name instead)
    return base if "/" in base and not Path(base).exists() else None


def base_license(base: str | None) -> dict:
    """license (with license_name / license_link for 'other') from the base model's own card, if it is
    on disk: a local model directory, or the huggingface_hub cache."""
    if not base:
        return {}
    readme = Path(base) / CARD
    if not readme.is_file() and hub_id(base):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id(base), CARD)
        readme = Path(cached) if isinstance(cached, str) else readme
    if not readme.is_file():
        return {}
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except Exception:  # a base card whose header does not parse: its license is unknown, nothing more
        return {}
    return {k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_of(folder: Path) -> Path | None:
    """The run an output came from: the one it lies in, or, for a merge written elsewhere, the run of
    the adapter its marker names as a source."""
    sources = (_read_json(folder / MARKER) or {}).get("sources") or []
    for candidate in [folder, *(s for s in sources if isinstance(s, str))]:
        run = run_folder(candidate)
        if run is not None:
            return run
    return None


def _run_files(run: Path | None) -> tuple[dict, dict | None, dict | None, int | None]:
    """(config, data report, evaluation report, steps trained) of a run; empty where absent."""
    if run is None:
        return {}, None, None, None
    try:
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    steps = None
    with contextlib.suppress(OSError, ValueError):  # no metrics, or a torn last line: the steps read so far
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line) if line.strip() else {}
            steps = rec.get("step", steps) if "loss" in rec else steps
    return config, _read_json(run / "data_report.json"), _read_json(run.joinpath(*RUN_EVALUATION)), steps


def _num(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _data_section(report: dict | None) -> list[str]:
    if not report:
        return ["No data report was found beside this output."]
    rows = [("records read", "records"), ("samples", "samples"), ("trained on", "train_samples"),
            ("held out", "val_samples"), ("tokens", "tokens"), ("trained tokens", "trained_tokens"),
            ("rejected records", "rejected"), ("exact duplicates removed", "dedup_exact"),
            ("near duplicates removed", "dedup_near"), ("too long, dropped", "dropped_too_long"),
            ("truncated", "truncated"), ("packed rows", "packed_rows")]
    lines = ["| | |", "|---|---|"]
    lines += [f"| {label} | {_num(report[key])} |" for label, key in rows if report.get(key) not in (None, 0)]
    sources = report.get("per_file") or {}
    formats = report.get("formats") or {}
    if sources:
        lines += ["", "Sources (records read):", ""]
        lines += [f"- `{Path(src).name}` ({formats.get(src, 'format unknown')}): {_num(n)}"
                  for src, n in sources.items()]
    return lines


def _hyper_section(config: dict, steps: int | None) -> list[str]:
    shown = [(k, config[k]) for k in HYPER_PARAMETERS if config.get(k) is not None and config[k] is not False]
    if steps is not None:
        shown.append(("steps trained", steps))
    if not shown:
        return ["The run's config was not found beside this output."]
    lines = ["| | |", "|---|---|"]
    for key, value in shown:
        text = ", ".join(map(str, value)) if isinstance(value, list) else _num(value)
        lines.append(f"| {key} | {text} |")
    return lines


def _eval_section(report: dict | None) -> list[str]:
    if not report or not report.get("evaluations"):
        return []
    lines = ["## Evaluation", "",
             f"Base vs tuned after step {report.get('step', '?')} (the base: "
             f"{report.get('model', {}).get('base') or 'the base model'}):", "",
             "| evaluation | metric | base | tuned |", "|---|---|---|---|"]
    for ev in report["evaluations"]:
        for metric, values in (ev.get("metrics") or {}).items():
            if isinstance(values, dict):
                lines.append(f"| {ev.get('name')} | {metric} | {_num(values.get('base', '-'))} | "
                             f"{_num(values.get('tuned', '-'))} |")
    return lines + [""]


def _usage_section(adapter: bool, where: str, base: str, rank: int | None) -> list[str]:
    """How to load it with transformers / PEFT, vLLM and llama.cpp."""
    if adapter:
        py = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{base}", torch_dtype="auto")',
              f'model = PeftModel.from_pretrained(model, "{where}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{base}")']
        vllm = (f"vllm serve {base} --tokenizer-mode mistral --enable-lora --max-lora-rank "
                f"{min_max_lora_rank(int(rank or 8))} --lora-modules tuned={where}")
        gguf = [f"mistral-tune merge {where} --out merged", "mistral-tune export gguf merged --quant q8_0",
                "llama-cli -m merged-q8_0.gguf -cnv"]
        lead = "With PEFT on transformers (this folder holds the adapter only):"
    else:
        py = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{where}", torch_dtype="auto")',
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")']
        vllm = f"vllm serve {where} --tokenizer-mode mistral"
        gguf = [f"mistral-tune export gguf {where} --quant q8_0 --out model-q8_0.gguf",
                "llama-cli -m model-q8_0.gguf -cnv"]
        lead = "With transformers:"
    return ["## How to use", "", lead, "", "```python", *py, "```", "",
            "With vLLM (`--tokenizer-mode mistral` encodes chats with mistral-common, as in training):", "",
            "```bash", vllm, "```", "", "With llama.cpp, through a GGUF file:", "", "```bash", *gguf, "```", ""]


def card_text(folder: Path, *, repo_id: str | None = None, base_model: str | None = None, run: Path | None = None,
              name: str | None = None) -> str:
    """The model card of an adapter or model directory. repo_id: the Hub repository it goes to, named in
    the loading examples (default: the folder's path); run: the training run it came from (default: the
    run the folder lies in); name: its title (default: the repository's or the run's name)."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    adapter_cfg = _read_json(folder / "adapter_config.json")
    run = run or _run_of(folder)
    config, data, evaluation, steps = _run_files(run)
    base = base_model or config.get("base_model") or (adapter_cfg or {}).get("base_model_name_or_path")
    model_cfg = _read_json(folder / "config.json") or _read_json(Path(str(base)) / "config.json") or {}
    base_id = hub_id(base)
    method = config.get("adapter") or ("lora" if adapter_cfg else "full")
    method = {"none": "full"}.get(method, method)
    if (adapter_cfg or {}).get("use_dora") or config.get("use_dora"):
        method = "dora"
    tags = ["mistral-tune", method, *([model_cfg["model_type"]] if model_cfg.get("model_type") else [])]
    if adapter_cfg and base_id:
        tags.append(f"base_model:adapter:{base_id}")  # as PEFT's own cards tag an adapter
    meta = ModelCardData(base_model=base_id, library_name="peft" if adapter_cfg else "transformers",
                         pipeline_tag="text-generation", tags=tags, **base_license(base))
    where = repo_id or str(folder.resolve())
    # A full model from a run that trained an adapter is that adapter merged into the base.
    kind = ("LoRA adapter" if adapter_cfg else "merged model" if config.get("adapter") not in (None, "none")
            else "fine-tuned model")
    name = repo_id.split("/")[-1] if repo_id else name or (run.name if run else folder.resolve().name)
    body = [f"# {name}", "",
            (f"A {kind} of [{base_id}](https://huggingface.co/{base_id})" if base_id else f"A {kind} of `{base}`")
            + f" ({method}), trained with mistral-tune.", "",
            "## Training data", "", *_data_section(data), "",
            "## Hyper-parameters", "", *_hyper_section(config, steps), "",
            *_eval_section(evaluation),
            *_usage_section(bool(adapter_cfg), where, base_id or str(base), (adapter_cfg or {}).get("r"))]
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body)))


def write_card(folder: Path, **card) -> Path:
    """Write (or replace) folder/README.md, atomically; `card`: card_text's keywords."""
    path = Path(folder) / CARD
    atomic_write_text(path, card_text(folder, **card))
    return path


def write_run_cards(run: Path) -> list[Path]:
    """Cards for every output a finished run holds (adapter/, model/, merged/, best/), with its final evaluation."""
    run = Path(run)
    return [write_card(run / part) for part in ("adapter", "model", "merged", "best")
            if (run / part / "adapter_config.json").is_file() or (run / part / "config.json").is_file()]
