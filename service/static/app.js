// The search page: text search with word grounding (heat map over the image grid), image drop.
// Plain JS, no build step: the page ships inside the Python package and must work offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: localStorage.getItem("apiKey") || "", grid: null };

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["X-API-Key"] = state.key;
  return h;
}

// The key goes in a header only (never in a URL, which servers and proxies log), so with a key
// an <img> cannot load /images/{id} itself: fetch it with the header and show the blob.
async function showImage(img, url) {
  if (!url) return;
  if (!state.key) { img.src = url; return; }
  try {
    const res = await fetch(url, { headers: headers(false) });
    if (!res.ok) return;
    const blobUrl = URL.createObjectURL(await res.blob());
    img.addEventListener("load", () => URL.revokeObjectURL(blobUrl), { once: true });
    img.src = blobUrl;
  } catch (e) { /* the card keeps its caption */ }
}

function setStatus(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", !!isError);
}

async function call(path, init) {
  const res = await fetch(path, init);
  let body = null;
  try { body = await res.json(); } catch (e) { body = { message: res.statusText }; }
  if (res.status === 401) {
    $("key-label").hidden = false;
    $("api-key").focus();
  }
  if (!res.ok) throw new Error((body && body.message) || ("HTTP " + res.status));
  return body;
}

function options() {
  const c = $("candidates").value;
  return { k: parseInt($("k").value, 10), mode: $("mode").value, candidates: c === "auto" ? "auto" : parseInt(c, 10) };
}

function timingText(r) {
  const t = r.timings_ms || {};
  const parts = [`${r.hits.length} results`, `encode ${fmt(t.encode)} ms`, `FAISS ${fmt(t.faiss)} ms`];
  if (r.mode === "rerank") parts.push(`re-rank ${fmt(t.rerank)} ms (K=${r.candidates}${r.candidates_auto ? ", auto" : ""})`);
  parts.push(`server ${fmt(t.request)} ms`);
  return parts.join(" · ");
}

const fmt = (x) => (x === undefined || x === null ? "–" : Number(x).toFixed(1));

// --- heat map ---------------------------------------------------------------------------------------
function heatColour(v) {           // v in [0, 1]
  return `rgba(255, ${Math.round(140 - 110 * v)}, 0, ${(0.10 + 0.55 * v).toFixed(3)})`;
}

function buildHeat(card, hit, grid) {
  const heat = card.querySelector(".heat");
  heat.innerHTML = "";
  if (!hit.alignment || !grid) return;
  const [rows, cols] = grid;
  heat.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
  heat.style.gridTemplateColumns = `repeat(${cols}, 1fr)`;
  const cells = [];
  for (let i = 0; i < rows * cols; i++) {
    const d = document.createElement("div");
    d.className = "cell";
    d.dataset.cell = String(i);
    heat.appendChild(d);
    cells.push(d);
  }
  card._cells = cells;
  // content words only: function words and punctuation carry no grounding
  card._alignment = hit.alignment.filter((a) => a.content !== false && a.cell >= 0 && a.cell < rows * cols);
  paintAll(card);
}

function paintAll(card) {
  // every word at its best cell; a cell's heat is the best score any word gives it
  const cells = card._cells || [];
  const al = card._alignment || [];
  const best = new Map();
  const words = new Map();
  for (const a of al) {
    best.set(a.cell, Math.max(best.has(a.cell) ? best.get(a.cell) : -Infinity, a.score));
    words.set(a.cell, (words.get(a.cell) || []).concat(a.word));
  }
  const scores = [...best.values()];
  const lo = Math.min(...scores, 0), hi = Math.max(...scores, 1e-6);
  cells.forEach((d, i) => {
    if (best.has(i)) {
      const v = hi > lo ? (best.get(i) - lo) / (hi - lo) : 1;
      d.style.background = heatColour(0.35 + 0.65 * v);
      d.textContent = words.get(i).join(" ");
      d.dataset.active = "1";
      d.style.outline = v >= 0.999 ? "3px solid #fff" : "1px solid rgba(255,255,255,0.7)";
    } else {
      d.style.outline = "none";
      d.style.background = "rgba(0,0,0,0.28)";
      d.textContent = "";
      d.dataset.active = "0";
    }
  });
  card.classList.remove("word-focus");
  card.querySelectorAll(".word").forEach((w) => w.classList.remove("active"));
}

