"""wire layer of mesh-llm: the messages between nodes and their msgpack codec; no I/O
(layers: docs/architecture.md)."""
