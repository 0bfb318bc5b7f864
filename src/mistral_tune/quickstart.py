"""The embedded quickstart: a real LoRA fine-tune of a tiny Mistral model on bundled data, on a CPU.

It creates a random-init Mistral-architecture model (saved as an HF checkpoint with the v3
tokenizer), fine-tunes it on a word-copying task, merges the adapter, and reports, base vs tuned:
exact match on held-out prompts, the KL divergence from the base on general text, and a small
pass-key probe; the HTML report is in the run's eval/ folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import yaml

from .chat import load_tokenizer
from .config import load_config
from .evaluate.report import REPORT_JSON
from .fsutil import check_target, mark_output
from .models.load import save_model
from .models.mistral import MistralConfig, MistralForCausalLM

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)


def data_dir() -> Path:
    return Path(str(resources.files("mistral_tune") / "resources" / "quickstart"))


def create_tiny_model(out_dir: Path, tokenizer: str = "v3", seed: int = 0, **overrides) -> Path:
    """A random-init Mistral model in HF format, with its tokenizer file beside the weights."""
    tok = load_tokenizer(tokenizer)
    cfg = MistralConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                        **{**TINY, **overrides})
    model = MistralForCausalLM(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    save_model(model, out_dir)
    tok.save(out_dir)
    return out_dir


def write_config(work: Path, base_dir: Path) -> Path:
    src = data_dir()
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg["base_model"] = str(base_dir)
    cfg["datasets"] = [{"path": str(src / "train.jsonl"), "format": "messages"}]
    cfg["output_dir"] = str(work / "run")
    for section, key in (("tasks", "dataset"), ("forgetting", "dataset")):
        entry = cfg["eval"][section][key]
        entry["path"] = str(src / entry["path"])
    path = work / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_quickstart(work: Path, overrides: list[str] = (), echo=print) -> dict:
    from .train.loop import train

    # Its own directory from an earlier quickstart is reused (the run in it replaced); nothing else is.
    work = check_target(work, "quickstart", overwrite=True)
    work.mkdir(parents=True, exist_ok=True)
    mark_output(work, "quickstart")
    base_dir = work / "base-model"
    if not (base_dir / "config.json").is_file():
        echo(f"creating a tiny random-init Mistral model in {base_dir}")
        create_tiny_model(base_dir)
    config_path = write_config(work, base_dir)
    cfg = load_config(config_path, list(overrides) + ["overwrite_output_dir=true"])

    result = train(cfg, echo=echo, merge=True)
    if result.stopped_by:  # train() has said where it stopped; the quickstart itself starts over
        echo(f"quickstart stopped by {result.stopped_by} before the end of training; nothing was evaluated")
        return {"stopped_by": result.stopped_by, "checkpoint_dir": str(result.checkpoint_dir)}
    report = json.loads((result.report.parent / REPORT_JSON).read_text())
    metrics = {ev["name"]: ev["metrics"] for ev in report["evaluations"]}
    tasks, needle = metrics["tasks"], metrics["needle"]
    summary = {
        "heldout_prompts": len((data_dir() / "heldout.jsonl").read_text().splitlines()),
        "base_exact_match": tasks["exact_match"]["base"],
        "tuned_exact_match": tasks["exact_match"]["tuned"],
        "kl_from_base": metrics["forgetting"]["kl"]["tuned"],
        "base_needle_accuracy": needle["accuracy"]["base"],
        "tuned_needle_accuracy": needle["accuracy"]["tuned"],
        "final_train_loss": result.final_train_loss,
        "heldout_loss": result.eval_loss,
        "adapter_dir": str(result.adapter_dir),
        "best": result.best,
        "merged_dir": str(result.model_dir),
        "report": str(result.report),
        "config": str(config_path),
    }
    (result.output_dir / "quickstart_result.json").write_text(json.dumps(summary, indent=2) + "\n")
    example = next(ev for ev in report["evaluations"] if ev["name"] == "tasks")["examples"][0]
    pct = lambda x: f"{100 * x:.1f}%"
    echo("")
    echo(f"example: {example['prompt']!r} -> {example['tuned']!r}")
    echo(f"held-out exact match ({summary['heldout_prompts']} prompts): base {pct(summary['base_exact_match'])} "
         f"-> tuned {pct(summary['tuned_exact_match'])}")
    echo(f"forgetting: KL from base {summary['kl_from_base']:.3f} nats/token on general text; perplexity "
         f"{metrics['forgetting']['ppl']['base']:,.0f} -> {metrics['forgetting']['ppl']['tuned']:,.0f}")
    echo(f"needle (1-digit pass key, 64-512 tokens): base {pct(summary['base_needle_accuracy'])} "
         f"-> tuned {pct(summary['tuned_needle_accuracy'])}")
    for warning in report["warnings"]:
        echo(f"warning: {warning}")
    echo(f"evaluation report:          {result.report}")
    if result.best:
        echo(f"best adapter:               {result.best['dir']} (step {result.best['step']})")
    echo(f"LoRA adapter (PEFT format): {result.adapter_dir}")
    echo(f"merged model (HF format):   {result.model_dir}")
    echo(f"config used:                {config_path}")
    echo("To fine-tune a real model on a GPU, copy that config and set for example")
    echo("  base_model: mistralai/Mistral-7B-v0.3   tokenizer: v3   sequence_len: 4096")
    echo("then run: mistral-tune train your.yaml")
    return summary
