// The chat page of `ppllava-edge serve`: plain JS, no build step, no external requests. It talks to the server's
// own API: GET /v1/media (files + limits), POST /v1/chat/completions (stream: true, return_relevance).
"use strict";

// the same colour map as ppllava_edge/relevance.py (COLORMAP_STOPS): level = floor(255 * v / max + 0.5)
const STOPS = [[0.0, [0, 0, 4]], [0.25, [87, 16, 110]], [0.5, [188, 55, 84]], [0.75, [249, 142, 9]], [1.0, [252, 255, 164]]];
const LUT = Array.from({ length: 256 }, (_, i) => {
  const x = i / 255;
  let k = 0;
  while (k < STOPS.length - 2 && x > STOPS[k + 1][0]) k++;
  const [p0, c0] = STOPS[k], [p1, c1] = STOPS[k + 1];
  const f = (x - p0) / (p1 - p0);
  return c0.map((v, j) => Math.floor(v + f * (c1[j] - v) + 0.5));
});
const KEY_STORE = "ppllava-api-key";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  model: null,
  media: null, // {label, url, kind: "video_url" | "image_url"}
  messages: [], // the conversation so far, in OpenAI form
  busy: false,
};

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", Boolean(isError));
}

async function errorText(resp) {
  // the server's own message (OpenAI error body), else the status line
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

function askForKey(message) {
  $("key-form").hidden = false;
  setStatus(message, true);
  $("api-key").focus();
}

// ---- media list and limits -------------------------------------------------------------------------------------
async function loadMedia() {
  let resp;
  try {
    resp = await fetch("v1/media", { headers: headers(false) });
  } catch (e) {
    setStatus("Cannot reach the server: " + e.message, true);
    return;
  }
  if (resp.status === 401) return askForKey(await errorText(resp));
  if (resp.status === 503) {
    setStatus(await errorText(resp) + " — retrying…", true);
    setTimeout(loadMedia, 2000);
    return;
  }
  if (!resp.ok) return setStatus(await errorText(resp), true);
  const info = await resp.json();
  state.model = info.model;
  const sel = $("media-select");
  sel.replaceChildren(new Option(info.data.length ? "— choose —" : "— none listed —", ""));
  for (const m of info.data) sel.add(new Option(`${m.name} (${m.kind}, ${(m.bytes / 2 ** 20).toFixed(1)} MiB)`, m.name));
  sel.dataset.count = String(info.data.length);
  const f = info.limits.frames;
  Object.assign($("frames"), { min: f.min, max: f.max, value: f.default });
  $("max-tokens").value = info.limits.max_tokens;
  $("upload").dataset.maxBytes = info.limits.max_upload_bytes;
  $("key-form").hidden = true;
  setStatus(`ready — model ${info.model}, frames ${f.min}..${f.max}, uploads up to ${(info.limits.max_upload_bytes / 2 ** 20).toFixed(0)} MiB`);
}

function newConversation(note) {
  state.messages = [];
  if (note) addNotice(note);
}

function setMedia(media) {
  state.media = media;
  $("media-current").textContent = media ? `Asking about ${media.label}` : "No media chosen.";
  newConversation(media ? `New conversation about ${media.label}` : null);
}

function onSelect() {
  const name = $("media-select").value;
  $("upload").value = "";
  if (!name) return setMedia(null);
  const image = /\.(png|jpe?g|webp|bmp|tiff?)$/i.test(name);
  setMedia({ label: name, url: name, kind: image ? "image_url" : "video_url" });
}

function onUpload() {
  const file = $("upload").files[0];
  if (!file) return;
  $("media-select").value = "";
  const limit = Number($("upload").dataset.maxBytes || 0);
  if (limit && file.size > limit) {  // the server's rule (413), said before reading the whole file into the page
    $("upload").value = "";
    setMedia(null);
    addError(null, `${file.name}: the upload is ${(file.size / 2 ** 20).toFixed(1)} MiB, over this server's limit of ` +
      `${+(limit / 2 ** 20).toFixed(2)} MiB (--max-upload-mb)`);
    return;
  }
  const reader = new FileReader();
  reader.onerror = () => addError(null, `Cannot read ${file.name}: ${reader.error}`);
  reader.onload = () => {
    let url = reader.result;
    const npy = /\.npy$/i.test(file.name);
    if (npy) url = "data:application/x-npy;base64," + url.slice(url.indexOf(",") + 1);
    const image = !npy && file.type.startsWith("image/") && file.type !== "image/gif";
    setMedia({ label: `${file.name} (upload)`, url, kind: image ? "image_url" : "video_url" });
  };
  reader.readAsDataURL(file);
}

// ---- the log ---------------------------------------------------------------------------------------------------
function addItem(cls, text) {
  const li = document.createElement("li");
  li.className = cls;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  li.append(bubble);
  $("log").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function addNotice(text) {
  return addItem("notice", text);
}

function addError(li, text) {
  if (!li) li = addItem("answer", "");
  li.classList.remove("streaming");
  li.classList.add("error");
  li.dataset.state = "error";
  li.querySelector(".bubble").textContent = text;
  return li;
}

function fmt(ms) {
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(1) + " ms";
}

function renderMeta(li, chunk, usage) {
  const t = chunk.timings || {};
  const meta = document.createElement("div");
  meta.className = "meta";
  const steps = (t.decode_steps || []).length;
  const parts = [
    `decode video ${fmt(t.decode_video || 0)}`, `preprocess ${fmt(t.preprocess || 0)}`, `vision ${fmt(t.vision || 0)}`,
    `pool ${fmt(t.pool || 0)}`, `prefill ${fmt(t.prefill || 0)}`, `${steps} tokens in ${fmt(t.decode || 0)}`, `total ${fmt(t.e2e || 0)}`,
  ];
  if (usage) parts.push(`context ${usage.prompt_tokens} tokens`);
  meta.textContent = parts.join(" · ");
  if (t.cache_hit) {
    const hit = document.createElement("span");
    hit.className = "hit";
    hit.textContent = " · feature cache hit";
    meta.append(hit);
  }
  meta.dataset.cacheHit = String(Boolean(t.cache_hit));
  li.append(meta);
  for (const w of chunk.warnings || []) {
    const warn = document.createElement("div");
    warn.className = "meta";
    warn.textContent = "warning: " + w;
    li.append(warn);
  }
}

function renderRelevance(li, rel, question) {
  const [n, h, w] = rel.shape;
  const top = rel.max > 0 ? rel.max : 1;
  const strip = document.createElement("div");
  strip.className = "relevance";
  strip.dataset.cells = String(n);
  const name = { image: "tile", images: "image" }[rel.kind] || "frame";
  for (let t = 0; t < n; t++) {
    const fig = document.createElement("figure");
    if (rel.thumbnails[t]) {
      const img = document.createElement("img");
      img.src = rel.thumbnails[t];
      img.alt = `${name} ${t + 1} as the model saw it`;
      fig.append(img);
    } else {
      fig.classList.add("no-thumb");
    }
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const px = ctx.createImageData(w, h);
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        const level = Math.min(255, Math.max(0, Math.floor(255 * rel.values[t][i][j] / top + 0.5)));
        const [r, g, b] = LUT[level];
        // over a thumbnail: the more relevant, the more opaque, so the frame stays visible where it was ignored
        px.data.set([r, g, b, rel.thumbnails[t] ? Math.round(50 + 205 * level / 255) : 255], 4 * (i * w + j));
      }
    }
    ctx.putImageData(px, 0, 0);
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `relevance over ${name} ${t + 1}`);
    fig.append(canvas);
    const cap = document.createElement("figcaption");
    cap.textContent = `${name} ${t + 1}`;
    fig.append(cap);
    strip.append(fig);
  }
  const caption = document.createElement("div");
  caption.className = "relevance-caption";
  caption.textContent = `What “${question}” looked at: brighter = more relevant (prompt-guided pooling, ${n} ${name}s of ${h}×${w} patches; max ${rel.max.toPrecision(3)})`;
  li.append(strip, caption);
}

