// The help chat: a button bottom-right on every page opens a panel; messages go to /api/chat and
// answers arrive live over server-sent events. Text is always set as text, never as HTML.
"use strict";

/** A CSRF token: the signed-in page's <meta>, or one fetched for an anonymous visitor. */
async function dubheChatCsrf() {
  const token = dubheCsrfToken();
  if (token) return token;
  const response = await fetch("/api/auth/session", { credentials: "same-origin" });
  const data = await response.json();
  return data.csrf_token;
}

/** Append messages to a list element once each (by id), as text. */
function dubheChatAppend(list, messages, me) {
  for (const message of messages) {
    if (list.querySelector(`[data-message-id="${message.id}"]`)) continue;
    const item = document.createElement("div");
    item.className = `chat-message chat-${message.author}`;
    item.dataset.messageId = String(message.id);
    const author = document.createElement("span");
    author.className = "chat-author";
    author.textContent = message.author === me ? "You"
      : ({ admin: "Support", assistant: "Automatic answer" }[message.author] || "Visitor");
    const body = document.createElement("p");
    body.textContent = message.body;
    item.append(author, body);
    list.append(item);
    list.dataset.chatAfter = String(Math.max(Number(list.dataset.chatAfter || 0), message.id));
  }
  list.scrollTop = list.scrollHeight;
}

/** Follow a conversation's stream; EventSource reconnects by itself (with Last-Event-ID). */
function dubheChatFollow(list, url, me) {
  if (list.chatSource) return;
  const after = Number(list.dataset.chatAfter || 0);
  const source = new EventSource(`${url}?after=${after}`);
  list.chatSource = source;
  source.addEventListener("hello", (event) => {
    list.dataset.worker = JSON.parse(event.data).worker;
  });
  source.onmessage = (event) => dubheChatAppend(list, [JSON.parse(event.data)], me);
}

async function dubheChatPost(url, text) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": await dubheChatCsrf() },
    body: JSON.stringify({ body: text }),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error((data.error && data.error.message) || `Sending failed (${response.status})`);
  }
  return data;
}

function dubheChatPanel(button) {
  const panel = document.createElement("section");
  panel.className = "chat-panel";
  panel.id = "help-chat-panel";
  panel.setAttribute("aria-label", "Help chat");
  const title = document.createElement("h2");
  title.textContent = "Talk to us";
  const close = document.createElement("button");
  close.type = "button";
  close.className = "secondary button-small chat-close";
  close.textContent = "Close";
  const list = document.createElement("div");
  list.className = "chat-messages";
  list.dataset.testid = "chat-messages";
  list.setAttribute("role", "log");
  list.setAttribute("aria-label", "Conversation with support");
  list.tabIndex = 0;
  const form = document.createElement("form");
  form.className = "chat-form";
  const label = document.createElement("label");
  label.htmlFor = "help-chat-message";
  label.textContent = "Message";
  const input = document.createElement("textarea");
  input.id = "help-chat-message";
  input.rows = 2;
  input.maxLength = 2000;
  input.required = true;
  const send = document.createElement("button");
  send.type = "submit";
  send.textContent = "Send";
  const status = document.createElement("p");
  status.className = "hint";
  status.setAttribute("role", "status");
  form.append(label, input, send, status);
  panel.append(title, close, list, form);
  document.body.append(panel);

  close.addEventListener("click", () => {
    panel.hidden = true;
    button.setAttribute("aria-expanded", "false");
    button.focus();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    send.disabled = true;
    status.textContent = "";
    try {
      const data = await dubheChatPost("/api/chat/messages", text);
      input.value = "";
      dubheChatAppend(list, [data.message], "visitor");
      dubheChatFollow(list, "/api/chat/events", "visitor");
    } catch (error) {
      status.textContent = error.message;
    } finally {
      send.disabled = false;
      input.focus();
    }
  });
  fetch("/api/chat", { credentials: "same-origin" })
    .then((response) => response.json())
    .then((data) => {
      dubheChatAppend(list, data.messages || [], "visitor");
      if (data.conversation_id) dubheChatFollow(list, "/api/chat/events", "visitor");
    });
  return panel;
}

document.addEventListener("DOMContentLoaded", () => {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "chat-button";
  button.textContent = "Help chat";
  button.setAttribute("aria-expanded", "false");
  button.setAttribute("aria-controls", "help-chat-panel");
  document.body.append(button);
  let panel = null;
  button.addEventListener("click", () => {
    // Built on first open, so pages that have their own "Message" field keep one until then.
    panel = panel || dubheChatPanel(button);
    panel.hidden = false;
    button.setAttribute("aria-expanded", "true");
    panel.querySelector("textarea").focus();
  });
});
