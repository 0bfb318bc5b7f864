"""The kinds of PII the cleaning step (data/clean.py) can redact: the one list the config's pii_kinds
accepts and defaults to. A leaf module, so the config can import it without clean.py's ftfy and NumPy."""

PII_KINDS = ("email", "phone", "ip_address", "credit_card", "secret")
