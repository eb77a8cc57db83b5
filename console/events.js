// Events feed: the newest first, bounded.
import { el } from "./dom.js";

const MAX_SHOWN = 150;
const seen = new Set();

export function addEvents(events) {
  const list = document.getElementById("events");
  for (const event of events) {
    if (seen.has(event.id)) continue;
    seen.add(event.id);
    const time = new Date(event.ts * 1000).toLocaleTimeString();
    list.prepend(el("li", { className: `level-${event.level}`, dataset: { event: event.event } },
      el("time", { text: time }), el("strong", { text: event.event }), ` ${event.message}`));
  }
  while (list.children.length > MAX_SHOWN) list.lastElementChild.remove();
}

export function resetEvents() {
  seen.clear();
  document.getElementById("events").replaceChildren();
}