function paintWord(card, idx) {
  const a = card._alignment[idx];
  (card._cells || []).forEach((d, i) => {
    const on = i === a.cell;
    d.style.background = on ? heatColour(1) : "rgba(0,0,0,0.55)";
    d.style.outline = on ? "3px solid #fff" : "none";  // the word's winning cell, unmistakable
    d.textContent = on ? a.word : "";
    d.dataset.active = on ? "1" : "0";
  });
  card.querySelector(".cell-label").textContent = `“${a.word}” → row ${a.row + 1}, col ${a.col + 1} · ${a.score.toFixed(3)}`;
  card.classList.add("word-focus");
  card.querySelectorAll(".word").forEach((w, i) => w.classList.toggle("active", i === idx));
}

// --- results ----------------------------------------------------------------------------------------
function render(r) {
  state.grid = r.grid;
  const box = $("results");
  box.innerHTML = "";
  if (!r.hits.length) {
    box.innerHTML = '<div class="empty">No results.</div>';
    applyCut();
    return;
  }
  const tpl = $("card-tpl");
  r.hits.forEach((hit, rank) => {
    const card = tpl.content.firstElementChild.cloneNode(true);
    card.dataset.id = String(hit.id);
    card.dataset.rank = String(rank + 1);
    const img = card.querySelector("img");
    showImage(img, hit.image_url);
    img.alt = hit.caption || `image ${hit.image_id}`;
    card.querySelector(".caption").textContent = hit.caption || `#${rank + 1} · image ${hit.image_id}`;
    showFile(card, hit);
    const local = hit.local_score === null || hit.local_score === undefined ? "" :
      ` · local ${hit.local_score.toFixed(3)}`;
    const label = hit.label_score === null || hit.label_score === undefined ? "" :
      ` (labels ${hit.label_score.toFixed(3)})`;
    const conf = hasConfidence(hit) ? `<span class="conf">confidence ${(100 * hit.confidence).toFixed(0)}%</span> · ` : "";
    card.querySelector(".scores").innerHTML =
      `${conf}<b>score ${hit.score.toFixed(3)}</b> · global ${hit.global_score.toFixed(3)}${label}${local}`;
    if (hasConfidence(hit)) card.dataset.confidence = String(hit.confidence);
    const words = card.querySelector(".words");
    if (hit.alignment) {
      hit.alignment.filter((a) => a.content !== false).forEach((a, i) => {
        const w = document.createElement("span");
        w.className = "word";
        w.textContent = a.word;
        w.title = `best cell row ${a.row + 1}, col ${a.col + 1}: ${a.score.toFixed(3)}`;
        w.addEventListener("mouseenter", () => paintWord(card, i));
        w.addEventListener("click", (ev) => { ev.stopPropagation(); card.classList.add("pinned"); paintWord(card, i); });
        words.appendChild(w);
      });
      buildHeat(card, hit, r.grid);
      words.addEventListener("mouseleave", () => paintAll(card));
    }
    card.addEventListener("click", () => {
      const was = card.classList.contains("pinned");
      document.querySelectorAll(".card.pinned").forEach((c) => c.classList.remove("pinned"));
      if (!was) card.classList.add("pinned");
      paintAll(card);
    });
    box.appendChild(card);
  });
  applyCut();
}

// --- the confidence cut: hits below the chosen minimum are hidden (no new query) ----------------------
const hasConfidence = (hit) => hit.confidence !== null && hit.confidence !== undefined;

function applyCut() {
  const min = parseFloat($("min-confidence").value);
  $("min-confidence-value").textContent = min.toFixed(2);
  const cards = [...document.querySelectorAll("#results .card")];
  let hidden = 0;
  cards.forEach((card) => {
    const below = card.dataset.confidence !== undefined && parseFloat(card.dataset.confidence) < min;
    card.hidden = below;
    if (below) hidden += 1;
  });
  const cut = $("cut");
  const rated = cards.filter((c) => c.dataset.confidence !== undefined).length;
  cut.hidden = cards.length === 0 || (min <= 0 && rated > 0);
  cut.textContent = rated === 0 ? "these results have no confidence (uncalibrated model or image→image search)"
    : `${hidden} of ${cards.length} results below confidence ${min.toFixed(2)} hidden`;
}

