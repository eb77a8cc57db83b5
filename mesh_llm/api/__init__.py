"""api layer of mesh-llm: the OpenAI-compatible HTTP API, routing proxy, requests from other
nodes, console (layers: docs/architecture.md)."""
