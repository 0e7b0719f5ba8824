// The demo page: wires the controls to the trainer, which runs in a dedicated worker
// (worker.js, holding the wasm module pkg/ferrotune_web_demo.js), so no training step or
// generation blocks this thread. The worker reports progress after every step; Cancel
// asks it to stop after the current step.

const $ = (id) => document.getElementById(id);
// Read by the browser test; also handy in the console.
const state = window.demoState = { ready: false, training: false, done: false, cancelled: false, losses: [], error: null, device: null, messages: [] };

let haveModel = false;
let haveRun = false;
let busy = false;

// ---- the worker -----------------------------------------------------------------------

const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
const pending = new Map();
let nextId = 1;
let onEvent = () => {};

// A request to the worker; resolves with its value or rejects with its error message.
function call(op, args = {}) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, op, ...args });
  });
}

worker.onmessage = (e) => {
  const m = e.data;
  if (m.event) { onEvent(m); return; }
  const p = pending.get(m.id);
  if (!p) return;
  pending.delete(m.id);
  if (m.ok) p.resolve(m.value); else p.reject(new Error(m.error));
};
// The worker's script failed to load or threw outside a request: fail whatever waits.
worker.onerror = (e) => {
  e.preventDefault();
  const why = e.message || 'the worker script could not be loaded';
  for (const p of pending.values()) p.reject(new Error(`The trainer stopped: ${why}. Reload the page.`));
  pending.clear();
};

function message(text, kind = 'info') {
  const m = $('message');
  m.textContent = text;
  m.className = kind;
  state.messages.push({ kind, text });
  if (kind === 'error') state.error = text;
  console.log(`[${kind}] ${text}`);
}

function errorText(e) {
  return (e && e.message) ? e.message : String(e);
}

function setBusy(b) {
  busy = b;
  for (const id of ['train', 'use-bundled', 'model-files', 'model-folder', 'data-file', 'generate', 'device']) $(id).disabled = b;
  $('cancel').disabled = !b;
}

// ---- device -------------------------------------------------------------------------

async function openDevice(name) {
  try {
    const d = await call('openDevice', { name });
    state.device = name;
    $('device').value = name;
    // A WebGPU adapter of device type Cpu (Chromium's SwiftShader without a GPU driver)
    // runs every kernel on the CPU: the wasm CPU device is faster there (14x for
    // SmolLM2-135M, 35x for the bundled model; docs/benchmarks.md).
    const emulated = name === 'webgpu' && /\(BrowserWebGpu, Cpu,/.test(d.info);
    $('device-info').textContent = d.info + (emulated
      ? ' — a CPU implementation of WebGPU (no GPU driver in use): the CPU device trains faster here' : '');
    return true;
  } catch (e) {
    return errorText(e);
  }
}

const NO_GPU = 'no navigator.gpu';

async function chooseDevice(wanted) {
  // Without WebGPU on the page the worker is not asked (browsers expose it to both or,
  // at most, to the page only).
  const r = wanted === 'webgpu' && !navigator.gpu ? NO_GPU : await openDevice(wanted);
  if (r === true) return;
  if (wanted === 'webgpu') {
    const why = r === NO_GPU ? 'this browser does not expose navigator.gpu' : r;
    message(`WebGPU is not available (${why}). Training runs on the CPU instead (slower). ` +
      'For WebGPU use Chrome or Edge 113+ (on Linux start Chromium with --enable-unsafe-webgpu), ' +
      'or Firefox with dom.webgpu.enabled.', 'error');
    const c = await openDevice('cpu');
    if (c !== true) message(`No device could be opened: ${c}`, 'error');
  } else {
    message(`The ${wanted} device could not be opened: ${r}`, 'error');
  }
}

$('device').addEventListener('change', async () => {
  if (busy) return;
  setBusy(true);
  try { await chooseDevice($('device').value); } finally { setBusy(false); }
});

// ---- model --------------------------------------------------------------------------

async function useBundled() {
  try {
    const r = await call('bundled');
    haveModel = true;
    $('model-info').textContent = r.model;
    return true;
  } catch (e) {
    message(`The bundled model could not be loaded: ${errorText(e)}`, 'error');
    return false;
  }
}

async function loadModelFiles(files) {
  if (busy) return;
  const byName = {};
  for (const f of files) byName[f.name] = f;
  const known = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'];
  if (!known.some((n) => byName[n])) {
    const names = Object.keys(byName).join(', ') || 'nothing';
    message(`No model files among the dropped ones (${names}). Expected config.json, model.safetensors and tokenizer.json. The model in use is unchanged.`, 'error');
    return;
  }
  if (byName['model.safetensors.index.json'] && !byName['model.safetensors']) {
    message('Sharded weights (model.safetensors.index.json) are not supported in the browser; save the model as one model.safetensors. The model in use is unchanged.', 'error');
    return;
  }
  setBusy(true);
  try {
    const name = (files[0].webkitRelativePath || '').split('/')[0] || 'dropped model';
    message(`Reading ${name}…`, 'info');
    const model = {};
    for (const n of known) if (byName[n]) model[n] = byName[n];
    const r = await call('loadModel', { name, files: model });
    haveModel = true;
    state.modelLoadMs = r.loadMs;
    noteMemory(r.memoryBytes);
    $('model-info').textContent = r.model;
    const took = r.loadMs < 1000 ? `${r.loadMs.toFixed(0)} ms` : `${(r.loadMs / 1000).toFixed(1)} s`;
    message(`Model loaded in ${took}: ${r.model}`, 'ok');
  } catch (e) {
    message(`${errorText(e)}\nThe model in use is unchanged.`, 'error');
  } finally {
    setBusy(false);
  }
}

$('use-bundled').addEventListener('click', async () => {
  if (busy) return;
  setBusy(true);
  try { if (await useBundled()) message('Using the bundled tiny model.', 'ok'); } finally { setBusy(false); }
});
$('model-files').addEventListener('change', (e) => loadModelFiles([...e.target.files]));
$('model-folder').addEventListener('change', (e) => loadModelFiles([...e.target.files]));

async function entriesToFiles(items) {
  const out = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      out.push(await new Promise((res, rej) => entry.file(res, rej)));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      const list = await new Promise((res, rej) => reader.readEntries(res, rej));
      for (const e of list) await walk(e);
    }
  };
  for (const it of items) {
    const e = it.webkitGetAsEntry && it.webkitGetAsEntry();
    if (e) await walk(e);
  }
  return out;
}

