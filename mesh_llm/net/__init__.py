"""net layer of mesh-llm: QUIC links, admission, the fast lane, RPC and API transport between
nodes (layers: docs/architecture.md)."""
