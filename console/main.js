// The console page: one EventSource on /api/events drives every panel.
import { el, replaceChildren } from "./dom.js";
import { renderTopology } from "./topology.js";
import { renderModels, renderStatusLine } from "./models.js";
import { renderConnect, setUpConnect } from "./connect.js";
import { addEvents, resetEvents } from "./events.js";
import { setUpChat } from "./chat.js";

const RECONNECT_MS = 2000;
let lastView = null;
let lastStatus = null;

function warmModels(view) {
  return view.models.filter((m) => m.warm).map((m) => m.name);
}

function renderPicker(view) {
  const picker = document.getElementById("model-picker");
  const warm = warmModels(view);
  const shown = Array.from(picker.options).map((o) => o.value);
  if (warm.join("\n") !== shown.join("\n")) {
    const keep = picker.value;
    replaceChildren(picker, warm.map((name) => el("option", { value: name, text: name })));
    if (warm.includes(keep)) picker.value = keep;
  }
  document.getElementById("picker-label").hidden = warm.length < 2;
}

function selectedModel() {
  const picker = document.getElementById("model-picker");
  return picker.value || (lastView ? warmModels(lastView)[0] : undefined);
}

function highlighted(view) {
  const name = selectedModel();
  const model = view.models.find((m) => m.name === name);
  return new Set(model && warmModels(view).length > 1 ? model.serving_nodes : []);
}

function render() {
  if (!lastStatus) return;
  const view = lastStatus.view;
  lastView = view;
  renderPicker(view);
  renderStatusLine(view);
  renderTopology(view, highlighted(view));
  renderModels(view);
  renderConnect(lastStatus);
}

function showBanner(text) {
  const banner = document.getElementById("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("snapshot", (message) => {
    const data = JSON.parse(message.data);
    showBanner("");
    lastStatus = data.status;
    resetEvents();
    addEvents(data.events);
    render();
  });
  source.addEventListener("status", (message) => {
    lastStatus = JSON.parse(message.data);
    render();
  });
  source.addEventListener("event", (message) => addEvents([JSON.parse(message.data)]));
  source.addEventListener("error", () => {
    // The browser retries by itself while the stream is CONNECTING; a CLOSED stream is
    // reopened here, so the page comes back when the node does.
    showBanner("node unreachable — reconnecting…");
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connect, RECONNECT_MS);
    }
  });
}

document.getElementById("model-picker").addEventListener("change", render);
setUpConnect();
setUpChat(selectedModel);
connect();
