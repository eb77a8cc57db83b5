"""mesh-llm: pool the GPUs (or CPUs) of several machines into one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
