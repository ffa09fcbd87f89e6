// Dubhe's shared page script: small helpers the pages use. No framework, nothing fetched at run time.
"use strict";

/** The session's CSRF token (the layout puts it in a <meta> tag for signed-in pages). */
function dubheCsrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

/** fetch() for the dashboard's JSON calls: same-origin cookie, CSRF header, JSON in and out. */
async function dubheApi(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": dubheCsrfToken() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (data.error && data.error.message) || `Request failed (${response.status})`;
    throw new Error(message);
  }
  return data;
}

// Copy buttons: <button data-copy-target="ID">Copy</button> copies that element's text.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy-target]");
  if (!button) return;
  const target = document.getElementById(button.dataset.copyTarget);
  if (!target) return;
  const text = target.value !== undefined ? target.value : target.textContent;
  try {
    await navigator.clipboard.writeText(text.trim());
    button.textContent = "Copied";
  } catch (_) {
    button.textContent = "Select and copy";
  }
});

// Tabs: a [role=tablist] whose tabs control panels by aria-controls; arrow keys move between them.
document.addEventListener("DOMContentLoaded", () => {
  for (const list of document.querySelectorAll('[role="tablist"]')) {
    const tabs = Array.from(list.querySelectorAll('[role="tab"]'));
    const select = (tab) => {
      for (const other of tabs) {
        const selected = other === tab;
        other.setAttribute("aria-selected", String(selected));
        other.tabIndex = selected ? 0 : -1;
        document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
      }
      dubheMarkScrollables();
    };
    // Without JavaScript every panel shows; with it, only the selected one.
    select(tabs.find((tab) => tab.getAttribute("aria-selected") === "true") || tabs[0]);
    tabs.forEach((tab, index) => {
      tab.addEventListener("click", () => select(tab));
      tab.addEventListener("keydown", (event) => {
        const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
        if (!step) return;
        const next = tabs[(index + step + tabs.length) % tabs.length];
        select(next);
        next.focus();
      });
    });
  }
});

// A table or code block wider than the screen scrolls inside its own box; keyboard users reach
// that box with Tab and scroll it with the arrow keys, so it gets a tab stop and a name.
function dubheMarkScrollables() {
  for (const box of document.querySelectorAll(".table-wrap, pre")) {
    const scrolls = box.scrollWidth > box.clientWidth;
    if (scrolls && !box.hasAttribute("tabindex")) {
      box.tabIndex = 0;
      box.setAttribute("role", "region");
      const table = box.querySelector("table");
      const caption = table && (table.caption ? table.caption.textContent
        : document.getElementById(table.getAttribute("aria-labelledby") || "")?.textContent);
      box.setAttribute("aria-label", (caption || (table ? "Table" : "Code")).trim() + " (scrolls sideways)");
    } else if (!scrolls && box.getAttribute("role") === "region") {
      box.removeAttribute("tabindex");
      box.removeAttribute("role");
      box.removeAttribute("aria-label");
    }
  }
}
document.addEventListener("DOMContentLoaded", dubheMarkScrollables);
window.addEventListener("resize", dubheMarkScrollables);