// --- which file a hit is, and (on hover) the captions of its image ---------------------------------------
function fileName(path) {
  return path ? path.split("/").pop() : "";
}

function showFile(card, hit) {
  const file = card.querySelector(".file");
  file.textContent = fileName(hit.path) + (hit.user_id !== null && hit.user_id !== undefined ? ` · id ${hit.user_id}` : "");
  file.title = hit.path || "";
  if (hit.image_id === null || hit.image_id === undefined) return;
  card.addEventListener("mouseenter", () => loadCaptions(card, hit.image_id), { once: true });
}

const captionCache = new Map();

async function loadCaptions(card, imageId) {
  if (!captionCache.has(imageId)) {
    captionCache.set(imageId, call(`/items/${imageId}`, { headers: headers(false) })
      .then((item) => item.captions || []).catch(() => []));
  }
  const caps = await captionCache.get(imageId);
  const list = card.querySelector(".hover-caps");
  list.innerHTML = "";
  caps.forEach((c) => { const li = document.createElement("li"); li.textContent = c; list.appendChild(li); });
  list.classList.toggle("loaded", caps.length > 0);
  card.querySelector("img").title = caps.join("\n");
}

async function searchText(ev) {
  if (ev) ev.preventDefault();
  const query = $("query").value.trim();
  if (!query) { setStatus("Type a query first.", true); return; }
  $("query-preview").hidden = true;
  setStatus("searching…");
  try {
    const body = { query, explain: $("explain").checked, ...options() };
    const r = await call("/search/text", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    render(r);
    setStatus(timingText(r));
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function searchImage(file) {
  if (!file) return;
  const form = new FormData();
  const o = options();
  form.append("file", file);
  form.append("k", String(o.k));
  form.append("mode", o.mode);
  form.append("candidates", String(o.candidates));
  form.append("target", $("target-images").checked ? "images" : "captions");
  const prev = $("query-preview");
  prev.innerHTML = "";
  const im = document.createElement("img");
  im.src = URL.createObjectURL(file);
  prev.append(im, document.createTextNode(`query image: ${file.name}`));
  prev.hidden = false;
  setStatus("searching…");
  try {
    const r = await call("/search/image", { method: "POST", headers: headers(false), body: form });
    render(r);
    setStatus(timingText(r));
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function loadInfo() {
  try {
    const res = await fetch("/readyz", { headers: headers(false) });
    const r = await res.json();
    const info = r.info || {};
    const n = info.images ?? (info.counts && info.counts.images);
    // without the key (when the server has one) /readyz only says ready or not
    const which = r.index ? `index ${r.index.index_dir.split("/").pop()} · generation ${r.index.generation}` : "index ready";
    const verified = r.verified && r.verified !== "ok" ? ` · checksums ${r.verified}` : "";
    $("index-info").textContent = r.ready
      ? which + (n !== undefined ? ` · ${n} images` : "") + verified
      : `not ready: ${r.message}`;
    if (!r.ready) setTimeout(loadInfo, 1500);
  } catch (e) {
    $("index-info").textContent = "service unreachable";
  }
}

function setupDrop() {
  const drop = $("drop"), file = $("file");
  drop.addEventListener("click", (ev) => { if (ev.target.tagName !== "INPUT" && ev.target.tagName !== "LABEL") file.click(); });
  drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") file.click(); });
  file.addEventListener("change", () => { const f = file.files[0]; file.value = ""; searchImage(f); });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (ev) => { const f = ev.dataTransfer.files[0]; if (f) searchImage(f); });
}

$("text-form").addEventListener("submit", searchText);
$("api-key").value = state.key;
$("api-key").addEventListener("change", () => { state.key = $("api-key").value; localStorage.setItem("apiKey", state.key); });
$("min-confidence").addEventListener("input", applyCut);
setupDrop();
loadInfo();
