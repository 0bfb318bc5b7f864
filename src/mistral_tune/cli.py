"""The `mistral-tune` command: parse arguments, call one function, print the outcome."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import api
from .dtypes import DTYPE_ALIASES, DTYPE_NAMES
from .errors import EXIT_STOPPED, ConfigError, MistralTuneError, TrainingHalted
from .fsutil import check_target, replace_dir


def _cmd_train(args) -> None:
    cfg = api.load_config(args.config, args.overrides)
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        from .train.launch import launch

        return launch(args.gpus, ["train", args.config, *args.overrides] + ["--merge"] * args.merge
                      + ["--force"] * args.force)
    again = " ".join(["mistral-tune", "train", args.config, *args.overrides]
                     + ([] if cfg.resume == "auto" else ["resume=auto"]))
    try:
        result = api.train(cfg, merge=args.merge, force=args.force)
    except TrainingHalted as exc:
        raise TrainingHalted(f"{exc}. To continue from the last checkpoint once the cause is fixed: {again} "
                             "(bad_step_* keys may change there with --force)") from None
    if result.stopped_by:
        # Not a success (exit EXIT_STOPPED, every rank): the checkpoint is written and the run can go on from it.
        if _rank() == 0:  # train() has said where it stopped and which checkpoint it wrote
            print(f"to continue: {again}")
        return EXIT_STOPPED
    if _rank() != 0:  # rank 0 reports for the run
        return None
    print(f"trained {result.steps} steps; final train loss {result.final_train_loss:.4f}"
          + (f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
    if result.adapter_dir:
        print(f"adapter: {result.adapter_dir}")
    if result.model_dir:
        print(f"model:   {result.model_dir}")
    if result.best:
        b = result.best
        print(f"best:    {b['dir']} (step {b['step']}, {b['metric']} {b['value']:.4g})")
    if result.report:
        print(f"report:  {result.report}")
    return None


def _cmd_merge(args) -> None:
    out = api.merge(args.run_or_adapter, args.out, base_model=args.base_model, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"merged model ({DTYPE_ALIASES.get(args.dtype, args.dtype)}) written to {out}")


def _cmd_quickstart(args) -> None:
    from .quickstart import run_quickstart

    return EXIT_STOPPED if "stopped_by" in run_quickstart(Path(args.out), args.overrides, method=args.method) else None


def _cmd_export_adapter(args) -> None:
    from .export.adapter import VLLM_EXPERT_MODULES, export_adapter, vllm_serve_command

    adapter, cfg = export_adapter(Path(args.run_or_adapter), Path(args.out) if args.out else None, args.overwrite)
    # Mixtral's experts one pair per expert: vLLM's layout, which PEFT on transformers' stacked experts does not read
    readers = "vLLM's" if set(cfg["target_modules"]) & set(VLLM_EXPERT_MODULES) else "PEFT and vLLM's"
    print(f"adapter OK for {readers} LoRA loader: {adapter} (r={cfg['r']}, alpha={cfg['lora_alpha']})")
    print(f"serve it: {vllm_serve_command(adapter, cfg)}")


def _load(args):
    return api.load_model(args.model, args.base_model, dtype=args.dtype, device=args.device)


def _cmd_chat(args) -> None:
    from .serve.chat import chat_loop

    api.sampling(args.max_tokens, args.temperature, args.top_p, args.seed)  # checked before the model loads
    loaded = _load(args)
    sampling = api.sampling(args.max_tokens, args.temperature, args.top_p, args.seed, loaded)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()  # stream token by token

    chat_loop(loaded, sampling, system=args.system, write=write)


def _cmd_generate(args) -> None:
    answers = api.generate(args.model, args.prompts, out=args.out, overwrite=args.overwrite,
                           base_model=args.base_model, dtype=args.dtype, device=args.device,
                           max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           system=args.system, batch_size=args.batch_size,
                           progress=lambda done, total: print(f"{done}/{total}", file=sys.stderr))
    print(f"{len(answers)} completions written to {args.out}")


def _cmd_serve(args) -> None:
    from .serve.server import ServerConfig, listen, make_server

    api_key = args.api_key or os.environ.get("MISTRAL_TUNE_API_KEY") or None
    if min(args.max_batch, args.max_input_tokens, args.max_tokens_limit, args.max_body_bytes) < 1:
        raise ConfigError("--max-batch, --max-input-tokens, --max-tokens-limit and --max-body-bytes must be >= 1")
    if args.queue_depth < 0 or not args.queue_timeout > 0:
        raise ConfigError("--queue-depth must be >= 0 and --queue-timeout > 0")
    cfg = ServerConfig(host=args.host, port=args.port, api_key=api_key, max_body_bytes=args.max_body_bytes,
                       max_input_tokens=args.max_input_tokens, max_tokens_limit=args.max_tokens_limit,
                       max_batch=args.max_batch, queue_depth=args.queue_depth, queue_timeout_s=args.queue_timeout)
    request_log = None
    if args.log_requests:
        from .serve.request_log import RequestLog

        if args.log_max_bytes < 1024 or args.log_keep < 1:
            raise ConfigError("--log-max-bytes must be >= 1024 and --log-keep >= 1")
        request_log = RequestLog(Path(args.log_requests), args.log_max_bytes, args.log_keep)
    if args.engine == "llama.cpp" and request_log is not None:
        raise ConfigError("--log-requests works with --engine torch only")
    if args.engine == "llama.cpp" and args.adapter:
        raise ConfigError("--adapter works with --engine torch only")
    sock = listen(args.host, args.port)  # before the model loads: a port in use fails at once
    try:
        if args.engine == "llama.cpp":
            from .serve.llama_server import find_gguf, make_llama_server

            gguf = find_gguf(Path(args.model))
            name = args.name or gguf.stem
            server = make_llama_server(gguf, cfg, name, sock=sock)
        else:
            loaded = _load_served(args)
            name = loaded.name
            server = make_server(loaded, cfg, request_log, sock)
    except BaseException:
        sock.close()
        raise
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "::1", "localhost") and not api_key:
        print(f"warning: listening on {host} without an API key; anyone who can reach it can use it", file=sys.stderr)
    served = name if args.engine != "torch" or not loaded.adapters else f"{name} and {', '.join(loaded.adapters)}"
    print(f"serving {served} at http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _load_served(args):
    """The model serve decodes: one tuned model, or a base with several adapters (--adapter NAME=PATH)."""
    if not args.adapter:
        loaded = _load(args)
        loaded.name = args.name or loaded.name
        return loaded
    from .models.tuned import load_with_adapters

    if args.base_model:
        raise ConfigError("--base-model names an adapter's base; with --adapter, MODEL is the base itself")
    base = args.name or Path(args.model).expanduser().resolve().name  # as load_tuned names it
    adapters, names = [], [base]
    for item in args.adapter:
        name, eq, path = item.partition("=")
        name = name.strip()
        if not eq or not name or not path:
            raise ConfigError(f"--adapter {item!r}: expected NAME=PATH (an adapter or run directory)")
        if name in names:
            raise ConfigError(f"--adapter {item!r}: the name {name!r} is taken (the base is {base!r}); every adapter "
                              "needs a name of its own, and --name renames the base")
        names.append(name)
        adapters.append((name, Path(path)))
    loaded = load_with_adapters(args.model, adapters, dtype=args.dtype, device=args.device)
    loaded.name = base
    return loaded


def _add_model_args(p: argparse.ArgumentParser, sampling: bool) -> None:
    from .serve.defaults import RULE

    p.add_argument("model", help="a merged model, a run's output_dir, or an adapter directory")
    p.add_argument("--base-model", help="base model for an adapter (default: adapter_config.json's)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPE_NAMES))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    if not sampling:  # the server takes sampling settings per request
        return
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per answer")
    p.add_argument("--temperature", type=float, help=f"0 = greedy ({RULE})")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: as --temperature)")
    p.add_argument("--seed", type=int, help="sampling seed (reproducible answers)")


def _add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier output of this kind written by mistral-tune "
                        "(anything else is never replaced)")


def _cmd_export_gguf(args) -> None:
    from .export.gguf import export_gguf

    src = Path(args.model)
    out = Path(args.out) if args.out else src.resolve().parent / f"{src.resolve().name}-{args.quant}.gguf"
    out = export_gguf(src, out, args.quant, base_model=args.base_model,
                      warn=lambda msg: print(msg, file=sys.stderr), overwrite=args.overwrite)
    print(f"GGUF ({args.quant}) written to {out}")


def _cmd_export_awq(args) -> None:
    from .export.awq import export_awq

    src = Path(args.model)
    out = Path(args.out) if args.out else src.resolve().parent / f"{src.resolve().name}-awq"
    out = export_awq(src, out, Path(args.calibration_config) if args.calibration_config else None,
                     num_samples=args.num_samples, max_seq_len=args.max_seq_len, scheme=args.scheme,
                     base_model=args.base_model, overwrite=args.overwrite)
    print(f"AWQ model (compressed-tensors, {args.scheme}) written to {out}")


def _cmd_eval(args) -> None:
    if args.drift:
        from .evaluate.run import run_drift

        if args.overrides:
            raise ConfigError("--drift takes no eval.* overrides")
        run_drift(Path(args.model), Path(args.drift), config=Path(args.config) if args.config else None,
                  threshold=args.drift_threshold, out=Path(args.out) if args.out else None, base_model=args.base_model,
                  dtype=args.dtype, device=args.device)
        return
    api.evaluate(args.model, args.config, args.overrides, out=args.out, base_model=args.base_model,
                 dtype=args.dtype, device=args.device)


def _cmd_validate(args) -> None:
    cfg = api.load_config(args.config, args.overrides)  # before torch loads: a config error shows at once
    from .train.trackers import check_trackers

    trackers = check_trackers(cfg)  # before torch, the model and the data load
    from .models.families import describe
    from .train.loop import prepare

    _, model_dir, tokenizer, model, data = prepare(cfg, check_output=False)
    print(f"config OK; model {model_dir}: {describe(model.config)}; tokenizer {tokenizer.source_file.name}")
    for line in trackers:
        print(line)
    for line in cfg.preset_lines():
        print(line)
    for line in data.report.lines():
        print(line)
    from .evaluate.run import build_evaluations

    evals = build_evaluations(cfg.eval, tokenizer, model.config, cfg.sequence_len)
    if evals:
        print(f"eval: {', '.join(ev.name for ev in evals)} (data read and tokenized)")


def _cmd_plan(args) -> None:
    if args.memory_gib is not None and args.memory_gib <= 0:
        raise ConfigError(f"--memory-gib {args.memory_gib}: must be above 0")
    cfg = api.load_config(args.config, args.overrides)
    from .plan import make_plan
    from .train.gpus import GPUS, detect_gpu, find_gpu
    from .train.loop import read_inputs, with_family_targets

    if args.gpu:
        gpu, seen = find_gpu(args.gpu), "named"
    else:
        gpu, name = detect_gpu()
        seen = f"detected ({name})" if gpu else ""
        if gpu is None and args.memory_gib is None:
            raise ConfigError((f"GPU {name!r} is not in the table" if name else "no CUDA GPU here")
                              + f"; name one with --gpu ({', '.join(g.name for g in GPUS)}) or give --memory-gib")
    cfg = with_family_targets(cfg)  # as train resolves them
    model_dir, model_cfg, _, data = read_inputs(cfg, weights=False)  # a hub model's weights stay where they are
    print(f"plan for {args.config}: model {model_dir}" + (f"; GPU {seen}" if seen else ""))
    for line in data.report.warnings:
        print(f"warning: {line}")
    for line in make_plan(cfg, model_cfg, data, gpu, args.memory_gib, args.gpus).lines:
        print(line)


def _data_setup(args):
    """Config and tokenizer for the data commands: no model weights are loaded."""
    cfg = api.load_config(args.config, args.overrides)
    from .chat import load_tokenizer

    model_dir = None
    if cfg.tokenizer is None:
        if cfg.base_model is None:
            raise ConfigError(f"{args.config}: set tokenizer (v1, v3, v7, tekken or a tokenizer file), or base_model "
                              "to use its tokenizer")
        from .models.load import resolve_model_dir

        model_dir = resolve_model_dir(cfg.base_model)
    return cfg, load_tokenizer(cfg.tokenizer, model_dir, cfg.new_special_tokens)


def _cmd_data_inspect(args) -> None:
    cfg, tokenizer = _data_setup(args)
    from .data.build import build_dataset
    from .data.inspect import inspect_lines

    data = build_dataset(cfg, tokenizer)
    color = sys.stdout.isatty() if args.color == "auto" else args.color == "always"
    def lines(tmp: Path | None, out: Path | None = None) -> list[str]:
        return list(inspect_lines(data, tokenizer, cfg.sequence_len, args.samples, tmp, color, seed=cfg.seed,
                                  max_chars=args.max_chars or None, at=args.at, shown_dir=out))

    if args.out == "":
        printed = lines(None)
    else:  # its own folder from an earlier inspection is replaced; nothing else is
        printed = []
        out = check_target(args.out, "inspect", overwrite=True, sources=[d.path for d in cfg.datasets])
        replace_dir(out, lambda tmp: printed.extend(lines(tmp, out)), "inspect", sources=[d.path for d in cfg.datasets])
    for line in printed:
        print(line)


def _cmd_data_validate(args) -> None:
    cfg, tokenizer = _data_setup(args)
    from .data.build import build_dataset
    from .errors import DataError

    # Skip bad records here so that every problem is listed, not only the first few.
    data = build_dataset(cfg.model_copy(update={"on_bad_record": "skip"}), tokenizer)
    for line in data.report.lines():
        print(line)
    r = data.report
    if r.rejected:
        for entry in data.entries:
            for rej in entry.rejects(limit=args.max_errors, kind="bad"):
                print(f"  {rej['origin']}: {rej['reason']}")
        raise DataError(f"{r.rejected} bad record(s); the full list with reasons is in "
                        + ", ".join(r.rejects_files))
    print("data OK")


def _cmd_report(args) -> None:
    from .train.report import write_run_report

    print(f"run report: {write_run_report(args.run_dir)}")


def _cmd_convert_axolotl(args) -> None:
    from .config import convert_axolotl_file

    result = convert_axolotl_file(args.config, args.out, overwrite=args.overwrite)
    print(f"mistral-tune config written to {args.out} (it passes `mistral-tune validate`'s config checks); "
          "Axolotl keys without a direct counterpart:")
    for note in result.notes:
        print(f"  {note}")


def _cmd_init_model(args) -> None:
    api.init_model(args.out, tokenizer=args.tokenizer, seed=args.seed, overwrite=args.overwrite)
    print(f"random-init tiny Mistral model written to {args.out}")


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-tune",
        description="Fine-tune Mistral-family models with LoRA or full fine-tuning.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # In the order `--help` lists them.
    _add_run_commands(sub)
    _add_output_commands(sub)
    _add_model_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_run_commands(sub) -> None:
    """train, and the two that check a run before it: validate, plan."""
    p = sub.add_parser("train", help="fine-tune as a YAML config says")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.add_argument("--merge", action="store_true", help="also write the merged model (output_dir/merged)")
    p.add_argument("--force", action="store_true",
                   help="resume even though safe keys (logging, eval/save cadence, max_steps, ...) changed")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train on N GPUs of this machine, one process each (torchrun; CPU processes without a GPU)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate", help="check a config, its model, tokenizer and data without training")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="predict peak GPU memory, tokens/s and wall time; propose settings that fit "
                       "(reads config.json, tokenizer and data; no weights)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--gpu", help="plan for this GPU, e.g. H100 (an unknown name lists the known ones); default: the "
                   "one detected")
    p.add_argument("--memory-gib", type=float, help="memory budget in GiB per GPU (default: the GPU's)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="plan for N processes, one a GPU, as train --gpus N runs them (distributed: ddp or fsdp)")
    p.set_defaults(func=_cmd_plan)


def _add_output_commands(sub) -> None:
    """merge, and export: adapter (vLLM), gguf, awq."""
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model (HF format)")
    p.add_argument("run_or_adapter", help="a run's output_dir or an adapter directory")
    p.add_argument("--out", help="output directory (default: next to the adapter, merged/)")
    p.add_argument("--base-model", help="override the base model recorded in adapter_config.json")
    p.add_argument("--dtype", choices=[*sorted(DTYPE_ALIASES), *sorted(DTYPE_NAMES)], default="bf16",
                   help="weight dtype of the merged model (the merge itself is computed in float32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_merge)

    export = sub.add_parser("export", help="adapter for vLLM, GGUF for llama.cpp, AWQ").add_subparsers(
        dest="format", required=True, metavar="FORMAT")
    p = export.add_parser("adapter", help="check a LoRA adapter against vLLM's loader (and copy it)")
    p.add_argument("run_or_adapter", help="a run's output_dir or an adapter directory")
    p.add_argument("--out", help="copy the checked adapter here (LoRA on Mixtral's experts: written one pair per "
                   "expert, the layout vLLM reads)")
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_export_adapter)

    p = export.add_parser("gguf", help="a GGUF file for llama.cpp / Ollama / LM Studio")
    p.add_argument("model", help="a merged model, a run's output_dir, or an adapter directory")
    p.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
                   help="k-quants need llama.cpp (llama-quantize on PATH, or llama-cpp-python)")
    p.add_argument("--out", help="output file (default: beside the model, NAME-QUANT.gguf)")
    p.add_argument("--base-model", help="base model for an adapter (default: adapter_config.json's)")
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_export_gguf)

    p = export.add_parser("awq", help="4-bit AWQ via llm-compressor (pip install 'mistral-tune[awq]'; GPU)")
    p.add_argument("model", help="a run's output_dir, its merged model, or an adapter directory")
    p.add_argument("--out", help="output directory (default: beside the model, NAME-awq)")
    p.add_argument("--calibration-config", help="a config.yaml whose datasets calibrate (default: the run's)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--scheme", default="W4A16_ASYM", choices=["W4A16_ASYM", "W4A16"])
    p.add_argument("--base-model", help="base model for an adapter (default: adapter_config.json's)")
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_export_awq)
    _add_push_command(sub)


def _add_push_command(sub) -> None:
    p = sub.add_parser("push", help="upload a run's merged model or adapter, with its model card, to the Hugging Face "
                       "Hub (needs a token: HF_TOKEN or `hf auth login`)")
    p.add_argument("run_or_model", help="a run's output_dir (its merged/ or model/, else adapter/), or an adapter or "
                   "model directory")
    p.add_argument("--repo", required=True, help="the Hub repository, OWNER/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--adapter", action="store_true", help="push the run's adapter even where it has a merged model")
    p.set_defaults(func=_cmd_push)


def _cmd_push(args) -> None:
    url = api.push(args.run_or_model, args.repo, private=args.private, adapter=args.adapter)
    print(f"pushed to {url}")


def _add_model_commands(sub) -> None:
    """What runs a trained model: chat, generate, serve, eval."""
    from .serve.defaults import RULE

    p = sub.add_parser("chat", help="chat with a model in the terminal (streamed, /reset, /system)")
    _add_model_args(p, sampling=True)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("generate", help="answer a file of prompts in batches; write JSONL")
    _add_model_args(p, sampling=True)
    p.add_argument("prompts", help='JSONL ({"messages": [...]} or {"prompt": "..."} a line) or text (a prompt a line)')
    p.add_argument("--out", required=True, help="output JSONL: the input record plus completion and token counts")
    p.add_argument("--batch-size", type=int, default=8)
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                       epilog=f"sampling per request; fields a request leaves out: {RULE}")
    _add_model_args(p, sampling=False)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MISTRAL_TUNE_API_KEY)")
    p.add_argument("--name", help="model name clients use (default: the directory name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve this LoRA adapter (or run directory) of MODEL, unmerged, as model NAME; repeat for "
                        "several: requests for any of them and for MODEL itself are decoded together")
    p.add_argument("--engine", default="torch", choices=["torch", "llama.cpp"],
                   help="llama.cpp: serve a GGUF export through llama-cpp-python's server (its own limits)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (1: one at a time)")
    p.add_argument("--queue-depth", type=int, default=64, help="requests that wait for a place; more get 429")
    p.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a request may wait (then 503)")
    p.add_argument("--max-input-tokens", type=int, default=8192)
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--log-requests", metavar="DIR",
                   help="write each prompt (PII redacted, no completions) to DIR/requests.jsonl, for eval --drift")
    p.add_argument("--log-max-bytes", type=int, default=10_000_000, help="size of one log file before it rotates")
    p.add_argument("--log-keep", type=int, default=5, help="log files kept (the oldest go first)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("eval", help="evaluate a run, adapter or model against its base: task metrics, forgetting, "
                       "long context; writes eval_report.json and report.html")
    _add_model_args(p, sampling=False)
    p.add_argument("overrides", nargs="*", metavar="eval.key=value", help="override keys of the eval: section")
    p.add_argument("--config", help="a YAML file with an eval: section (default: the run's config.yaml)")
    p.add_argument("--out", help="report folder (default: the run's eval/ or drift/, else ./eval-NAME)")
    p.add_argument("--drift", metavar="DIR", help="instead: compare the prompts logged by serve --log-requests DIR "
                   "with the training data; exits with 3 when the drift score is above --drift-threshold")
    p.add_argument("--drift-threshold", type=float, default=0.3, help="drift score (0-1) that fails (default 0.3)")
    p.set_defaults(func=_cmd_eval)


def _add_tool_commands(sub) -> None:
    """quickstart, data inspect / validate, report, convert axolotl, init-model."""
    from .config import PREFERENCE_METHODS
    p = sub.add_parser("quickstart", help="fine-tune a tiny model on bundled data (CPU, no network)")
    p.add_argument("--out", default="quickstart-output", help="working directory")
    p.add_argument("--method", default="sft", choices=["sft", *PREFERENCE_METHODS],
                   help="sft (default), or a preference method: a short SFT phase, then the method from its "
                   "adapter on pairs; reports held-out preference accuracy before and after")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_quickstart)

    data = sub.add_parser("data", help="look at and check the training data (no model is loaded)")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = dsub.add_parser("inspect", help="counts, length histogram and rendered samples (trained vs masked)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("-n", "--samples", type=int, default=3, help="how many samples to render (default 3)")
    p.add_argument("--out", default="data-inspect",
                   help="folder for lengths.png and samples.html (default ./data-inspect; '' for none)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--max-chars", type=int, default=1500,
                   help="show at most this many characters of a sample in the terminal (0: all; the HTML has all)")
    p.add_argument("--at", action="append", default=[], metavar="FILE:LINE",
                   help="also render the sample(s) made from this record (origin as the report prints it)")
    p.set_defaults(func=_cmd_data_inspect)
    p = dsub.add_parser("validate", help="read, check and tokenize the data; exit non-zero on any bad record")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--max-errors", type=int, default=20, help="bad records listed per dataset (default 20)")
    p.set_defaults(func=_cmd_data_validate)

    p = sub.add_parser("report", help="(re)build a run's report.html from its metrics.jsonl, config and data report")
    p.add_argument("run_dir", help="a training run's output_dir (a stopped or killed one too)")
    p.set_defaults(func=_cmd_report)

    convert = sub.add_parser("convert", help="translate another tool's config into a mistral-tune config")
    csub = convert.add_subparsers(dest="convert_command", required=True, metavar="FORMAT")
    p = csub.add_parser("axolotl", help="an Axolotl YAML config; names each key it leaves out and why")
    p.add_argument("config", help="the Axolotl config (YAML)")
    p.add_argument("--out", required=True, help="the mistral-tune config to write (YAML)")
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_convert_axolotl)

    p = sub.add_parser("init-model", help="write a tiny random-init Mistral model (for tests and trials)")
    p.add_argument("out")
    p.add_argument("--tokenizer", default="v3", help="v1 | v3 | v7 | tekken")
    p.add_argument("--seed", type=int, default=0)
    _add_overwrite_arg(p)
    p.set_defaults(func=_cmd_init_model)


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # a file name with undecodable bytes prints escaped, not as a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    # parse_args drops key=value overrides that follow an option (`train c.yaml --merge lr=1`):
    # argparse fills a nargs="*" positional once, before the option. Take them back here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        code = args.func(args)  # None, or a command's own exit code (train: EXIT_STOPPED)
    except MistralTuneError as exc:
        if args.debug or os.environ.get("MISTRAL_TUNE_DEBUG"):
            raise
        where = f" (rank {_rank()})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"error{where}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
