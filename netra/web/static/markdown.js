// Assistant answers as markdown: parsed by marked, cleaned by DOMPurify, then
// links made safe to follow and code blocks given a copy button. (A user's
// own text never comes here: it stays plain text.)
//
// Safety comes in layers, so that no single mistake lets a script through:
// 1. raw HTML in an answer is shown as text, except a few inline tags with
//    no attributes (<br>, <b>, <kbd>, <sub>…) that models put in tables;
// 2. the HTML marked makes goes through DOMPurify with an allow-list of tags
//    and attributes (no event handlers, no style, no images, no forms);
// 3. every link is checked again: only http, https and mailto keep their
//    href, and they open in a new tab that cannot reach this one
//    (rel="noopener noreferrer"); any other link is left as inert text.
// Images become links to the image: the page loads nothing from elsewhere.
// And the page's Content-Security-Policy runs no inline script regardless.
//
// While an answer streams, the text so far is rendered again at most once per
// animation frame (less often when a render takes over 4 ms: rendering takes
// at most a fifth of the time). marked's lexer splits the text into top-level
// blocks; a block that renders as before keeps its DOM nodes, so only the
// tail of the answer is rebuilt. Nothing flickers, and the blocks above keep
// a selection, the horizontal scroll of a wide code block, and a working copy
// button. An unclosed ``` fence is a code block to the end of the text (as
// CommonMark says), so code streams in as code.

import { Marked } from "./vendor/marked.esm.js";
import "./vendor/purify.min.js"; // a UMD build: it defines globalThis.DOMPurify

const DOMPurify = globalThis.DOMPurify;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

// Raw inline HTML that renders as itself: these tags, bare.
const SAFE_INLINE_TAG = /^<\/?(?:b|i|u|s|em|strong|del|sub|sup|kbd|mark|br)\s*\/?>$/i;

