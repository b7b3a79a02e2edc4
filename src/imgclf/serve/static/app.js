// The upload page: pick or drop an image, POST it to predict, draw the top-k bars.
// Same-origin only (the server's Content-Security-Policy allows nothing else).
"use strict";

const $ = (id) => document.getElementById(id);
let previewUrl = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModel() {
  try {
    const response = await fetch("model");
    const model = await response.json();
    const n = model.labels.length;
    const size = model.preprocessing ? ` · input ${model.preprocessing.input_size}px` : "";
    $("model-info").textContent =
      `${model.name} · ${model.backend} · ${n} classes${size} · id ${model.model_id}`;
    $("topk").max = String(n);
    $("topk").value = String(Math.min(5, n));
  } catch (err) {
    $("model-info").textContent = "the model description could not be loaded";
  }
}

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview").hidden = false;
}

function render(result) {
  $("top1").textContent = result.label;
  $("top1-prob").textContent = `${(100 * result.probability).toFixed(1)} %`;
  const bars = $("bars");
  bars.replaceChildren();
  for (const item of result.top_k) {
    const li = document.createElement("li");
    li.dataset.label = item.label;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = item.label;
    name.title = item.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * item.probability).toFixed(2)}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * item.probability).toFixed(1)} %`;
    li.append(name, bar, pct);
    bars.append(li);
  }
  const image = result.image || {};
  const notes = (image.notes || []).join("; ");
  $("notes").textContent = `${image.format} ${image.width}×${image.height}` + (notes ? ` · ${notes}` : "");
  $("result").hidden = false;
}

async function classify(file) {
  if (!file) return;
  showPreview(file);
  document.body.dataset.state = "busy";
  setStatus(`classifying ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("top_k", $("topk").value || "5");
  try {
    const response = await fetch("predict", { method: "POST", body: form });
    const data = await response.json();
    if (!response.ok) {
      $("result").hidden = true;
      setStatus(`${response.status} ${data.error}: ${data.detail}`, true);
      document.body.dataset.state = "error";
      return;
    }
    render(data);
    setStatus("");
    document.body.dataset.state = "done";
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
    document.body.dataset.state = "error";
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => classify(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    classify(event.dataTransfer.files[0]);
  });
  loadModel();
}

init();
