// Connect panel: invite token, join commands, OpenAI base URL and a curl example.
import { copyText } from "./dom.js";

let current = { token: "", baseUrl: "" };

export function renderConnect(status) {
  const token = status.token || "";
  const apiUrl = (status.node && status.node.api_url) || "";
  const url = new URL(apiUrl || "http://127.0.0.1:9337/v1");
  if (url.hostname === "0.0.0.0" || url.hostname === "127.0.0.1") url.hostname = location.hostname || "127.0.0.1";
  const baseUrl = url.toString().replace(/\/$/, "");
  if (token === current.token && baseUrl === current.baseUrl) return;
  current = { token, baseUrl };
  document.getElementById("token").textContent = token || "(a client has no invite token of its own)";
  document.getElementById("join-serve").textContent = token ? `mesh-llm --join ${token} --model MODEL   # serve a model` : "";
  document.getElementById("join-client").textContent = token ? `mesh-llm --join ${token} --client       # use the mesh, no GPU` : "";
  document.getElementById("base-url").textContent = baseUrl;
  const model = document.getElementById("model-picker").value || "MODEL";
  document.getElementById("curl").textContent =
    `curl ${baseUrl}/chat/completions -H 'Content-Type: application/json' -d '{"model": "${model}", "messages": [{"role": "user", "content": "Hello"}]}'`;
}

export function setUpConnect() {
  const tokenButton = document.getElementById("copy-token");
  tokenButton.addEventListener("click", () => { if (current.token) copyText(current.token, tokenButton).catch(() => {}); });
  const urlButton = document.getElementById("copy-base-url");
  urlButton.addEventListener("click", () => { if (current.baseUrl) copyText(current.baseUrl, urlButton).catch(() => {}); });
}
