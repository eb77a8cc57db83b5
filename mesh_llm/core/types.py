"""Identifier types shared by the sans-I/O core, the wire codec and the shells.

Pure: imports nothing but `typing`.
"""

from __future__ import annotations

from typing import NewType

NodeId = NewType("NodeId", str)
"""Hex of a node's 32-byte Ed25519 public key (64 lowercase hex characters)."""

ModelName = NewType("ModelName", str)
"""A model's name: its GGUF file stem, e.g. `gemma-3-270m-q4_k_m`."""

SHORT_ID_LEN = 10


def short_id(node_id: NodeId) -> str:
    """The first 10 hex characters of a node id, for logs and tables."""
    return node_id[:SHORT_ID_LEN]
