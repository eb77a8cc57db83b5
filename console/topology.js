// Topology: one card per mesh node, split groups, links with RTT and lane, clients apart.
import { el, gigabytes, percent, replaceChildren } from "./dom.js";

function nodeCard(node, highlighted) {
  const bar = el("span");
  bar.style.width = `${Math.max(0, Math.min(1, node.vram_share)) * 100}%`;
  const classes = ["card"];
  if (highlighted.has(node.node_id)) classes.push("serving");
  if (node.state === "suspect") classes.push("suspect");
  const models = node.models.map((m) => `${m.name}${m.role === "worker" ? " (rpc)" : ""}${m.ready ? "" : " (loading)"}`);
  return el("article", { className: classes.join(" "), dataset: { node: node.node_id, role: node.role } },
    el("div", { className: "title" },
      el("span", {},
        el("span", { className: "id", text: node.short_id }),
        node.you ? el("span", { className: "you", text: " (you)" }) : null),
      el("span", { className: `role role-${node.role.replace(" ", "-")}`, text: node.role })),
    node.state === "suspect" ? el("div", { className: "suspect-mark", text: "suspect: not heard from" }) : null,
    el("div", { className: "meta hostname", text: node.name || "?" }),
    el("div", { className: "meta models", text: models.length ? models.join(", ") : "no model" }),
    el("div", { className: "bar", title: "share of the mesh's VRAM" }, bar),
    el("div", { className: "meta vram", text: `${gigabytes(node.vram_bytes)} VRAM · ${percent(node.vram_share)} of mesh` }),
    el("div", { className: "meta backend", text: `${node.backend} · ${node.hardware || "?"}${node.build_id ? ` · llama.cpp ${node.build_id}` : ""}` }),
  );
}

export function renderTopology(view, highlighted) {
  const names = new Map(view.nodes.map((n) => [n.node_id, n.short_id]));
  const short = (id) => names.get(id) || id.slice(0, 10);
  replaceChildren(document.getElementById("nodes"), view.nodes.map((n) => nodeCard(n, highlighted)));
  replaceChildren(document.getElementById("groups"), view.groups.map((g) => el("div", { className: "group", dataset: { model: g.model } },
    el("strong", { text: `split: ${g.model}` }),
    ` — host ${short(g.host)}, rpc workers ${g.workers.map(short).join(", ")}`,
    g.tensor_split.length ? ` · tensor split ${g.tensor_split.map((r) => r.toFixed(2)).join(" / ")}` : "")));
  const links = view.links.map((l) => el("li", { dataset: { a: l.a, b: l.b } },
    `${short(l.a)} ↔ ${short(l.b)} · ${l.rtt_ms === null ? "no direct link" : `${l.rtt_ms} ms`} · ${l.carries.length ? l.carries.join(" + ") : "gossip"} · ${l.lane}`));
  replaceChildren(document.getElementById("links"), links.length ? links : [el("li", { text: "no links yet" })]);
  const clients = view.clients;
  const parts = [];
  if (clients.you) parts.push(el("div", { className: "card", dataset: { node: clients.you.node_id, role: "client" } },
    el("div", { className: "title" }, el("span", {}, el("span", { className: "id", text: clients.you.short_id }), el("span", { className: "you", text: " (you)" })),
      el("span", { className: "role", text: "client" })),
    el("div", { className: "meta hostname", text: clients.you.name }),
    el("div", { className: "meta backend", text: "API only · not counted in mesh VRAM" })));
  else parts.push(el("span", { text: `${clients.count} client(s) connected to this node · not counted in mesh VRAM` }));
  replaceChildren(document.getElementById("clients"), parts);
}
