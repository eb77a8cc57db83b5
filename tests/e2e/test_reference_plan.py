"""The manual test plan of mesh-llm, scenario by scenario, with real processes on one machine.

One test per scenario (1–15): real `mesh-llm` nodes on loopback, real llama-server and
rpc-server, the real demo model on CPU. Each test asserts what a person following the plan would
look at (ports, roles, peer lists, llama-server's command line, log lines, answers), and our
stricter goals where we promise more. Scenario 10 (the console's model picker) needs a browser:
`tests/e2e/test_console*.py` covers it, so it has no test here.

The models used are named once, below: `FIRST` is gemma-3-270m and `SECOND` SmolLM2-135M, the
two different real models of tests/e2e/models.py; a joiner's spare model (wanted by nobody) is
the gemma file linked under another name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
from openai import OpenAI

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, Nodes, http_status, wait_until
from tests.e2e.models import GEMMA, SMOLLM2

pytestmark = pytest.mark.e2e

# -- the models of these scenarios (one place) -------------------------------------------------
DEMO_FILE = GEMMA.file  # in the `demo_models_dir` fixture
FIRST = GEMMA.catalog  # the catalog name given to --model
FIRST_NAME = GEMMA.name  # its model name (the GGUF stem), as the API lists it
# The second model by its file stem: a node that lacks the file only wants it (a catalog name
# would make it fetch the model itself).
SECOND = SMOLLM2.name
SECOND_NAME = SECOND
UNWANTED = "gemma-spare"  # on a joiner's disk, wanted by nobody: the gemma file linked
DISK = {FIRST: GEMMA.file, SECOND: SMOLLM2.file, UNWANTED: GEMMA.file}
"""The file of the `demo_models_dir` fixture behind each model a models dir may hold."""

DEFAULT_API_PORT = 9337
DEFAULT_CONSOLE_PORT = 3131
JOIN_TIMEOUT_S = 20.0
SPLIT_TIMEOUT_S = 150.0
READY_TIMEOUT_S = 240.0
ROUTE_TIMEOUT_S = 30.0
METRIC_TIMEOUT_S = 10.0
GOSSIP_WINDOW_S = 8.0  # several gossip rounds (2 s) and re-plans with nothing to change
STARTED = "llama-server started"


def own_models_dir(nodes: Nodes, name: str, *models: str) -> Path:
    """A models dir of its own holding `models` (keys of `DISK`), hard links into the demo
    dir: FIRST and SECOND under their own file names, UNWANTED under its name."""
    folder = nodes.root / f"{name}-models"
    folder.mkdir(parents=True, exist_ok=True)
    for model in models:
        source = DISK[model]
        target = folder / (source if model != UNWANTED else f"{UNWANTED}.gguf")
        if not target.exists():
            os.link(nodes.models_dir / source, target)
    return folder


@pytest.fixture
def nodes(tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path) -> Iterator[Nodes]:
    group = Nodes(tmp_path, llama_binaries.llama_server.parent, demo_models_dir, seed_model=FIRST)
    try:
        yield group
    finally:
        group.close()


# -- small observers -------------------------------------------------------------------------


def token_of(node: MeshProcess) -> str:
    wait_until(lambda: bool(node.status().get("token")), 30, f"token of {node.home.name}")
    token: str = node.status()["token"]
    return token


def models_of(node: MeshProcess) -> dict[str, dict[str, Any]]:
    """/v1/models by model id and by every alias ({} while the API does not answer)."""
    try:
        with urllib.request.urlopen(node.base_url + "/v1/models", timeout=5) as response:
            data = json.loads(response.read())["data"]
    except (OSError, ValueError):
        return {}
    return {name: m for m in data for name in (m["id"], *m["meta"]["aliases"])}


def state_of(node: MeshProcess, model: str) -> str:
    state: str = models_of(node).get(model, {}).get("meta", {}).get("state", "absent")
    return state


def in_state(node: MeshProcess, state: str, *models: str) -> bool:
    return all(state_of(node, model) == state for model in models)


def chat(node: MeshProcess, model: str, *, stream: bool = False) -> str:
    """One short chat through `node`'s API with the official client; the answer's text."""
    with OpenAI(base_url=node.base_url + "/v1", api_key="unused", max_retries=0) as client:
        messages: Any = [{"role": "user", "content": "Say hello."}]
        if not stream:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
            assert reply.usage is not None and reply.usage.completion_tokens > 0, reply
            return reply.choices[0].message.content or ""
        pieces = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model=model, messages=messages, max_tokens=12, stream=True
            )
            if chunk.choices
        ]
        assert len(pieces) >= 2, pieces
        return "".join(pieces)


def post_chat(node: MeshProcess, model: str, timeout_s: float = 60) -> tuple[int, Any, Any]:
    """A raw chat request: (status, JSON body, headers), errors included."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request = urllib.request.Request(
        node.base_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def log_events(node: MeshProcess) -> list[dict[str, Any]]:
    """The node's JSON log lines (other output, e.g. the token banner, skipped)."""
    events = []
    for line in node.log_text().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and "msg" in entry:
                events.append(entry)
    return events


