// imagesmith web studio: plain JavaScript on the /v1 and /sdapi/v1 APIs of the same server (no build step, no
// third-party code). Progress comes from the job's server-sent events, read with fetch so a token can be sent.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const FORMATS = ["1:1", "4:5", "9:16", "1.91:1", "300x250", "728x90", "300x600", "320x50"];
const tokenInput = $("#token");
tokenInput.value = localStorage.getItem("imagesmith-token") || "";
tokenInput.addEventListener("change", () => localStorage.setItem("imagesmith-token", tokenInput.value.trim()));

function headers(extra = {}) {
  const t = tokenInput.value.trim();
  return t ? { ...extra, Authorization: "Bearer " + t } : extra;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const type = res.headers.get("content-type") || "";
  const body = type.includes("json") ? await res.json() : await res.text();
  if (!res.ok) throw new Error((body && body.error && body.error.message) || res.statusText);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// ------------------------------------------------------------------------------------------------ tabs
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => {
  history.replaceState(null, "", "#" + b.dataset.tab);
  document.querySelectorAll("#tabs button").forEach((x) => x.classList.toggle("on", x === b));
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("on", t.id === b.dataset.tab));
  ({ gallery: loadGallery, queue: loadQueue, models: loadModels }[b.dataset.tab] || (() => {}))();
}));

// ------------------------------------------------------------------------------------------- progress
async function showPreview(url, img) {
  // the live preview of the running step (a fetch, not <img src>: the API may need the bearer token)
  const res = await fetch(url, { headers: headers(), cache: "no-store" });
  if (!res.ok) return;
  const old = img.src;
  img.src = URL.createObjectURL(await res.blob());
  img.hidden = false;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

async function follow(jobId, bar, status, preview = null) {
  let shownAt = 0;
  const res = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers() });
  if (!res.ok) throw new Error("events: " + res.statusText);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").find((l) => l.startsWith("data: "));
      if (!data) continue;
      last = JSON.parse(data.slice(6));
      bar.style.width = Math.round(100 * (last.progress || 0)) + "%";
      status.textContent = `${last.status} ${Math.round(100 * (last.progress || 0))}% ${last.progress_note || ""}`;
      if (preview && last.preview_url && Date.now() - shownAt > 400) {
        shownAt = Date.now();
        showPreview(last.preview_url, preview).catch(() => {});
      }
    }
  }
  if (preview) preview.hidden = true;
  return last;
}

// ------------------------------------------------------------------------------------------- generate
const loraRows = $("#gen-loras");
let loraNames = [];

function addLora(name = "", weight = 1) {
  const select = el("select", {}, el("option", { value: "" }, "-"), ...loraNames.map((n) => el("option", { value: n }, n)));
  select.value = name;
  const slider = el("input", { type: "range", min: "-1", max: "2", step: "0.05", value: String(weight) });
  const shown = el("span", {}, String(weight));
  slider.addEventListener("input", () => { shown.textContent = slider.value; });
  const row = el("div", { class: "lora" }, select, slider, shown, el("button", { type: "button", onclick: () => row.remove() }, "x"));
  loraRows.append(row);
}
$("#add-lora").addEventListener("click", () => addLora());

function generateRequest(form) {
  const f = new FormData(form);
  const num = (k) => (f.get(k) === "" || f.get(k) === null ? undefined : Number(f.get(k)));
  const req = {
    prompt: f.get("prompt"), negative_prompt: f.get("negative_prompt"), sampler_name: f.get("sampler_name"),
    steps: num("steps"), cfg_scale: num("cfg_scale"), seed: num("seed"), batch_size: num("batch_size"),
    width: num("width"), height: num("height"), model: f.get("model") || undefined,
    loras: [...loraRows.querySelectorAll(".lora")].map((r) => ({ name: r.querySelector("select").value,
      weight: Number(r.querySelector("input").value) })).filter((l) => l.name),
  };
  if (f.get("hires")) {
    req.hires = { hr_scale: num("hr_scale"), hr_upscaler: f.get("hr_upscaler"), hr_denoising_strength: num("hr_denoising_strength") };
  }
  return req;
}

function fillForm(req) {
  const form = $("#gen-form");
  for (const [k, v] of Object.entries(req)) {
    const input = form.elements.namedItem(k);
    if (input && v !== null && typeof v !== "object") input.value = v;
  }
  loraRows.innerHTML = "";
  (req.loras || []).forEach((l) => addLora(l.name, l.weight));
  form.elements.namedItem("hires").checked = !!req.hires;
  if (req.hires) for (const [k, v] of Object.entries(req.hires)) { const i = form.elements.namedItem(k); if (i) i.value = v; }
  document.querySelector('#tabs button[data-tab="generate"]').click();
}

function figure(file, job) {
  const img = el("img", { src: file.url, alt: job.request ? job.request.prompt || "" : "", loading: "lazy" });
  img.addEventListener("click", () => showDetail(file, job));
  return el("figure", {}, img, el("figcaption", {}, file.seed !== undefined ? `seed ${file.seed}` : file.format || ""));
}