const marked = new Marked({ gfm: true, breaks: true, async: false });
marked.use({
  renderer: {
    html({ text, block }) {
      if (!block && SAFE_INLINE_TAG.test(text.trim())) return text;
      return block ? `<p class="raw-html">${escapeHtml(text.trim())}</p>` : escapeHtml(text);
    },
    image({ href, title, text }) {
      const label = text || title || href;
      return `<a href="${escapeHtml(href)}" class="image-link">${escapeHtml(label)}</a>`;
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: [
    "a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i",
    "input", "kbd", "li", "mark", "ol", "p", "pre", "s", "strong", "sub", "sup", "table", "tbody", "td",
    "th", "thead", "tr", "u", "ul",
  ],
  ALLOWED_ATTR: ["href", "title", "class", "align", "start", "type", "checked", "disabled"],
  ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
  // DOMPurify checks every other attribute's value against that pattern too
  ADD_URI_SAFE_ATTR: ["align", "start", "type"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

export function isSafeHref(href) {
  try {
    return SAFE_PROTOCOLS.has(new URL(href).protocol); // a relative URL throws: not kept
  } catch {
    return false;
  }
}

// Markdown source -> a sanitized DocumentFragment, ready to insert.
export function renderMarkdown(text) {
  return sanitize(marked.parse(text));
}

function sanitize(html) {
  return finish(DOMPurify.sanitize(html, PURIFY));
}

function finish(fragment) {
  for (const a of fragment.querySelectorAll("a")) {
    const href = a.getAttribute("href");
    if (href && isSafeHref(href)) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    } else {
      a.removeAttribute("href");
    }
  }
  for (const input of fragment.querySelectorAll("input")) {
    if (input.type === "checkbox") input.disabled = true; // a task list item
    else input.remove();
  }
  for (const pre of fragment.querySelectorAll("pre")) codeBlock(pre);
  for (const table of fragment.querySelectorAll("table")) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap"; // a wide table scrolls by itself, not the page
    table.replaceWith(wrap);
    wrap.append(table);
  }
  return fragment;
}

function codeBlock(pre) {
  const code = pre.querySelector("code");
  const lang = code && /(?:^|\s)language-(\S+)/.exec(code.className);
  const label = document.createElement("span");
  label.className = "lang";
  label.textContent = lang ? lang[1] : "";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.setAttribute("aria-label", lang ? `Copy the ${lang[1]} code` : "Copy the code");
  const head = document.createElement("div");
  head.className = "code-head";
  head.append(label, button);
  const box = document.createElement("div");
  box.className = "code-block";
  pre.replaceWith(box);
  box.append(head, pre);
}

async function copyCode(button) {
  const pre = button.closest(".code-block").querySelector("pre");
  const text = pre.textContent.replace(/\n$/, "");
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    copied = copyBySelection(pre); // no clipboard API (a page served over plain http elsewhere than localhost)
  }
  button.textContent = copied ? "Copied" : "Select and copy";
  clearTimeout(button.resetTimer);
  button.resetTimer = setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

function copyBySelection(node) {
  const selection = getSelection();
  const range = document.createRange();
  range.selectNodeContents(node);
  selection.removeAllRanges();
  selection.addRange(range);
  try {
    return document.execCommand("copy");
  } catch {
    return false;
  } finally {
    selection.removeAllRanges();
  }
}

// The rendered answer in `node`, fed a delta at a time or set whole.
export class MarkdownView {
  constructor(node) {
    this.node = node;
    this.text = "";
    this.groups = []; // [{count, source, html, nodes}]: runs of top-level blocks on screen, in order
    this.frame = 0;
    this.nextAt = 0; // no render before this time (a rAF timestamp)
    node.classList.add("markdown");
    node.addEventListener("click", (event) => {
      const button = event.target.closest("button.copy");
      if (button && node.contains(button)) copyCode(button);
    });
  }

  append(delta) {
    this.text += delta ?? "";
    if (!this.frame) this.frame = requestAnimationFrame(this.onFrame);
  }

  // A long answer takes longer to render: then frames are skipped, so that
  // rendering takes at most a fifth of the time and the page stays responsive.
  onFrame = (now) => {
    this.frame = 0;
    if (now < this.nextAt) {
      this.frame = requestAnimationFrame(this.onFrame);
      return;
    }
    const started = performance.now();
    this.render();
    const took = performance.now() - started;
    this.nextAt = took > 4 ? started + 5 * took : 0;
  };

  // The whole text (a completed answer, one read back): rendered at once.
  set(text) {
    this.text = text ?? "";
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    this.render({ final: true });
  }

  // Render now what is waiting for the next frame, if anything.
  flush() {
    if (this.frame) this.set(this.text);
  }

  // `final`: the text will not grow (a completed answer, one read back).
  render({ final = false } = {}) {
    const tokens = marked.lexer(this.text);
    // a reference definition that arrives later changes the blocks that use it
    const links = JSON.stringify(tokens.links || {});
    const blocks = tokens.filter((t) => t.type !== "space" && t.type !== "def");
    // Keep the groups on screen that render as before. A group whose source
    // changed may still render the same (a newline after a closing fence, a
    // fence that closes): then it stays as it is.
    let kept = 0;
    let done = 0; // blocks covered by the groups kept
    for (; kept < this.groups.length; kept++) {
      const group = this.groups[kept];
      const run = blocks.slice(done, done + group.count);
      if (run.length < group.count) break;
      const source = sourceOf(run, links);
      if (source !== group.source) {
        if (htmlOf(run) !== group.html) break;
        group.source = source;
      }
      done += group.count;
    }
    for (const old of this.groups.splice(kept)) for (const n of old.nodes) n.remove();
    // The new blocks: sanitized in one go (DOMPurify costs mostly per call),
    // except the last one while streaming, which the next frame may change.
    const fresh = blocks.slice(done);
    const runs = final || fresh.length < 2 ? [fresh] : [fresh.slice(0, -1), fresh.slice(-1)];
    for (const run of runs) {
      if (!run.length) continue;
      const html = htmlOf(run);
      const fragment = sanitize(html);
      this.groups.push({ count: run.length, source: sourceOf(run, links), html, nodes: [...fragment.childNodes] });
      this.node.append(fragment);
    }
  }
}

function sourceOf(run, links) {
  return run.map((t) => `${t.type}\u0000${t.raw}`).join("\u0001") + `\u0000${links}`;
}

function htmlOf(run) {
  return marked.parser(run);
}
