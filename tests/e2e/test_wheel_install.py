"""End-to-end: the wheel from `python -m build`, installed non-editable into a fresh venv.

The node runs from that venv's `mesh-llm` script (not from this checkout), finds the cached
llama.cpp build through its normal lookup, serves the real demo model, answers a chat and serves
the console page from the package data inside the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_llm import __version__
from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess
from tests.e2e.models import SMOLLM2

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 900


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_LLM_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the freshly built wheel (dependencies from the package index)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        # sdist, then the wheel from it: nothing stale from the checkout's build/ dir gets in.
        [sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        timeout=PIP_TIMEOUT_S,
    )
    (wheel,) = (work / "dist").glob("mesh_llm-*-py3-none-any.whl")
    assert wheel.name == f"mesh_llm-{__version__}-py3-none-any.whl"
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=PIP_TIMEOUT_S,
        env=_clean_env(),
        cwd=work,
    )
    return venv


def test_installed_package_lives_in_the_venv(installed_venv: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.resources, json, mesh_llm; "
        "page = importlib.resources.files('mesh_llm') / 'console' / 'index.html'; "
        "print(json.dumps([mesh_llm.__file__, page.is_file()]))"
    )
    done = subprocess.run(
        [str(installed_venv / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=_clean_env(),
    )
    location, has_page = json.loads(done.stdout)
    assert Path(location).is_relative_to(installed_venv), location
    assert has_page


@pytest.fixture(scope="module")
def wheel_node(
    installed_venv: Path,
    tmp_path_factory: pytest.TempPathFactory,
    llama_binaries: Binaries,
    demo_models_dir: Path,
) -> Iterator[MeshProcess]:
    model = demo_models_dir / SMOLLM2.file
    node = MeshProcess(
        tmp_path_factory.mktemp("wheel-node"),
        ["--model", str(model), "--log-format", "json"],
        command=[str(installed_venv / "bin" / "mesh-llm")],
        env={k: "" for k in ("PYTHONPATH",)},
    )
    node.start()
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_wheel_node_answers_a_chat_and_serves_the_console(
    wheel_node: MeshProcess, llama_binaries: Binaries
) -> None:
    status = wheel_node.status()
    model = status["models"][0]["name"]
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 16,
        }
    ).encode()
    request = urllib.request.Request(
        wheel_node.base_url + "/v1/chat/completions",
        body,
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    assert answer["choices"][0]["message"]["content"].strip()
    url = f"http://127.0.0.1:{wheel_node.console_port}/"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "text/html"
        assert b"<html" in response.read().lower()
    # The llama-server it runs is the cached build, found by the installed package's lookup.
    assert wheel_node.llama_argv()[0] == str(llama_binaries.llama_server)
