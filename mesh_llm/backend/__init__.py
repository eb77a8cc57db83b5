"""backend layer of mesh-llm: llama.cpp binaries, hardware, supervised llama-server and
rpc-server processes (layers: docs/architecture.md)."""