const drop = $('model-drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', async (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  if (busy) return;
  let files = await entriesToFiles([...e.dataTransfer.items]);
  if (files.length === 0) files = [...e.dataTransfer.files];
  await loadModelFiles(files);
});

// ---- training -----------------------------------------------------------------------

// Sequence length and micro-batch size: 128 and 2, or `?seq=` and `?batch=` in the URL.
const query = new URLSearchParams(location.search);
const sequenceLen = Math.floor(Number(query.get('seq') || 128));
const microBatch = Math.floor(Number(query.get('batch') || 2));

// The WebAssembly module's linear memory in the worker (it only grows), the peak kept in
// the state.
function noteMemory(bytes) {
  if (bytes) state.wasmMemoryBytes = Math.max(state.wasmMemoryBytes || 0, bytes);
}

function readOptions() {
  const num = (id) => Number($(id).value);
  const o = {
    rank: num('rank'), learning_rate: Number($('lr').value), steps: num('steps'), seed: num('seed'),
    sequence_len: sequenceLen, micro_batch_size: microBatch,
  };
  for (const [k, v] of Object.entries(o)) {
    if (!Number.isFinite(v) || v < 0 || (k !== 'seed' && v <= 0)) throw new Error(`${k}: ${$(k === 'learning_rate' ? 'lr' : k).value} is not a valid positive number`);
  }
  for (const k of ['rank', 'steps', 'seed']) o[k] = Math.floor(o[k]);
  return o;
}

// A rate with three significant digits (a large model on a CPU-emulated GPU makes well
// under one step per second).
function rate(v) {
  return v >= 100 ? v.toFixed(0) : v.toPrecision(3);
}

function drawChart(losses, total) {
  const c = $('chart');
  const g = c.getContext('2d');
  const W = c.width, H = c.height, L = 48, B = 28, T = 12, R = 12;
  g.clearRect(0, 0, W, H);
  g.fillStyle = '#fff'; g.fillRect(0, 0, W, H);
  g.strokeStyle = '#c9ced8'; g.lineWidth = 1;
  g.strokeRect(L, T, W - L - R, H - T - B);
  g.fillStyle = '#5a6270'; g.font = '11px system-ui, sans-serif';
  if (losses.length === 0) { g.fillText('loss per step appears here', L + 10, T + 20); return; }
  const hi = Math.max(...losses), lo = Math.min(0, ...losses);
  const n = Math.max(total, losses.length, 2);
  const x = (i) => L + (W - L - R) * (i / (n - 1));
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / ((hi - lo) || 1));
  for (let k = 0; k <= 4; k++) {
    const v = lo + (hi - lo) * k / 4;
    g.fillText(v.toFixed(2), 4, y(v) + 4);
  }
  g.fillText('step', W - R - 28, H - 8);
  g.fillText('1', L, H - 8);
  g.fillText(String(n), W - R - 60, H - 8);
  g.strokeStyle = '#3b6fd8'; g.lineWidth = 2; g.beginPath();
  losses.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
  g.stroke();
  g.fillStyle = '#3b6fd8';
  losses.forEach((v, i) => { g.beginPath(); g.arc(x(i), y(v), 2.5, 0, 7); g.fill(); });
}

function datasetInput() {
  if (document.querySelector('input[name=data]:checked').value === 'addition') {
    return { rows: Math.max(1, Math.floor(Number($('rows').value) || 64)) };
  }
  const f = $('data-file').files[0];
  if (!f) throw new Error('No dataset file chosen: pick a .jsonl file, or choose the built-in addition task.');
  return { file: f };
}

