"""The embedded quickstart: a real LoRA fine-tune of a tiny Mistral model on bundled data, on a CPU.

It creates a random-init Mistral-architecture model (saved as an HF checkpoint with the v3
tokenizer), fine-tunes it on a word-copying task, merges the adapter, and reports, base vs tuned:
exact match on held-out prompts, the KL divergence from the base on general text, and a small
pass-key probe; the HTML report is in the run's eval/ folder.

Its preference variant (method dpo, ipo, orpo, simpo or kto) runs two phases: a short SFT on prompts
asking for one word of a list, answered with any word of it (the model learns to answer with a word
of the list, favouring no kind), then the preference method from that adapter (init_from) on pairs
preferring a word for a thing of nature to one for a made thing, and reports the held-out preference
accuracy of the SFT model (the reference) and of the tuned one.
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


def _prepare_work(work: Path, echo) -> tuple[Path, Path]:
    """(work, base model dir): the quickstart's directory and its tiny model, made when missing. Its own
    directory from an earlier quickstart is reused (the runs in it replaced); nothing else is."""
    work = check_target(work, "quickstart", overwrite=True)
    work.mkdir(parents=True, exist_ok=True)
    mark_output(work, "quickstart")
    base_dir = work / "base-model"
    if not (base_dir / "config.json").is_file():
        echo(f"creating a tiny random-init Mistral model in {base_dir}")
        create_tiny_model(base_dir)
    return work, base_dir


def run_quickstart(work: Path, overrides: list[str] = (), echo=print, method: str = "sft") -> dict:
    from .train.loop import train

    if method != "sft":
        return run_preference_quickstart(work, method, overrides, echo)
    work, base_dir = _prepare_work(work, echo)
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


def _kto_records(pairs: Path, out: Path) -> Path:
    """The pairs as KTO's unpaired records: each chosen answer desirable, each rejected one not."""
    lines = []
    for line in pairs.read_text().splitlines():
        pair = json.loads(line)
        lines += [json.dumps({"prompt": pair["prompt"], "completion": pair[k], "label": k == "chosen"})
                  for k in ("chosen", "rejected")]
    out.write_text("\n".join(lines) + "\n")
    return out


def write_preference_configs(work: Path, base_dir: Path, method: str) -> tuple[Path, Path]:
    """(SFT phase config, preference run config) in `work`, from the bundled preference_sft.yaml and
    preference.yaml."""
    src = data_dir()
    sft = yaml.safe_load((src / "preference_sft.yaml").read_text())
    sft.update(base_model=str(base_dir), datasets=[{"path": str(src / "preference_sft.jsonl"), "format": "messages"}],
               output_dir=str(work / "sft-run"))
    train, heldout = src / "preference_train.jsonl", src / "preference_heldout.jsonl"
    if method == "kto":
        train, heldout = (_kto_records(p, work / f"kto_{p.name}") for p in (train, heldout))
    cfg = yaml.safe_load((src / "preference.yaml").read_text())
    cfg.update(base_model=str(base_dir), method=method, init_from=str(work / "sft-run"),
               datasets=[{"path": str(train)}], val_datasets=[{"path": str(heldout)}],
               output_dir=str(work / f"{method}-run"))
    entry = cfg["eval"]["forgetting"]["dataset"]
    entry["path"] = str(src / entry["path"])
    paths = work / "sft.yaml", work / f"{method}.yaml"
    for path, data in zip(paths, (sft, cfg), strict=True):
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return paths


def _sft_phase(config_path: Path, echo) -> bool:
    """The SFT phase; False when stopped. An earlier quickstart's SFT adapter made from the same config is
    kept rather than trained again."""
    from .train.loop import train

    cfg = load_config(config_path, ["overwrite_output_dir=true"])
    out = Path(cfg.output_dir)
    if (out / "adapter" / "adapter_config.json").is_file() and (out / "config.yaml").is_file() \
            and yaml.safe_load((out / "config.yaml").read_text()) == cfg.model_dump():
        echo(f"SFT phase: the adapter in {out} (from an earlier quickstart, same config) is kept")
        return True
    echo("SFT phase: answers that name any word of the list")  # the tuned run's reference
    result = train(cfg, echo=echo)
    return result.stopped_by is None


def run_preference_quickstart(work: Path, method: str, overrides: list[str] = (), echo=print) -> dict:
    """The preference quickstart (see the module doc); its summary, also in the run's quickstart_result.json."""
    from .train.loop import train

    work, base_dir = _prepare_work(work, echo)
    sft_path, config_path = write_preference_configs(work, base_dir, method)
    if not _sft_phase(sft_path, echo):
        echo("quickstart stopped by a signal during the SFT phase; nothing was evaluated")
        return {"stopped_by": "signal", "phase": "sft"}
    cfg = load_config(config_path, list(overrides) + ["overwrite_output_dir=true"])
    echo(f"{method} phase: pairs preferring a word for a thing of nature, from the SFT adapter (init_from)")
    result = train(cfg, echo=echo)
    if result.stopped_by:
        echo(f"quickstart stopped by {result.stopped_by} before the end of training; nothing was evaluated")
        return {"stopped_by": result.stopped_by, "checkpoint_dir": str(result.checkpoint_dir)}
    report = json.loads((result.report.parent / REPORT_JSON).read_text())
    metrics = {ev["name"]: ev["metrics"] for ev in report["evaluations"]}
    accuracy = metrics["preference"]["accuracy"]
    summary = {
        "method": method,
        "heldout_pairs": len(Path(cfg.val_datasets[0].path).read_text().splitlines()),  # KTO: judged answers
        "reference_preference_accuracy": accuracy.get("base"),
        "tuned_preference_accuracy": accuracy["tuned"],
        "kl_from_base": metrics["forgetting"]["kl"]["tuned"],
        "final_train_loss": result.final_train_loss,
        "heldout_loss": result.eval_loss,
        "adapter_dir": str(result.adapter_dir),
        "report": str(result.report),
        "config": str(config_path),
    }
    (result.output_dir / "quickstart_result.json").write_text(json.dumps(summary, indent=2) + "\n")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    echo("")
    what = "judged answers; those whose log-ratio to the reference has their label's sign" if method == "kto" \
        else "pairs; those whose chosen answer the model finds the more likely"
    echo(f"held-out preference accuracy ({summary['heldout_pairs']} {what}): SFT model (the reference) "
         f"{pct(summary['reference_preference_accuracy'])} -> {method} {pct(summary['tuned_preference_accuracy'])}")
    echo(f"forgetting: KL from the base (adapter off) {summary['kl_from_base']:.3f} nats/token on general text")
    echo(f"evaluation report:          {result.report}")
    echo(f"LoRA adapter (PEFT format): {result.adapter_dir}")
    echo(f"configs used:               {sft_path} (SFT), {config_path} ({method})")
    return summary
