"""The weight dtypes a model is loaded, merged or written in, by name: the one table (no torch import,
so the command line can name them; models/load.py maps them to torch dtypes)."""

#: torch's names, as config.json's torch_dtype and the commands' --dtype spell them.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Short names the commands accept for them.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
