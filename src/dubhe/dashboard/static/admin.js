// The admin console's actions: each form with data-admin-api posts its fields as JSON to that
// /admin/api route (the same call a script makes), then reloads the page, or shows the answer
// in place (data-stay). Fields marked data-json are sent as JSON values (true, 3), not text.
"use strict";

function dubheAdminNotice(text, isError) {
  const status = document.querySelector(isError ? "[data-admin-error]" : "[data-admin-status]");
  const other = document.querySelector(isError ? "[data-admin-status]" : "[data-admin-error]");
  if (other) other.hidden = true;
  if (!status) return;
  status.textContent = text;
  status.hidden = false;
}

function dubheAdminKey() {
  return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random())
    .replace(/[^A-Za-z0-9_-]/g, "");
}

document.addEventListener("DOMContentLoaded", () => {
  const carried = sessionStorage.getItem("dubhe-admin-notice");
  if (carried) {
    sessionStorage.removeItem("dubhe-admin-notice");
    dubheAdminNotice(carried, false);
  }
  for (const form of document.querySelectorAll("form[data-admin-api]")) {
    // One key per form shown: a double click or a retry of the same submission applies once.
    if (form.hasAttribute("data-idempotent")) form.dataset.key = dubheAdminKey();
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = {};
      for (const field of form.querySelectorAll("input[name], select[name], textarea[name]")) {
        body[field.name] = field.hasAttribute("data-json") ? JSON.parse(field.value) : field.value;
      }
      if (form.dataset.key) body.idempotency_key = form.dataset.key;
      const button = form.querySelector("button[type=submit]");
      if (button) button.disabled = true;
      try {
        const data = await dubheApi("POST", form.dataset.adminApi, body);
        if (form.hasAttribute("data-stay")) {
          const output = form.parentElement.querySelector("[data-admin-output]");
          if (output) {
            output.textContent = data.codes ? data.codes.join("\n")
              : [data.message, data.link].filter(Boolean).join(" ");
            output.hidden = false;
          }
          dubheAdminNotice(data.codes ? `Minted ${data.codes.length} code(s).` : "Done.", false);
        } else {
          sessionStorage.setItem("dubhe-admin-notice", data.message
            || (data.applied === false ? "Already applied." : "Done."));
          window.location.reload();
        }
      } catch (error) {
        dubheAdminNotice(error.message, true);
      } finally {
        if (button) button.disabled = false;
      }
    });
  }
  // A conversation: live messages, and the reply form.
  const list = document.querySelector("[data-chat-stream]");
  if (list) dubheChatFollow(list, list.dataset.chatStream, "admin");
  const reply = document.querySelector("form[data-chat-reply]");
  if (reply && list) {
    reply.addEventListener("submit", async (event) => {
      event.preventDefault();
      const box = reply.querySelector("textarea");
      const text = box.value.trim();
      if (!text) return;
      try {
        const message = await dubheChatPost(reply.dataset.chatReply, text);
        box.value = "";
        dubheChatAppend(list, [message], "admin");
      } catch (error) {
        dubheAdminNotice(error.message, true);
      }
    });
  }
});