function showDetail(file, job) {
  const body = $("#detail-body");
  body.innerHTML = "";
  body.append(el("img", { src: file.url }), el("pre", {}, file.infotext || JSON.stringify(job.request, null, 1)),
    el("a", { href: file.url, download: "" }, "Download"), " ",
    el("button", { type: "button", onclick: () => { $("#detail").close(); fillForm(job.request); } }, "Reuse parameters"));
  $("#detail").showModal();
}
$("#detail-close").addEventListener("click", () => $("#detail").close());

$("#gen-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("#gen-out"), status = $("#gen-status");
  try {
    const req = generateRequest(e.target);
    const { job_id } = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ type: "generate", request: req }) });
    await follow(job_id, $("#gen-bar"), status, $("#gen-preview"));
    const job = await api(`/v1/jobs/${job_id}`);
    if (job.status !== "succeeded") throw new Error(job.error || job.status);
    out.innerHTML = "";
    job.files.forEach((f) => out.append(figure(f, job)));
  } catch (err) { status.textContent = "error: " + err.message; }
});

// ------------------------------------------------------------------------------------------- ad studio
$("#ad-formats").append(...FORMATS.map((f, i) => el("label", { class: "inline" },
  Object.assign(el("input", { type: "checkbox", value: f }), { checked: i < 4 }), f)));

// "this one": drag a box around the product or tap it; coordinates go to the API in the photo's pixels
const pick = { img: null, box: null, point: null, drag: null };
function drawPick() {
  const c = $("#ad-pick-canvas"), g = c.getContext("2d");
  if (!pick.img) return;
  g.drawImage(pick.img, 0, 0, c.width, c.height);
  const k = c.width / pick.img.naturalWidth;
  g.lineWidth = 3; g.strokeStyle = "#d9480f"; g.fillStyle = "#d9480f";
  if (pick.box) { const [x0, y0, x1, y1] = pick.box; g.strokeRect(x0 * k, y0 * k, (x1 - x0) * k, (y1 - y0) * k); }
  if (pick.point) { g.beginPath(); g.arc(pick.point[0] * k, pick.point[1] * k, 7, 0, 2 * Math.PI); g.fill(); }
  $("#ad-pick-state").textContent = pick.box ? `box ${pick.box.join(",")}` : pick.point ? `point ${pick.point.join(",")}` : "";
}
function pickXY(e) {
  const c = $("#ad-pick-canvas"), r = c.getBoundingClientRect();
  const k = pick.img.naturalWidth / r.width;
  return [Math.round(Math.min(Math.max(e.clientX - r.left, 0), r.width - 1) * k),
          Math.round(Math.min(Math.max(e.clientY - r.top, 0), r.height - 1) * k)];
}
$("#ad-form input[name=product]").addEventListener("change", (e) => {
  const file = e.target.files[0];
  pick.box = pick.point = null; $("#ad-mask").hidden = true;
  if (!file) { $("#ad-pick").hidden = true; return; }
  const img = new Image();
  img.onload = () => {
    pick.img = img;
    const c = $("#ad-pick-canvas"), w = Math.min(img.naturalWidth, 640);
    c.width = w; c.height = Math.round(img.naturalHeight * w / img.naturalWidth);
    $("#ad-pick").hidden = false; drawPick();
  };
  img.src = URL.createObjectURL(file);
});
$("#ad-pick-canvas").addEventListener("pointerdown", (e) => { if (pick.img) { pick.drag = pickXY(e); e.target.setPointerCapture(e.pointerId); } });
$("#ad-pick-canvas").addEventListener("pointerup", (e) => {
  if (!pick.drag) return;
  const [x0, y0] = pick.drag, [x1, y1] = pickXY(e);
  pick.drag = null;
  if (Math.abs(x1 - x0) < 6 && Math.abs(y1 - y0) < 6) { pick.point = [x1, y1]; pick.box = null; }
  else { pick.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)]; pick.point = null; }
  drawPick();
});
$("#ad-pick-clear").addEventListener("click", () => { pick.box = pick.point = null; $("#ad-mask").hidden = true; drawPick(); });

async function uploadProduct(form) {
  const upload = new FormData();
  upload.append("file", form.get("product"));
  return (await api("/v1/uploads", { method: "POST", body: upload })).id;
}
// the cut-out the ad would use, over a checkerboard, with its confidence: what to fix before making ads
async function showCutout(id) {
  const state = $("#ad-pick-state");
  const req = { image: id, product_box: pick.box, product_point: pick.point };
  const { job_id } = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ type: "cutout", request: req }) });
  await follow(job_id, $("#ad-bar"), $("#ad-status"));
  const job = await api(`/v1/jobs/${job_id}`);
  if (job.status !== "succeeded") throw new Error(job.error || job.status);
  $("#ad-mask-img").src = await (async () => URL.createObjectURL(await (await fetch(job.files[0].url, { headers: headers() })).blob()))();
  $("#ad-mask").hidden = false;
  const conf = job.result.confidence;
  state.textContent = `cut-out confidence ${conf.toFixed(2)}` + (conf < 0.5 ? ": drag a box around the product or tap it" : "");
  return job;
}
$("#ad-pick-check").addEventListener("click", async () => {
  try { await showCutout(await uploadProduct(new FormData($("#ad-form")))); }
  catch (err) { $("#ad-pick-state").textContent = "error: " + err.message; }
});

