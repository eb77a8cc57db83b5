"""The two real models of the end-to-end tier, named in one place.

`SMOLLM2` (the default demo, an instruct model with a chat template: it answers and stops) is
the model of single-model tests; `GEMMA` (a base model: it rambles until `max_tokens`) is the
second, different model of multi-model tests. Both files are in the `demo_models_dir`
fixture's directory (tests/conftest.py). `catalog` is what `--model` takes and an alias in the
API; `name` is the served model name (the file stem) that `/v1/models` lists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RealModel:
    catalog: str
    name: str

    @property
    def file(self) -> str:
        return f"{self.name}.gguf"


SMOLLM2 = RealModel("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1")
GEMMA = RealModel("gemma-3-270m", "gemma-3-270m-q4_k_m")
