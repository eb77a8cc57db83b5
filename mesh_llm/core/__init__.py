"""core layer of mesh-llm: sans-I/O gossip, membership, planning and routing; no I/O, no clock
(layers: docs/architecture.md)."""
