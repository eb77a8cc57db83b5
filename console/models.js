// Models table and the status line.
import { el, gigabytes, replaceChildren } from "./dom.js";

export function renderModels(view) {
  const rows = view.models.map((m) => el("tr", { dataset: { model: m.name } },
    el("td", { className: "model-name", text: m.name }),
    el("td", { className: m.warm ? "warm" : "cold", text: m.warm ? `warm · ${m.nodes} node(s)` : `cold · ${m.reason}` }),
    el("td", { text: gigabytes(m.size_bytes) }),
    el("td", { text: m.context ? String(m.context) : "—" }),
    el("td", { text: m.quant || "—" })));
  replaceChildren(document.querySelector("#models tbody"), rows.length ? rows : [el("tr", {}, el("td", { text: "no model yet", colspan: 5 }))]);
}

export function renderStatusLine(view) {
  const line = view.status_line;
  replaceChildren(document.getElementById("status-line"), [
    el("span", { className: `state state-${line.state}`, text: line.state }),
    ` · ${line.detail} · ${line.nodes} node(s) · ${gigabytes(line.mesh_vram_bytes)} mesh VRAM`,
  ]);
}
