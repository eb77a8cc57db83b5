"""The web console in a real browser (Debian's chromium via Playwright) against real nodes.

Topology (module scope): host A serves MODEL_A, host B serves MODEL_B (the demo file under a
name that is an HTML tag, so every place the page shows it proves it is rendered as text), C is
a passive `--client`, D a standby node. The page of A must show every node with its role, a
model picker that highlights the serving node, a real streamed answer with TTFT and tokens/s,
a stop button that frees the host's llama-server slot, a token copy button that fills the
clipboard; a standby killed with SIGKILL leaves the page within the failure-detection time.
`--headless` keeps `/api/status` and answers 404 on `/`. No test may leave a console error.
Screenshots (light and dark) go to the test's tmp dir; with MESH_LLM_DOCS_SCREENSHOT=1 the light
one is also copied to docs/console.png (the README's image).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Error,
    Page,
    Route,
    expect,
    sync_playwright,
)

from mesh_llm.backend.build import Binaries
from mesh_llm.core.mesh import MeshTimings
from tests.e2e.harness import MeshProcess, http_status, wait_until
from tests.e2e.models import GEMMA, SMOLLM2

pytestmark = pytest.mark.e2e

# The two models of the mesh, in one place: A serves the demo model (SmolLM2), B the second
# real model (gemma-3-270m) from a file named as an HTML tag (`<img src=x onerror=alert(1)>.gguf`).
MODEL_A = SMOLLM2.catalog
MODEL_B = "<img src=x onerror=alert(1)>"
MODEL_FILE = GEMMA.file
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
WARM_TIMEOUT_S = 60.0
PAGE_TIMEOUT_MS = 30_000
ANSWER_TIMEOUT_MS = 120_000
SHORT_ANSWER_TOKENS = 32
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"
# A dead node leaves the gossip after `dead_after_s`; the page follows within a status event.
GONE_TIMEOUT_S = MeshTimings().dead_after_s + MeshTimings().suspect_after_s + 15


@dataclass
class Mesh:
    a: MeshProcess
    b: MeshProcess
    client: MeshProcess
    standby: MeshProcess
    token: str
    nodes: list[MeshProcess] = field(default_factory=list)

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.a.console_port}/"


def _start(root: Path, name: str, args: list[str], models: Path, bin_dir: str) -> MeshProcess:
    common = ["--models-dir", str(models), "--bin-dir", bin_dir, "--log-format", "json"]
    return MeshProcess(root / name, [*args, *common]).start()


def _warm(node: MeshProcess, *names: str) -> bool:
    models = {m["name"]: m for m in node.status().get("models", [])}
    return all(models.get(n, {}).get("nodes", 0) > 0 for n in names)


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, llama_binaries: Binaries, demo_models_dir: Path
) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("console")
    bin_dir = str(llama_binaries.llama_server.parent)
    b_models = root / "b-models"
    b_models.mkdir()
    os.link(demo_models_dir / MODEL_FILE, b_models / f"{MODEL_B}.gguf")
    nodes: list[MeshProcess] = []
    try:
        a = _start(root, "a", ["--model", MODEL_A], demo_models_dir, bin_dir)
        nodes.append(a)
        wait_until(lambda: bool(a.status().get("token")), 30, "invite token")
        token: str = a.status()["token"]
        join = ["--join", token]
        b = _start(root, "b", ["--model", MODEL_B, *join], b_models, bin_dir)
        nodes.append(b)
        client = _start(root, "c", ["--client", *join], demo_models_dir, bin_dir)
        nodes.append(client)
        standby = _start(root, "d", join, demo_models_dir, bin_dir)
        nodes.append(standby)
        a.wait_ready()
        b.wait_ready()
        for node in (a, b, client):
            wait_until(partial(_both_warm, node), WARM_TIMEOUT_S, "both models warm")
        wait_until(lambda: standby.node_id() in a.peer_ids(), WARM_TIMEOUT_S, "standby in view")
        yield Mesh(a, b, client, standby, token, nodes)
    finally:
        for node in nodes:
            node.stop()


def _both_warm(node: MeshProcess) -> bool:
    return len([m for m in node.status().get("models", []) if m.get("nodes", 0) > 0]) == 2


def _local_model(node: MeshProcess) -> str:
    """The name of the model `node` serves (a catalog name resolves to the file's name)."""
    return str(next(m["name"] for m in node.status()["models"] if m["host"] == "local"))


def _slots_busy(node: MeshProcess) -> int:
    url = f"http://127.0.0.1:{node.llama_server_port()}/slots"
    with urllib.request.urlopen(url, timeout=5) as response:
        return sum(bool(slot["is_processing"]) for slot in json.loads(response.read()))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class PageErrors:
    """Console errors, uncaught exceptions and dialogs (an executed `alert`) of one page."""

    def __init__(self, page: Page) -> None:
        self.seen: list[str] = []
        self.allowed: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", self._on_page_error)
        page.on("dialog", self._on_dialog)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.seen.append(message.text)

    def _on_page_error(self, error: Error) -> None:
        self.seen.append(f"uncaught: {error}")

    def _on_dialog(self, dialog: Dialog) -> None:
        self.seen.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    def unexpected(self) -> list[str]:
        return [e for e in self.seen if not any(a in e for a in self.allowed)]


def _open(browser: Browser, url: str, **options: Any) -> tuple[BrowserContext, Page, PageErrors]:
    context = browser.new_context(**({"viewport": {"width": 1280, "height": 900}} | options))
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    errors = PageErrors(page)
    page.goto(url)
    return context, page, errors


@pytest.fixture
def console(browser: Browser, mesh: Mesh) -> Iterator[tuple[Page, PageErrors]]:
    context, page, errors = _open(
        browser, mesh.page_url, permissions=["clipboard-read", "clipboard-write"]
    )
    try:
        yield page, errors
        assert errors.unexpected() == []
    finally:
        context.close()


def test_topology_shows_every_node_with_its_role(
    console: tuple[Page, PageErrors], mesh: Mesh
) -> None:
    page, _ = console
    a_card = page.locator(f'#nodes .card[data-node="{mesh.a.node_id()}"]')
    expect(a_card).to_contain_text("(you)")
    expect(a_card.locator(".role")).to_have_text("host")
    b_card = page.locator(f'#nodes .card[data-node="{mesh.b.node_id()}"]')
    expect(b_card.locator(".role")).to_have_text("host")
    standby = page.locator(f'#nodes .card[data-node="{mesh.standby.node_id()}"]')
    expect(standby.locator(".role")).to_have_text("standby")
    expect(page.locator("#nodes .card")).to_have_count(3)  # the client is not a mesh card
    expect(page.locator("#clients")).to_contain_text("1 client(s)")
    expect(page.locator("#status-line")).to_contain_text("ready")
    expect(page.locator("#links li").first).to_contain_text("ms")
    expect(page.locator('#events li[data-event="peer_joined"]').first).to_be_visible()
    # VRAM as advertised: A's share is its gossip number over the sum of the three cards'.
    view = json.loads(urllib.request.urlopen(mesh.page_url + "api/status", timeout=5).read())
    cards = view["view"]["nodes"]
    assert sum(c["vram_bytes"] for c in cards) == view["view"]["mesh_vram_bytes"]
    a_share = next(c["vram_share"] for c in cards if c["you"])
    expect(a_card.locator(".vram")).to_contain_text(f"{round(a_share * 1000) / 10} %")
    # The client's own page shows it as the client, apart from the mesh's cards.
    page.goto(f"http://127.0.0.1:{mesh.client.console_port}/")
    you = page.locator('#clients .card[data-role="client"]')
    expect(you).to_contain_text("(you)")
    expect(page.locator("#nodes .card")).to_have_count(3)


def test_model_names_from_the_mesh_render_as_text(
    console: tuple[Page, PageErrors], mesh: Mesh
) -> None:
    page, errors = console
    expect(page.locator(f'#models tr[data-model="{MODEL_B}"] .model-name')).to_have_text(MODEL_B)
    expect(page.locator(f'#nodes .card[data-node="{mesh.b.node_id()}"] .models')).to_contain_text(
        MODEL_B
    )
    assert page.locator("img").count() == 0  # no element was made from the name
    assert not any(e.startswith("dialog") for e in errors.seen)


def test_picking_a_model_highlights_the_node_serving_it(
    console: tuple[Page, PageErrors], mesh: Mesh
) -> None:
    page, _ = console
    picker = page.locator("#model-picker")
    expect(picker).to_be_visible()
    a_card = page.locator(f'#nodes .card[data-node="{mesh.a.node_id()}"]')
    b_card = page.locator(f'#nodes .card[data-node="{mesh.b.node_id()}"]')
    picker.select_option(MODEL_B)
    expect(b_card).to_have_class("card serving")
    expect(a_card).not_to_have_class("card serving")
    picker.select_option(_local_model(mesh.a))
    expect(a_card).to_have_class("card serving")
    expect(b_card).not_to_have_class("card serving")


def test_chat_streams_a_real_answer_with_ttft_and_rate_over_two_turns(
    console: tuple[Page, PageErrors], mesh: Mesh, tmp_path: Path
) -> None:
    page, _ = console
    page.route("**/api/chat", _with({"max_tokens": SHORT_ANSWER_TOKENS}))
    page.locator("#model-picker").select_option(_local_model(mesh.a))
    page.fill("#prompt", "Name three colours.")
    page.click("#send")
    first = page.locator(".msg-assistant").nth(0)
    expect(first.locator(".stats")).to_have_attribute("data-done", "1", timeout=ANSWER_TIMEOUT_MS)
    stats = first.locator(".stats").inner_text()
    assert "TTFT" in stats and "tokens/s" in stats, stats
    assert first.locator(".text").inner_text().strip()
    page.fill("#prompt", "And one more?")
    page.click("#send")
    second = page.locator(".msg-assistant").nth(1)
    expect(second.locator(".stats")).to_have_attribute("data-done", "1", timeout=ANSWER_TIMEOUT_MS)
    assert "tokens/s" in second.locator(".stats").inner_text()
    expect(first.locator(".stats")).to_have_text(stats)  # kept after the answer ended
    expect(page.locator("#conversation li")).to_have_count(4)
    _screenshots(page, mesh, tmp_path)
    page.click("#clear")
    expect(page.locator("#conversation li")).to_have_count(0)


def _screenshots(page: Page, mesh: Mesh, tmp_path: Path) -> None:
    light = tmp_path / "console-light.png"
    page.screenshot(path=str(light), full_page=True)
    browser = page.context.browser
    assert browser is not None
    context, dark_page, errors = _open(browser, mesh.page_url, color_scheme="dark")
    try:
        expect(dark_page.locator("#nodes .card")).to_have_count(3)
        dark_page.screenshot(path=str(tmp_path / "console-dark.png"), full_page=True)
        assert errors.unexpected() == []
    finally:
        context.close()
    context, phone, errors = _open(browser, mesh.page_url, viewport={"width": 390, "height": 844})
    try:
        expect(phone.locator("#nodes .card")).to_have_count(3)
        phone.screenshot(path=str(tmp_path / "console-phone.png"), full_page=True)
        overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
        assert errors.unexpected() == []
    finally:
        context.close()
    print(f"screenshots in {tmp_path}")
    if os.environ.get("MESH_LLM_DOCS_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(light, DOCS_SCREENSHOT)


def _with(fields: dict[str, object]) -> Callable[[Route], None]:
    """Add `fields` to the page's chat requests (the page sets no token limit: a short answer
    keeps the test quick on 2 shared cores; a long one gives the stop button time)."""

    def rewrite(route: Route) -> None:
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps(body | fields))

    return rewrite


def test_stop_cancels_generation_and_frees_the_host_slot(
    console: tuple[Page, PageErrors], mesh: Mesh
) -> None:
    page, _ = console
    page.route("**/api/chat", _with({"max_tokens": 2000, "ignore_eos": True}))
    page.locator("#model-picker").select_option(MODEL_B)
    page.fill("#prompt", "Write a long story.")
    page.click("#send")
    answer = page.locator(".msg-assistant").last
    expect(answer.locator(".stats")).to_contain_text("TTFT", timeout=ANSWER_TIMEOUT_MS)
    assert _slots_busy(mesh.b) == 1
    page.click("#stop")
    started = time.monotonic()
    wait_until(lambda: _slots_busy(mesh.b) == 0, 15, "B's slot to free after stop")
    print(f"slot freed {time.monotonic() - started:.2f} s after stop")
    expect(answer.locator(".stats")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_enabled()


def test_errors_are_shown_as_readable_messages(
    console: tuple[Page, PageErrors], mesh: Mesh
) -> None:
    page, errors = console
    errors.allowed.append("status of 404")  # the browser logs every failed fetch
    page.route("**/api/chat", _with({"model": "no-such-model"}))
    page.fill("#prompt", "hello")
    page.click("#send")
    error = page.locator(".msg-error")
    expect(error).to_contain_text("No node serves this model")
    expect(error).to_contain_text(MODEL_B)  # the API's message lists the served models
    assert "{" not in error.inner_text()  # not raw JSON
    expect(page.locator("#send")).to_be_enabled()


def test_copy_button_puts_the_invite_token_on_the_clipboard(
    console: tuple[Page, PageErrors], mesh: Mesh
) -> None:
    page, _ = console
    expect(page.locator("#token")).to_have_text(mesh.token)
    page.click("#copy-token")
    wait_until(lambda: page.evaluate("navigator.clipboard.readText()") == mesh.token, 5, "copy")
    expect(page.locator("#join-client")).to_contain_text(f"--join {mesh.token} --client")
    expect(page.locator("#base-url")).to_have_text(f"{mesh.a.base_url}/v1")


def test_headless_answers_404_on_the_page_and_keeps_the_api(mesh: Mesh, tmp_path: Path) -> None:
    node = MeshProcess(tmp_path / "headless", ["--join", mesh.token, "--headless"]).start()
    try:
        wait_until(lambda: http_status(node_status_url(node)) == 200, 60, "headless status")
        assert http_status(f"http://127.0.0.1:{node.console_port}/") == 404
        assert http_status(f"http://127.0.0.1:{node.console_port}/static/main.js") == 404
        assert "Console:" not in node.log_text()
    finally:
        node.stop()


def node_status_url(node: MeshProcess) -> str:
    return f"http://127.0.0.1:{node.console_port}/api/status"


def test_a_killed_node_leaves_the_page_within_failure_detection(
    console: tuple[Page, PageErrors], mesh: Mesh
) -> None:
    page, _ = console
    card = page.locator(f'#nodes .card[data-node="{mesh.standby.node_id()}"]')
    expect(card).to_have_count(1)
    mesh.standby.signal(signal.SIGKILL)
    started = time.monotonic()
    expect(card).to_have_count(0, timeout=GONE_TIMEOUT_S * 1000)
    print(f"killed node left the page after {time.monotonic() - started:.1f} s")
    expect(page.locator("#nodes .card")).to_have_count(2)


def test_the_page_says_when_its_node_is_gone_and_comes_back_with_it(
    browser: Browser, mesh: Mesh, tmp_path: Path
) -> None:
    node = MeshProcess(tmp_path / "returning", ["--join", mesh.token]).start()
    context = None
    try:
        wait_until(lambda: bool(node.status()), 60, "the node's console")
        context, page, errors = _open(browser, f"http://127.0.0.1:{node.console_port}/")
        # The browser logs the cut event stream and the refused retries while the node is gone.
        errors.allowed += ["ERR_CONNECTION_REFUSED", "ERR_INCOMPLETE_CHUNKED_ENCODING"]
        banner = page.locator("#banner")
        expect(page.locator("#nodes .card").first).to_be_visible()
        expect(banner).to_be_hidden()
        node.stop()
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("node unreachable")
        node.start()  # same home, same console port
        expect(banner).to_be_hidden(timeout=60_000)
        expect(page.locator("#nodes .card .you")).to_have_count(1)
        assert errors.unexpected() == []
    finally:
        if context is not None:
            context.close()
        node.stop()
