"""models layer of mesh-llm: catalog, resolving and downloading GGUF files, GGUF metadata
(layers: docs/architecture.md)."""