def peer_requests_served(node: MeshProcess) -> float:
    """`mesh_llm_peer_requests_total` with status 200: requests this host answered for others."""
    with urllib.request.urlopen(node.base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mesh_llm_peer_requests_total{") and 'status="200"' in line
    )


def served_at_least(node: MeshProcess, count: float) -> float:
    """`peer_requests_served(node)` once it reaches `count`: the host counts a request when its
    answer has ended, which can be a moment after the requester has read the last token."""
    wait_until(lambda: peer_requests_served(node) >= count, METRIC_TIMEOUT_S, "the peer count")
    return peer_requests_served(node)


def argv_value(argv: list[str], flag: str) -> str:
    assert flag in argv, (flag, argv)
    return argv[argv.index(flag) + 1]


def expected_split(vram: list[int]) -> list[float]:
    """Ratios proportional to VRAM, two decimals, the largest share absorbing the rounding."""
    total = sum(vram)
    ratios = [round(v / total, 2) for v in vram]
    largest = vram.index(max(vram))
    ratios[largest] = round(1.0 - sum(r for i, r in enumerate(ratios) if i != largest), 2)
    return ratios


def serves_solo(node: MeshProcess) -> bool:
    argv = node.llama_argv()
    local = any(
        m["host"] == "local" and m["state"] == "ready" for m in node.status().get("models", [])
    )
    return bool(argv) and "--rpc" not in argv and local


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def sees(node: MeshProcess, *others: MeshProcess) -> bool:
    return {o.node_id() for o in others} <= node.peer_ids()


# -- single model ------------------------------------------------------------------------------


def test_01_solo_on_the_default_ports(nodes: Nodes) -> None:
    """Solo: API on :9337 and console on :3131 with no flag; host, no peers; no RPC entry."""
    busy = [p for p in (DEFAULT_API_PORT, DEFAULT_CONSOLE_PORT) if port_in_use(p)]
    if busy:
        pytest.skip(f"default port(s) {busy} in use by another process on this machine")
    node = nodes.start(
        "solo",
        "--model",
        FIRST,
        pass_ports=False,
        port=DEFAULT_API_PORT,
        console_port=DEFAULT_CONSOLE_PORT,
    )
    try:
        node.wait_ready()
    except AssertionError:
        if "cannot listen on" in node.log_text():  # taken between the check and the start
            pytest.skip(f"a default port was taken meanwhile:\n{node.log_text()[-400:]}")
        raise
    assert node.proc is not None
    listening = {
        c.laddr.port
        for c in psutil.Process(node.proc.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert {DEFAULT_API_PORT, DEFAULT_CONSOLE_PORT} <= listening, listening
    status = node.status()
    assert status["is_host"] is True, status
    assert status["peers"] == [] and status["clients"] == 0
    assert status["node"]["role"] == "serving"
    # Solo needs no RPC at all here: llama-server runs the whole model itself.
    argv = node.llama_argv()
    assert "--rpc" not in argv and "--tensor-split" not in argv, argv
    assert chat(node, FIRST_NAME).strip()


def test_02_two_nodes_model_fits_both_serve_solo(nodes: Nodes) -> None:
    """Both run solo (each its own host, no split); the API answers from both nodes."""
    seed, token = nodes.seed()
    other = nodes.start("other", "--model", FIRST, "--join", token)
    seed.wait_ready()
    other.wait_ready()
    wait_until(lambda: sees(seed, other) and sees(other, seed), JOIN_TIMEOUT_S, "joined")
    for node in (seed, other):
        assert "--rpc" not in node.llama_argv()
        assert node.status()["is_host"] is True
        assert chat(node, FIRST_NAME).strip(), node.home.name
    wait_until(
        lambda: models_of(seed).get(FIRST_NAME, {}).get("meta", {}).get("nodes") == 2,
        ROUTE_TIMEOUT_S,
        "two replicas in the seed's /v1/models",
    )


def _forced_split(nodes: Nodes, *host_args: str) -> tuple[MeshProcess, MeshProcess]:
    seed, token = nodes.seed("--split", *host_args)
    worker = nodes.start("worker", "--model", FIRST, "--join", token, "--max-vram", "1")
    wait_until(lambda: "--rpc" in seed.llama_argv(), SPLIT_TIMEOUT_S, "a split llama-server")
    seed.wait_ready(timeout_s=READY_TIMEOUT_S)
    return seed, worker


def _assert_split_matches_gossip(seed: MeshProcess, worker: MeshProcess) -> list[str]:
    """--tensor-split equals what the gossiped VRAM implies (workers first, then the host's own
    rpc-server, last); returns the --rpc entries."""
    argv = seed.llama_argv()
    rpc = argv_value(argv, "--rpc").split(",")
    assert len(rpc) == 2, rpc  # the worker's tunnel, then the host's own rpc-server
    status = seed.status()
    worker_vram = {p["node_id"]: p["record"]["vram_bytes"] for p in status["peers"]}
    vram = [worker_vram[worker.node_id()], status["node"]["vram_bytes"]]
    split = argv_value(argv, "--tensor-split")
    assert split == ",".join(f"{r:.2f}" for r in expected_split(vram)), (split, vram)
    own = [p for p in seed.descendants() if p.name() in ("rpc-server", "ggml-rpc-server")]
    assert len(own) == 1, own  # the host's own share runs in its local rpc-server
    own_port = argv_value(own[0].cmdline(), "-p")
    assert rpc[-1] == f"127.0.0.1:{own_port}", (rpc, own[0].cmdline())
    return rpc


def test_03_forced_split_with_a_draft_model(nodes: Nodes, demo_models_dir: Path) -> None:
    """--split: 2 RPC entries, tensor split proportional to VRAM, the draft model with -md."""
    draft = demo_models_dir / DEMO_FILE  # the model as its own draft: a real speculative run
    seed, worker = _forced_split(nodes, "--draft", str(draft))
    _assert_split_matches_gossip(seed, worker)
    argv = seed.llama_argv()
    assert argv_value(argv, "-md") == str(draft), argv
    assert [p.name() for p in worker.descendants()] == ["ggml-rpc-server"]
    roles = [p["record"]["serving"].get(FIRST_NAME, {}) for p in seed.status()["peers"]]
    assert [r.get("role") for r in roles] == ["worker"], roles
    assert chat(seed, FIRST_NAME).strip()
    assert seed.status()["is_host"] is True and worker.status()["is_host"] is False


def test_04_model_too_big_waits_then_splits_by_itself(nodes: Nodes) -> None:
    """Not enough VRAM: chat gets 503 with the reason; VRAM joins: split without --split."""
    seed, token = nodes.seed("--max-vram", "0.2")
    wait_until(lambda: "Waiting for more peers" in seed.log_text(), 60, "waiting message")
    status, body, headers = post_chat(seed, FIRST_NAME)
    assert status == 503, body
    message = body["error"]["message"]
    assert "Waiting for more peers — need 0.4 GB, have 0.2 GB" in message, body
    assert set(body["error"]) >= {"message", "type", "code"}
    assert int(headers["Retry-After"]) > 0
    nodes.start("helper", "--join", token)  # no --model: standby, a worker candidate
    seed.wait_ready(timeout_s=READY_TIMEOUT_S)
    argv = seed.llama_argv()
    assert "--rpc" in argv and "--tensor-split" in argv and "--split" not in seed.args
    assert chat(seed, FIRST_NAME).strip()


def test_05_lite_client_on_the_same_home(nodes: Nodes) -> None:
    """--client: its own (ephemeral) identity even in the seed's home, models from gossip,
    streaming chat tunneled to the host, no VRAM of its own counted."""
    seed, token = nodes.seed()
    seed.wait_ready()
    client = nodes.start(
        "client", "--client", "--join", token, home=seed.home, log_name="client.log"
    )
    wait_until(lambda: state_of(client, FIRST_NAME) == "warm", ROUTE_TIMEOUT_S, "routes")
    status = client.status()
    assert status["node"]["node_id"] != seed.node_id()
    assert status["node"]["role"] == "client" and status["node"]["vram_bytes"] == 0
    assert set(models_of(client)) == set(models_of(seed))
    before = peer_requests_served(seed)
    assert chat(client, FIRST_NAME, stream=True).strip()
    served_at_least(seed, before + 1)
    assert "uses this node's own key" not in seed.log_text() + client.log_text()


# -- multi model (6–9 share one topology, in order) ---------------------------------------------


@pytest.fixture(scope="module")
def multi(
    tmp_path_factory: pytest.TempPathFactory, llama_binaries: Binaries, demo_models_dir: Path
) -> Iterator[tuple[MeshProcess, MeshProcess, MeshProcess]]:
    """Seed A serves FIRST and wants SECOND; joiner B (no --model) has FIRST, SECOND and an
    unwanted model on disk; C is a lite client."""
    root = tmp_path_factory.mktemp("multi")
    group = Nodes(root, llama_binaries.llama_server.parent, demo_models_dir, seed_model=FIRST)
    try:
        a, token = group.seed("--model", SECOND, models_dir=own_models_dir(group, "a", FIRST))
        b = group.start(
            "b", "--join", token, models_dir=own_models_dir(group, "b", FIRST, SECOND, UNWANTED)
        )
        c = group.start("c", "--client", "--join", token)
        a.wait_ready()
        b.wait_ready(timeout_s=READY_TIMEOUT_S)
        for node in (a, b, c):
            wait_until(
                partial(in_state, node, "warm", FIRST_NAME, SECOND_NAME),
                ROUTE_TIMEOUT_S,
                f"both models warm on {node.home.name}",
            )
        yield a, b, c
    finally:
        group.close()


def test_07_joiner_picks_the_unserved_model_on_its_disk(
    multi: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    _a, b, _c = multi
    assigned = [e["msg"] for e in log_events(b) if e["msg"].startswith("Assigned to serve")]
    assert assigned == [f"Assigned to serve {SECOND_NAME} (needed by mesh, already on disk)"]
    served = {m["name"] for m in b.status()["models"] if m["host"] == "local"}
    assert served == {SECOND_NAME}, b.status()["models"]


def test_06_two_nodes_two_models_route_across(
    multi: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    a, b, _c = multi
    for node in (a, b):
        listed = models_of(node)
        assert {FIRST_NAME, SECOND_NAME} <= set(listed), listed
        assert listed[FIRST_NAME]["meta"]["nodes"] == listed[SECOND_NAME]["meta"]["nodes"] == 1
        assert "--rpc" not in node.llama_argv()  # both solo
    served_a, served_b = peer_requests_served(a), peer_requests_served(b)
    assert chat(a, SECOND_NAME).strip()  # A → B
    assert chat(b, FIRST_NAME).strip()  # B → A
    served_at_least(b, served_b + 1)
    served_at_least(a, served_a + 1)


def test_08_lite_client_streams_both_models(
    multi: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    a, b, c = multi
    assert {FIRST_NAME, SECOND_NAME} <= set(models_of(c))
    for model in (FIRST_NAME, SECOND_NAME):
        assert chat(c, model, stream=True).strip(), model
    client_id = c.node_id()
    assert client_id not in a.peer_ids() and client_id not in b.peer_ids()


def test_09_drop_a_model(multi: tuple[MeshProcess, MeshProcess, MeshProcess]) -> None:
    a, b, c = multi
    done = subprocess.run(
        [sys.executable, "-m", "mesh_llm", "drop", SECOND_NAME, "--port", str(a.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done
    assert b.wait_exit(30) == 0, b.log_text()
    for node in (a, c):
        wait_until(partial(in_state, node, "cold", SECOND_NAME), 30, "SECOND cold")
    assert post_chat(c, FIRST_NAME)[0] == 200 and post_chat(a, FIRST_NAME)[0] == 200
    assert post_chat(c, SECOND_NAME)[0] == 503


# -- resilience --------------------------------------------------------------------------------

# Heartbeat silence far beyond the test's window: only on-use detection can be quick.
SLOW_HEARTBEAT = "[mesh]\nsuspect_after_s = 40.0\ndead_after_s = 60.0\n"
FIRST_BYTE_S = 2


def _two_models(nodes: Nodes, config: str = "") -> tuple[MeshProcess, MeshProcess, MeshProcess]:
    """A serves FIRST (wants SECOND), B serves SECOND, C is a standby node; all linked."""
    a, token = nodes.seed(
        "--model", SECOND, config=config, models_dir=own_models_dir(nodes, "a", FIRST)
    )
    b = nodes.start(
        "b", "--model", SECOND, "--join", token, models_dir=own_models_dir(nodes, "b", SECOND)
    )
    c = nodes.start("c", "--join", token, config=config, models_dir=own_models_dir(nodes, "c"))
    a.wait_ready()
    b.wait_ready()
    wait_until(lambda: sees(a, b, c) and sees(c, a, b), JOIN_TIMEOUT_S, "three linked")
    for node in (a, c):
        wait_until(partial(in_state, node, "warm", SECOND_NAME), ROUTE_TIMEOUT_S, "warm")
    return a, b, c


def test_11_on_use_detection_of_a_silent_host(nodes: Nodes) -> None:
    """A request to a stopped host marks it dead at once and gossips it: its model goes cold on
    every node, long before heartbeat silence could (set to 40/60 s here)."""
    config = SLOW_HEARTBEAT + f"[api]\nfirst_byte_timeout_s = {FIRST_BYTE_S}\n"
    a, b, c = _two_models(nodes, config)
    victim = b.node_id()
    b.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, body, _ = post_chat(a, SECOND_NAME)
        assert status in (502, 503), body
        wait_until(
            lambda: victim not in a.peer_ids() and victim not in c.peer_ids(),
            15,
            "both survivors to drop the stopped host",
        )
        elapsed = time.monotonic() - started
        for node in (a, c):
            wait_until(partial(in_state, node, "cold", SECOND_NAME), 5, "SECOND cold")
        print(f"on-use detection: request to every survivor dropping it in {elapsed:.1f} s")
        assert elapsed < 20  # heartbeat silence would take 60 s
        for node in (a, c):
            dead = [e["msg"] for e in log_events(node) if e.get("event") == "peer_dead"]
            assert dead and not any("silent for" in m for m in dead), (node.home.name, dead)
        time.sleep(4)  # gossip rounds: nobody resurrects it
        assert victim not in a.peer_ids() and victim not in c.peer_ids()
    finally:
        b.signal(signal.SIGCONT)


def test_12_kill_9_then_rejoin_within_the_dead_ttl(nodes: Nodes) -> None:
    """kill -9 B, restart it with --join (same home: same key) within the 5 min dead-peer TTL:
    re-admitted, its model warm again, routing to it resumes."""
    a, b, c = _two_models(nodes)
    victim = b.node_id()
    b.signal(signal.SIGKILL)
    b.wait_exit()
    wait_until(lambda: victim not in a.peer_ids(), 20, "A to drop the killed node")
    wait_until(lambda: state_of(a, SECOND_NAME) != "warm", 10, "SECOND cold on A")
    again = MeshProcess(b.home, b.args, log_name="node-again.log")
    nodes.nodes.append(again.start())
    again.wait_ready()
    assert again.node_id() == victim
    wait_until(lambda: victim in a.peer_ids() and victim in c.peer_ids(), 40, "re-admitted")
    for node in (a, c):
        wait_until(partial(in_state, node, "warm", SECOND_NAME), ROUTE_TIMEOUT_S, "warm")
    served = peer_requests_served(again)
    assert chat(a, SECOND_NAME).strip() and chat(c, SECOND_NAME).strip()
    served_at_least(again, served + 2)


def test_13_gossip_stability_no_restart_loops(nodes: Nodes) -> None:
    """Re-checks after becoming host log "still host, no restart needed" (INFO) and restart
    nothing: one llama-server start per election result for replicas. The same count across a
    split and its re-plan is held by scenario 14 below."""
    seed, token = nodes.seed()
    other = nodes.start("other", "--model", FIRST, "--join", token)
    seed.wait_ready()
    other.wait_ready()
    wait_until(lambda: sees(seed, other) and sees(other, seed), JOIN_TIMEOUT_S, "joined")
    pids = {n.home.name: n.llama_server().pid for n in (seed, other)}
    time.sleep(GOSSIP_WINDOW_S)
    for node in (seed, other):
        events = log_events(node)
        assert sum(e["msg"].startswith(STARTED) for e in events) == 1, node.log_text()
        still = [e for e in events if e["msg"] == "still host, no restart needed"]
        assert still and still[0]["level"] == "info", node.log_text()
        assert node.llama_server().pid == pids[node.home.name]
        assert sum(e.get("event") == "peer_joined" for e in events) == 1


def test_14_forced_split_on_one_machine_with_an_ephemeral_key(nodes: Nodes) -> None:
    """Worker with MESH_LLM_EPHEMERAL_KEY=1 in the host's home: host goes solo → split; the
    worker runs rpc-server and its API is answered by the host; tensor split follows VRAM;
    the worker dies → the host re-plans solo with exactly one more llama-server start."""
    seed, token = nodes.seed("--split")
    seed.wait_ready()
    worker = nodes.start(
        "worker",
        "--model",
        FIRST,
        "--join",
        token,
        "--split",
        "--max-vram",
        "1",
        home=seed.home,
        log_name="worker.log",
        env={"MESH_LLM_EPHEMERAL_KEY": "1"},
    )
    wait_until(lambda: "--rpc" in seed.llama_argv(), SPLIT_TIMEOUT_S, "a split llama-server")
    seed.wait_ready(timeout_s=READY_TIMEOUT_S)
    assert worker.node_id() != seed.node_id()
    _assert_split_matches_gossip(seed, worker)
    assert [p.name() for p in worker.descendants()] == ["ggml-rpc-server"]
    starts = sum(e["msg"].startswith(STARTED) for e in log_events(seed))
    assert starts == 2  # solo while alone, then the split
    served = peer_requests_served(seed)
    assert chat(worker, FIRST_NAME).strip()
    assert served_at_least(seed, served + 1) == served + 1  # the host answered the worker's API
    time.sleep(GOSSIP_WINDOW_S)
    assert sum(e["msg"].startswith(STARTED) for e in log_events(seed)) == starts
    worker.signal(signal.SIGKILL)
    worker.wait_exit()
    wait_until(lambda: serves_solo(seed), 60 + READY_TIMEOUT_S, "the host back to solo")
    time.sleep(GOSSIP_WINDOW_S)
    assert sum(e["msg"].startswith(STARTED) for e in log_events(seed)) == starts + 1, (
        seed.log_text()
    )
    assert chat(seed, FIRST_NAME).strip()


def test_15_passive_client_on_one_machine(nodes: Nodes) -> None:
    """--client: no gossip, no entry in the host's peer list, models from the routing table,
    inference through the tunnel."""
    seed, token = nodes.seed()
    seed.wait_ready()
    client = nodes.start("client", "--client", "--join", token)
    wait_until(lambda: state_of(client, FIRST_NAME) == "warm", ROUTE_TIMEOUT_S, "routes")
    assert seed.node_id() in client.peer_ids()
    wait_until(lambda: seed.status()["clients"] == 1, 10, "the host to count one client")
    assert seed.status()["peers"] == []  # zero per-client membership state
    served = peer_requests_served(seed)
    assert chat(client, FIRST_NAME).strip()
    assert served_at_least(seed, served + 1) == served + 1
    assert http_status(client.base_url + "/readyz") == 200
