// The playground: streams a chat completion from the public /v1 API with a short-lived key that
// the dashboard mints for this session (POST /api/playground/key). Plain JavaScript, no library.
"use strict";

(() => {
  const form = document.getElementById("playground");
  if (!form) return;
  const apiBase = form.dataset.apiBase;
  const model = document.getElementById("model");
  const maxTokens = document.getElementById("max-tokens");
  const message = document.getElementById("message");
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  const clear = document.getElementById("clear");
  const status = document.getElementById("playground-status");
  const transcript = document.getElementById("transcript");
  let key = null;
  let history = [];
  let controller = null;

  /** "0.001230" -> "$0.00123": trims the decimal string itself; money never becomes a float. */
  function usd(text) {
    const negative = text.startsWith("-");
    const [whole, micro = ""] = text.replace("-", "").split(".");
    let decimals = micro.replace(/0+$/, "");
    while (decimals.length < 2) decimals += "0";
    return `${negative ? "-" : ""}$${whole}.${decimals}`;
  }

  function addTurn(role, text) {
    const item = document.createElement("li");
    item.className = `turn turn-${role}`;
    const who = document.createElement("strong");
    who.textContent = role === "user" ? "You" : model.options[model.selectedIndex].text;
    const body = document.createElement("div");
    body.className = "turn-text";
    body.textContent = text;  // text, never HTML
    item.append(who, body);
    transcript.append(item);
    return body;
  }

  async function sessionKey(renew) {
    if (key && !renew) return key;
    const minted = await dubheApi("POST", "/api/playground/key");
    key = minted.key;
    return key;
  }

  async function complete(body, renewKey) {
    const response = await fetch(`${apiBase}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json",
                 authorization: `Bearer ${await sessionKey(renewKey)}` },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (response.status === 401 && !renewKey) return complete(body, true);  // expired key
    return response;
  }

  function setBusy(busy) {
    send.disabled = busy;
    stop.disabled = !busy;
    model.disabled = busy;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = message.value.trim();
    if (!text || controller) return;
    history.push({ role: "user", content: text });
    addTurn("user", text);
    message.value = "";
    const answer = addTurn("assistant", "");
    answer.parentElement.dataset.testid = "playground-answer";
    for (const old of transcript.querySelectorAll('[data-testid="playground-answer"]')) {
      if (old !== answer.parentElement) delete old.dataset.testid;
    }
    controller = new AbortController();
    setBusy(true);
    status.textContent = "Answering…";
    let usage = null;
    let content = "";
    try {
      const response = await complete({
        model: model.value,
        messages: history,
        max_tokens: Number(maxTokens.value) || undefined,
        stream: true,
        stream_options: { include_usage: true },
      }, false);
      if (!response.ok) {
        const data = await response.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) !== -1) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of frame.split("\n")) {
            if (!line.startsWith("data: ")) continue;  // ": ping" keep-alives
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
            if (delta && delta.content) {
              content += delta.content;
              answer.textContent = content;
            }
            if (chunk.usage) usage = chunk.usage;
          }
        }
      }
      history.push({ role: "assistant", content });
      if (usage) {
        const cost = usage.cost_usd !== undefined ? `, cost ${usd(usage.cost_usd)}` : "";
        status.textContent = `Done: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} ` +
          `completion tokens${cost}.`;
      } else {
        status.textContent = "Done.";
      }
    } catch (error) {
      if (error.name === "AbortError") {
        if (content) history.push({ role: "assistant", content });
        else history.pop();
        status.textContent = "Stopped. The tokens generated so far are billed; see Usage.";
      } else {
        history.pop();
        status.textContent = `Error: ${error.message}`;
      }
    } finally {
      controller = null;
      setBusy(false);
      message.focus();
    }
  });

  stop.addEventListener("click", () => { if (controller) controller.abort(); });
  clear.addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    transcript.replaceChildren();
    status.textContent = "";
    message.focus();
  });
  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
})();
