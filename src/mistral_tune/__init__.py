"""mistral-tune: fine-tune Mistral-family models with LoRA or full fine-tuning."""

__version__ = "0.1.0"