$("#ad-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = new FormData(e.target), out = $("#ad-out"), status = $("#ad-status");
  try {
    status.textContent = "uploading";
    const id = await uploadProduct(f);
    const req = { products: [id], concept: f.get("concept"), headline: f.get("headline"),
      subline: f.get("subline") || null, cta: f.get("cta") || null, brand_color: f.get("brand_color"),
      variations: Number(f.get("variations")), background: f.get("background"),
      product_box: pick.box, product_point: pick.point,
      formats: [...document.querySelectorAll("#ad-formats input:checked")].map((x) => x.value) };
    let job_id;
    try {
      ({ job_id } = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ type: "ad", request: req }) }));
    } catch (err) {
      // the product could not be separated cleanly (or the box/point is off): show the cut-out to fix
      if (/product_box|product_point|separated cleanly/.test(err.message)) {
        status.textContent = err.message;
        await showCutout(id).catch(() => {});
        return;
      }
      throw err;
    }
    await follow(job_id, $("#ad-bar"), status);
    const job = await api(`/v1/jobs/${job_id}`);
    if (job.status !== "succeeded") throw new Error(job.error || job.status);
    out.innerHTML = "";
    for (const file of job.files) {
      if (file.kind === "png") out.append(figure(file, job));
      else if (file.kind === "html") out.lastChild.append(el("a", { href: file.url, target: "_blank" }, " HTML"));
      else if (file.kind === "zip") out.append(el("a", { href: file.url, download: "" }, "Download all (zip)"));
    }
  } catch (err) { status.textContent = "error: " + err.message; }
});

// ------------------------------------------------------------------------------- gallery, queue, models
async function loadGallery() {
  const out = $("#gallery-out");
  out.innerHTML = "";
  const { jobs } = await api("/v1/jobs?status=succeeded&limit=60");
  for (const job of jobs) job.files.filter((f) => f.kind !== "html" && f.kind !== "zip").forEach((f) => out.append(figure(f, job)));
}

async function loadQueue() {
  const table = $("#queue-table");
  const state = await api("/v1/queue");
  const line = $("#queue-state");
  const toggle = el("button", { type: "button", id: "queue-toggle", onclick: async () => {
    try { await api(state.paused ? "/v1/queue/resume" : "/v1/queue/pause", { method: "POST" }); }
    catch (err) { line.append(" (" + err.message + ")"); return; }  // e.g. not an admin
    loadQueue();
  } }, state.paused ? "Resume queue" : "Pause queue");
  line.replaceChildren(state.paused
    ? `Paused by ${state.changed_by}${state.reason ? ": " + state.reason : ""}: new jobs wait; running jobs finish. `
    : "Queue running. ", toggle);
  table.innerHTML = "";
  table.append(el("tr", {}, ...["job", "type", "status", "progress", ""].map((h) => el("th", {}, h))));
  const { jobs } = await api("/v1/jobs?limit=100");
  for (const job of jobs) {
    const cancel = ["queued", "running"].includes(job.status)
      ? el("button", { type: "button", onclick: async () => { await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }); loadQueue(); } }, "Cancel")
      : "";
    table.append(el("tr", {}, el("td", {}, job.id.slice(0, 8)), el("td", {}, job.type), el("td", {}, job.status),
      el("td", {}, Math.round(100 * job.progress) + "%"), el("td", {}, cancel)));
  }
}

async function loadModels() {
  const table = $("#models-table");
  table.innerHTML = "";
  table.append(el("tr", {}, ...["name", "kind", "architecture"].map((h) => el("th", {}, h))));
  const { models } = await api("/v1/models");
  models.forEach((m) => table.append(el("tr", {}, el("td", {}, m.name), el("td", {}, m.kind), el("td", {}, m.arch || ""))));
}

// ------------------------------------------------------------------------------------------------ start
(async () => {
  const deep = document.querySelector(`#tabs button[data-tab="${location.hash.slice(1)}"]`);  // e.g. /#gallery
  if (deep) deep.click();
  try {
    const [{ models }, samplers] = await Promise.all([api("/v1/models"), api("/sdapi/v1/samplers")]);
    $("#gen-model").append(el("option", { value: "" }, "default"),
      ...models.filter((m) => m.kind === "checkpoint").map((m) => el("option", { value: m.name }, m.name)));
    loraNames = models.filter((m) => m.kind === "lora").map((m) => m.name);
    $("#gen-sampler").append(...samplers.map((s) => el("option", { value: s.name }, s.name)));
    $("#gen-sampler").value = "DPM++ 2M";
  } catch (err) { $("#gen-status").textContent = "error: " + err.message; }
})();
