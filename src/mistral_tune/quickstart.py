"""The embedded quickstart: a real LoRA fine-tune of a tiny Mistral model on bundled data, on a CPU.

It creates a random-init Mistral-architecture model (saved as an HF checkpoint with the v3
tokenizer), fine-tunes it on a word-copying task, merges the adapter, and reports exact-match
accuracy on held-out prompts for the base and the tuned model.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
import yaml

from .chat import load_tokenizer
from .config import load_config
from .fsutil import check_target, mark_output
from .models.load import save_model
from .models.mistral import MistralConfig, MistralForCausalLM
from .models.tuned import load_tuned
from .serve.generate import complete

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


def exact_match(model, tokenizer, records: list[dict]) -> float:
    hits = 0
    for rec in records:
        prompt, answer = rec["messages"][:-1], rec["messages"][-1]["content"]
        hits += complete(model, tokenizer, prompt, max_new_tokens=12).strip() == answer.strip()
    return hits / len(records)


def write_config(work: Path, base_dir: Path) -> Path:
    src = data_dir()
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg["base_model"] = str(base_dir)
    cfg["datasets"] = [{"path": str(src / "train.jsonl"), "format": "messages"}]
    cfg["output_dir"] = str(work / "run")
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
    heldout = [json.loads(line) for line in (data_dir() / "heldout.jsonl").read_text().splitlines()]

    base = load_tuned(base_dir)
    tokenizer = base.tokenizer
    torch.manual_seed(0)
    before = exact_match(base.model, tokenizer, heldout)
    echo(f"base model exact match on {len(heldout)} held-out prompts: {100 * before:.1f}%")
    del base

    result = train(cfg, echo=echo, merge=True)
    if result.stopped_by:  # train() has said where it stopped; the quickstart itself starts over
        echo(f"quickstart stopped by {result.stopped_by} before the end of training; nothing was evaluated")
        return {"stopped_by": result.stopped_by, "checkpoint_dir": str(result.checkpoint_dir)}
    tuned = load_tuned(result.model_dir).model
    after = exact_match(tuned, tokenizer, heldout)
    example = heldout[0]["messages"]
    answer = complete(tuned, tokenizer, example[:-1], max_new_tokens=12)
    summary = {
        "heldout_prompts": len(heldout),
        "base_exact_match": before,
        "tuned_exact_match": after,
        "final_train_loss": result.final_train_loss,
        "heldout_loss": result.eval_loss,
        "adapter_dir": str(result.adapter_dir),
        "merged_dir": str(result.model_dir),
        "config": str(config_path),
    }
    (result.output_dir / "quickstart_result.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo("")
    echo(f"example: {example[0]['content']!r} -> {answer!r}")
    echo(f"held-out exact match: base {100 * before:.1f}% -> tuned {100 * after:.1f}%")
    echo(f"LoRA adapter (PEFT format): {result.adapter_dir}")
    echo(f"merged model (HF format):   {result.model_dir}")
    echo(f"config used:                {config_path}")
    echo("To fine-tune a real model on a GPU, copy that config and set for example")
    echo("  base_model: mistralai/Mistral-7B-v0.3   tokenizer: v3   sequence_len: 4096")
    echo("then run: mistral-tune train your.yaml")
    return summary