function onProgress(m) {
  if (m.event === 'prepared') {
    state.prepareMs = m.prepareMs;
    noteMemory(m.memoryBytes);
    $('data-info').textContent = `${m.trainSamples} training samples, ${m.trainableParameters.toLocaleString()} trainable parameters`;
    message(`Training ${m.totalSteps} steps on ${state.device}…`, 'info');
  } else if (m.event === 'progress') {
    state.losses.push(m.loss);
    state.stepMs.push(m.stepMs);
    state.stepWindows.push({ start: m.start, end: m.end });
    state.stepTokens = m.tokens;
    state.stepsPerSecond = m.stepsPerSecond;
    state.tokensPerSecond = m.tokensPerSecond;
    noteMemory(m.memoryBytes);
    $('stat-step').textContent = `${m.step} / ${m.totalSteps}`;
    $('stat-loss').textContent = m.loss.toFixed(4);
    $('stat-tps').textContent = rate(m.tokensPerSecond);
    $('stat-sps').textContent = rate(m.stepsPerSecond);
    drawChart(state.losses, m.totalSteps);
    if (!cancelRequested) $('status').textContent = `step ${m.step}`;
  }
}

let cancelRequested = false;

async function train() {
  if (busy) return;
  if (!haveModel) { message('No model: use the bundled one or drop a model folder first.', 'error'); return; }
  setBusy(true);
  cancelRequested = false;
  Object.assign(state, { training: true, done: false, cancelled: false, error: null, losses: [], stepMs: [], stepWindows: [] });
  $('download').disabled = true;
  drawChart([], 1);
  try {
    const options = readOptions();
    const dataset = datasetInput();
    $('status').textContent = 'preparing…';
    haveRun = false;
    onEvent = onProgress;
    const r = await call('train', { options, dataset });
    haveRun = r.steps > 0;
    state.cancelled = r.cancelled;
    noteMemory(r.memoryBytes);
    if (r.cancelled) {
      message(`Cancelled after ${r.steps} steps; the adapter so far can be tried and downloaded.`, 'info');
    } else {
      message(`Done: ${r.steps} steps, loss ${r.losses[0].toFixed(4)} → ${r.losses.at(-1).toFixed(4)}.`, 'ok');
    }
    if (haveRun) {
      state.adapterBytes = r.adapterBytes;
      $('stat-size').textContent = `${(r.adapterBytes / 1024).toFixed(1)} KiB`;
      $('download').disabled = false;
    }
    $('status').textContent = r.cancelled ? 'cancelled' : 'done';
  } catch (e) {
    message(`${errorText(e)}`, 'error');
    $('status').textContent = 'failed';
    // A run that failed after some steps keeps its adapter so far.
    haveRun = state.losses.length > 0;
    $('download').disabled = !haveRun;
  } finally {
    onEvent = () => {};
    state.done = true;
    state.training = false;
    setBusy(false);
  }
}

$('train').addEventListener('click', train);
$('cancel').addEventListener('click', () => {
  if (!state.training || cancelRequested) return;
  cancelRequested = true;
  $('status').textContent = 'cancelling after this step…';
  call('cancel');
});

// ---- adapter download and generation -----------------------------------------------

function save(bytes, name, type) {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([bytes], { type }));
  a.download = name;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

$('download').addEventListener('click', async () => {
  if (!haveRun || busy) return;
  try {
    const f = await call('adapterFiles');
    save(f.weights, 'adapter_model.safetensors', 'application/octet-stream');
    save(f.config, 'adapter_config.json', 'application/json');
  } catch (e) {
    message(errorText(e), 'error');
  }
});

$('generate').addEventListener('click', async () => {
  if (busy || !haveModel) return;
  setBusy(true);
  const prompt = $('prompt').value;
  $('out-base').textContent = '…';
  $('out-adapter').textContent = haveRun ? '…' : '(train first)';
  try {
    const r = await call('generate', { prompt, maxNewTokens: 16 });
    $('out-base').textContent = r.base;
    if (r.adapter !== null) $('out-adapter').textContent = r.adapter;
    state.generated = { base: $('out-base').textContent, adapter: $('out-adapter').textContent };
  } catch (e) {
    message(errorText(e), 'error');
  } finally {
    setBusy(false);
  }
});

// ---- start --------------------------------------------------------------------------

async function start() {
  try {
    const r = await call('init');
    haveModel = true;
    noteMemory(r.memoryBytes);
    $('model-info').textContent = r.model;
  } catch (e) {
    message(`The WebAssembly module could not be loaded: ${errorText(e)}. Build it with web-demo/build.sh.`, 'error');
    return;
  }
  const q = new URLSearchParams(location.search);
  for (const k of ['rank', 'lr', 'steps', 'seed', 'rows']) if (q.has(k)) $(k).value = q.get(k);
  message('Ready: press Train to fine-tune the bundled model on the addition task.', 'info');
  await chooseDevice(q.get('device') || 'webgpu');
  drawChart([], 1);
  state.ready = true;
  state.loadMs = performance.now();
}

start();
