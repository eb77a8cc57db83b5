"""End-to-end: the offline release bundle, installed and run where no registry is reachable.

Builds the bundle with the demo model (`bundle/make_bundle.py --with-demo`, reusing the cached
llama.cpp build), unpacks it, and inside a network namespace with only `lo` up runs its
`install.sh` (pip --no-index from the bundle's wheels), `mesh-llm doctor`, and a solo node on the
demo model by name (the bundled file install.sh put in ~/.models), then a chat and the console
page from inside the namespace. The node's cache dir is empty, so the llama.cpp it runs can only
be the bundled one. Needs root (`ip netns`); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from mesh_llm import __version__
from mesh_llm.backend.build import Binaries

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BUNDLE_TIMEOUT_S = 1200
INSTALL_TIMEOUT_S = 600
NODE_TIMEOUT_S = 240
STOP_TIMEOUT_S = 20
SYSTEM_PYTHON = "/usr/bin/python3"
PORT, CONSOLE_PORT = 9337, 3131  # a namespace of its own: the defaults are free

CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, urllib.request, urllib.error
    api, console, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
    def get(url):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.headers.get_content_type(), r.read()
        except urllib.error.HTTPError as e:
            return e.code, "", b""
        except OSError:
            return None, "", b""
    while True:
        status, _, body = get(console + "/api/status")
        models = json.loads(body).get("models", []) if status == 200 else []
        if any(m["host"] == "local" and m["state"] == "ready" for m in models):
            break
        if time.monotonic() > deadline:
            sys.exit("node not ready in time")
        time.sleep(0.2)
    req = urllib.request.Request(api + "/v1/chat/completions", json.dumps({
        "model": models[0]["name"], "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say hello."}]}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.loads(r.read())["choices"][0]["message"]["content"]
    page_status, page_type, page = get(console + "/")
    print(json.dumps({"model": models[0]["name"], "answer": answer, "page_status": page_status,
                      "page_type": page_type, "page_has_html": b"<html" in page.lower()}))
    """
)


@dataclass
class Namespace:
    """A network namespace with only loopback; commands run in it with a clean environment."""

    name: str
    env: dict[str, str]

    def argv(self, *command: str) -> list[str]:
        pairs = [f"{k}={v}" for k, v in self.env.items()]
        return ["ip", "netns", "exec", self.name, "env", "-i", *pairs, *command]

    def run(self, *command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*command), capture_output=True, text=True, timeout=timeout_s, check=False
        )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, llama_binaries: Binaries) -> Path:
    """The unpacked bundle (built with --with-demo)."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, str(REPO / "bundle" / "make_bundle.py"), "--with-demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=BUNDLE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    archive = Path(done.stdout.strip().splitlines()[-1])
    assert archive.name.startswith(f"mesh-llm-{__version__}-linux-")
    assert archive.name.endswith(".tar.gz")
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="tar")
    (top,) = unpacked.iterdir()
    return top


def test_bundle_has_wheels_binaries_model_and_a_manifest(
    bundle: Path, llama_binaries: Binaries
) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["version"] == __version__
    assert manifest["packages"]["mesh-llm"] == __version__
    assert {"aioquic", "aiohttp", "cryptography", "msgpack"} <= set(manifest["packages"])
    assert manifest["llama_cpp"]["build_id"] == llama_binaries.build_id
    assert manifest["llama_cpp"]["rpc_protocol"] == llama_binaries.rpc_protocol
    assert isinstance(manifest["mesh_protocol"], int)
    files = set(manifest["files"])
    for name in ("install.sh", "config.toml", "mesh-llm.service"):
        assert name in files
    for name in ("llama-server", "ggml-rpc-server", "build-info.json"):
        assert f"llama.cpp/bin/{name}" in files
    assert any(f.startswith("models/") and f.endswith(".gguf") for f in files)
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - files == {"manifest.json"}
    for program in ("llama-server", "ggml-rpc-server"):
        ldd = subprocess.run(
            ["ldd", str(bundle / "llama.cpp" / "bin" / program)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "not found" not in ldd.stdout


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("needs the ip command (Debian: apt-get install iproute2)")
    name = f"meshship{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        home = tmp_path / "home"
        home.mkdir()
        env = {
            "HOME": str(home),
            "PATH": f"{home}/.local/bin:/usr/local/bin:/usr/bin:/bin",
            "MESH_LLM_CACHE_DIR": str(tmp_path / "empty-cache"),
            "COLUMNS": "250",
            "LANG": "C.UTF-8",
        }
        yield Namespace(name, env)
    finally:
        _kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _kill_namespace_processes(name: str) -> None:
    """Whatever this test started in its namespace, by pid."""
    done = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False, timeout=30
    )
    for pid in done.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def test_offline_install_doctor_and_solo_node(bundle: Path, namespace: Namespace) -> None:
    home = Path(namespace.env["HOME"])
    # No route out: the namespace really is offline.
    probe = namespace.run(
        SYSTEM_PYTHON,
        "-c",
        "import socket; s = socket.socket(); s.settimeout(3); "
        "print(s.connect_ex(('151.101.0.223', 443)))",
        timeout_s=30,
    )
    assert probe.stdout.strip() not in ("0", ""), probe

    prefix = home / ".mesh-llm" / "venv"
    install = namespace.run(
        "bash",
        str(bundle / "install.sh"),
        "--python",
        SYSTEM_PYTHON,
        "--bin-dir",
        str(home / ".local" / "bin"),
        timeout_s=INSTALL_TIMEOUT_S,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    assert "files verified" in install.stderr
    assert f"mesh-llm {__version__}" in install.stdout
    assert (home / ".local" / "bin" / "mesh-llm").resolve() == (prefix / "bin" / "mesh-llm")
    (model,) = (home / ".models").glob("*.gguf")

    doctor = namespace.run("mesh-llm", "doctor", timeout_s=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    installed_bin = prefix / "share" / "mesh-llm" / "llama.cpp" / "bin"
    assert f"{installed_bin}/llama-server (bundle)" in doctor.stdout, doctor.stdout

    version = namespace.run("mesh-llm", "--version", timeout_s=60)
    assert "(bundle:" in version.stdout, version.stdout

    node_log = home / "node.log"
    with node_log.open("wb") as log:
        node = subprocess.Popen(
            # By name, found in ~/.models where install.sh put the bundled demo model.
            namespace.argv("mesh-llm", "--model", model.stem, "--log-format", "json"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        check = namespace.run(
            str(prefix / "bin" / "python"),
            "-c",
            CHECK_SCRIPT,
            f"http://127.0.0.1:{PORT}",
            f"http://127.0.0.1:{CONSOLE_PORT}",
            str(NODE_TIMEOUT_S),
            timeout_s=NODE_TIMEOUT_S + 180,
        )
        assert check.returncode == 0, check.stderr + node_log.read_text(errors="replace")
        result = json.loads(check.stdout)
        assert result["model"] == model.stem
        assert result["answer"].strip()
        assert (result["page_status"], result["page_type"]) == (200, "text/html")
        assert result["page_has_html"]
        servers = [
            p
            for p in psutil.Process(node.pid).children(recursive=True)
            if p.name() == "llama-server"
        ]
        assert [p.exe() for p in servers] == [str(installed_bin / "llama-server")]
        assert not (Path(namespace.env["MESH_LLM_CACHE_DIR"]) / "llama.cpp").exists()
    finally:
        _stop(node)


def _stop(node: subprocess.Popen[bytes]) -> None:
    children: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(node.pid).children(recursive=True)
    if node.poll() is None:
        node.send_signal(signal.SIGINT)
        try:
            node.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
