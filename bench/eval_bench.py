"""How long the evaluations take at Mistral-7B shapes: the task evaluation on 200 prompts and the
needle grid, base and tuned, as the trainer runs them (the adapter toggled in place, bf16 autocast
over a bf16 base with float32 LoRA weights).

The model is Mistral-7B-v0.3's shapes (32 layers) with random weights and a LoRA adapter (r=16, all
seven projections, lora_B random so tuned differs from base), the v3 tokenizer. Random weights
never say end of sequence, so every answer runs to max_new_tokens: the worst case of a real model.

    python3 bench/eval_bench.py            # one GPU, about 2 minutes
    python3 bench/eval_bench.py --smoke    # 2 small layers on CPU

Prints a table last and writes $OUT/eval_bench.json (OUT defaults to ./out).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from gpu_bench import SHAPE, _build_ours

from mistral_tune.chat import load_tokenizer
from mistral_tune.config import NeedleConfig, TaskEvalConfig
from mistral_tune.data.formats import Chat
from mistral_tune.evaluate.base import ModelPair
from mistral_tune.evaluate.needle import NeedleEval
from mistral_tune.evaluate.tasks import TaskEval

HELDOUT = Path(__file__).resolve().parents[1] / "src/mistral_tune/resources/quickstart/heldout.jsonl"


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="2 small layers on CPU")
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    ap.add_argument("--sequence-len", type=int, default=4096, help="the run's trained sequence_len (needle lengths)")
    ap.add_argument("--batch-sizes", default="16,64", help="task evaluation batch sizes to time")
    args = ap.parse_args()
    tok = load_tokenizer("v3")
    examples = [(f"{HELDOUT.name}:{i + 1}", Chat(json.loads(line)["messages"]))
                for i, line in enumerate(HELDOUT.read_text().splitlines())]
    if args.smoke:
        from mistral_tune.models.lora import LoraSpec, apply_lora
        from mistral_tune.models.mistral import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        apply_lora(model, LoraSpec(r=4, alpha=4))
        examples, args.sequence_len, autocast = examples[:8], 256, None
    else:
        model, _ = _build_ours(n_layers=args.layers, lora_b_std=0.01)
        autocast = torch.bfloat16
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, 0.0, 0.01)
    pair = ModelPair(model, tok, autocast_dtype=autocast)

    rows, report = [], {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                        "torch": torch.__version__, "layers": model.config.num_hidden_layers, "runs": []}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        cfg = TaskEvalConfig.model_validate({"dataset": {"path": str(HELDOUT)}, "batch_size": bs,
                                             "metrics": ["exact_match", "token_f1", "rouge_l", "bleu", "chrf"]})
        task = TaskEval(examples, tok, cfg)
        seconds, result = timed(lambda t=task: t.run(pair))
        generated = 2 * len(examples) * cfg.max_new_tokens  # base and tuned; random weights never stop early
        run = {"evaluation": f"tasks, {len(examples)} prompts, batch {bs}", "seconds": round(seconds, 2),
               "generated_tokens": generated, "tokens_per_s": round(generated / seconds, 1),
               "metrics": result.flat()}
        report["runs"].append(run)
        rows.append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "metrics"}), flush=True)
    ncfg = NeedleConfig.model_validate({} if not args.smoke else {"lengths": [64, 128], "key_digits": 2})
    needle = NeedleEval(tok, ncfg, sequence_len=args.sequence_len, model_config=model.config)
    prompt_tokens = sum(len(p[3]) for p in needle.probes)
    seconds, result = timed(lambda: needle.run(pair))
    run = {"evaluation": f"needle, lengths {needle.lengths} x {len(ncfg.depths)} depths x {ncfg.trials} trials",
           "seconds": round(seconds, 2), "prompt_tokens": 2 * prompt_tokens,
           "tokens_per_s": round(2 * prompt_tokens / seconds, 1), "metrics": result.flat()}
    report["runs"].append(run)
    rows.append(run)

    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_bench.json").write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, torch {report['torch']}, {report['layers']} layers at "
          f"{'toy' if args.smoke else 'Mistral-7B'} shapes, base and tuned each")
    print(f"{'evaluation':<62} {'seconds':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['evaluation']:<62} {r['seconds']:>8.2f} {r['tokens_per_s']:>10.1f}")


if __name__ == "__main__":
    main()