// ---- asking ----------------------------------------------------------------------------------------------------
async function readStream(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function ask(question) {
  if (!state.media) {
    addError(null, "Choose a video or image first (from the list, or upload one).");
    return;
  }
  const media = state.media;
  const first = state.messages.length === 0;
  const user = {
    role: "user",
    content: first ? [{ type: media.kind, [media.kind]: { url: media.url } }, { type: "text", text: question }] : question,
  };
  const body = {
    model: state.model || undefined,
    messages: [...state.messages, user],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    return_relevance: $("show-relevance").checked,
  };
  if (media.kind === "video_url") body.frames = Number($("frames").value);
  addItem("user", question);
  const li = addItem("answer streaming", "");
  li.dataset.state = "waiting";
  const bubble = li.querySelector(".bubble");
  let text = "", chunks = 0, final = null, usage = null, failed = null;
  let resp;
  try {
    resp = await fetch("v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  } catch (e) {
    addError(li, "Cannot reach the server: " + e.message);
    return;
  }
  if (!resp.ok) {
    const msg = await errorText(resp);
    addError(li, msg);
    if (resp.status === 401) askForKey(msg);
    return;
  }
  li.dataset.state = "streaming";
  try {
    await readStream(resp, (ev) => {
      if (ev.error) {
        failed = ev.error.message || "the server reported an error";
        return;
      }
      if (ev.usage) usage = ev.usage;
      for (const c of ev.choices || []) {
        const delta = (c.delta && c.delta.content) || "";
        if (delta) {
          text += delta;
          chunks += 1;
          bubble.textContent = text;
          li.dataset.chunks = String(chunks);
        }
        if (c.finish_reason) final = ev;
      }
    });
  } catch (e) {
    failed = "The answer stream broke off: " + e.message;
  }
  if (failed) {
    addError(li, text ? `${text}\n\n${failed}` : failed);
    return;
  }
  li.classList.remove("streaming");
  if (final) {
    renderMeta(li, final, usage);
    if (final.relevance) renderRelevance(li, final.relevance, question);
  }
  li.dataset.state = "done";
  li.dataset.finish = final ? final.choices[0].finish_reason : "";
  li.scrollIntoView({ block: "end" });
  state.messages.push(user, { role: "assistant", content: text });
}

async function onSubmit(ev) {
  ev.preventDefault();
  const q = $("question").value.trim();
  if (!q || state.busy) return;
  state.busy = true;
  $("send").disabled = true;
  $("question").value = "";
  try {
    await ask(q);
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("question").focus();
  }
}

function init() {
  $("ask-form").addEventListener("submit", onSubmit);
  $("question").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("api-key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
    else sessionStorage.removeItem(KEY_STORE);
    loadMedia();
  });
  $("media-select").addEventListener("change", onSelect);
  $("upload").addEventListener("change", onUpload);
  $("new-chat").addEventListener("click", () => {
    $("log").replaceChildren();
    newConversation(state.media ? `New conversation about ${state.media.label}` : null);
  });
  loadMedia();
}

init();
