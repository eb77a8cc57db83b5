// Chat: streams an answer from /api/chat (the API's own router), keeps a multi-turn history,
// shows time to first token and tokens/s under each answer, stops by aborting the request
// (the node cancels the proxied request and the host's slot frees).
import { el } from "./dom.js";

const history = [];
let controller = null;

const ERRORS = {
  400: "The request was refused",
  404: "No node serves this model",
  429: "The host is busy (its queue is full); try again in a moment",
  502: "The serving node failed before answering",
  503: "The model is not ready yet (loading or waiting for peers)",
};

function readableError(status, body, retryAfter) {
  let detail = "";
  try { detail = JSON.parse(body).error.message; } catch { detail = body.slice(0, 300); }
  const head = ERRORS[status] || `The node answered ${status}`;
  const retry = retryAfter ? ` Retry after ${retryAfter} s.` : "";
  return `${head}: ${detail}.${retry}`.replace("..", ".");
}

function appendMessage(role, text) {
  const item = el("li", { className: `msg-${role}` }, el("span", { className: "text", text }));
  document.getElementById("conversation").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 1);
      if (line.startsWith("data:")) yield line.slice(5).trim();
    }
  }
}

function setBusy(busy) {
  document.getElementById("send").disabled = busy;
  document.getElementById("stop").disabled = !busy;
}

async function send(prompt, model) {
  history.push({ role: "user", content: prompt });
  appendMessage("user", prompt);
  const item = appendMessage("assistant", "");
  const text = item.querySelector(".text");
  const stats = el("span", { className: "stats", text: "waiting for the first token…" });
  item.append(stats);
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null;
  let tokens = 0;
  let answer = "";
  let stopped = false;
  const body = { messages: history.slice(), stream: true, stream_options: { include_usage: true } };
  if (model) body.model = model;
  try {
    const response = await fetch("/api/chat", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      item.className = "msg-error";
      text.textContent = readableError(response.status, await response.text(), response.headers.get("Retry-After"));
      stats.remove();
      history.pop();
      return;
    }
    let usageTokens = null;
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      let chunk;
      try { chunk = JSON.parse(data); } catch { continue; }
      if (chunk.error) throw new Error(chunk.error.message || "the stream ended with an error");
      if (chunk.usage && chunk.usage.completion_tokens) usageTokens = chunk.usage.completion_tokens;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        tokens += 1;
        answer += delta.content;
        text.textContent = answer;
        stats.textContent = `TTFT ${Math.round(first - started)} ms · ${tokens} tokens…`;
      }
    }
    if (usageTokens !== null) tokens = usageTokens;
  } catch (error) {
    if (error.name === "AbortError") stopped = true;
    else { item.classList.add("msg-error"); text.textContent = `${answer}\n[error: ${error.message}]`; }
  } finally {
    controller = null;
    setBusy(false);
  }
  const end = performance.now();
  if (first === null) {
    stats.textContent = stopped ? "stopped before the first token" : "no tokens";
  } else {
    const rate = tokens > 1 && end > first ? ((tokens - 1) / ((end - first) / 1000)).toFixed(1) : "—";
    stats.textContent = `TTFT ${Math.round(first - started)} ms · ${rate} tokens/s · ${tokens} tokens${stopped ? " · stopped" : ""}`;
  }
  stats.dataset.done = "1";
  history.push({ role: "assistant", content: answer });
}

export function setUpChat(selectedModel) {
  const form = document.getElementById("chat-form");
  const prompt = document.getElementById("prompt");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const textValue = prompt.value.trim();
    if (!textValue || controller) return;
    prompt.value = "";
    send(textValue, selectedModel());
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  document.getElementById("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  document.getElementById("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    document.getElementById("conversation").replaceChildren();
  });
}
