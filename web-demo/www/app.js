// The demo page: wires the controls to the wasm module (pkg/ferrotune_web_demo.js).
// Training steps are awaited one by one with a yield to the event loop between them, so
// the page stays responsive and Cancel takes effect after the current step.
import init, { Device, WebModel, WebRun } from './pkg/ferrotune_web_demo.js';

const $ = (id) => document.getElementById(id);
// Read by the browser test; also handy in the console.
const state = window.demoState = { ready: false, training: false, done: false, losses: [], error: null, device: null, messages: [] };

let model = null;
let wasmMemory = null;
let run = null;
let cancelRequested = false;
let busy = false;

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
    const d = await Device.open(name);
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

async function chooseDevice(wanted) {
  const r = await openDevice(wanted);
  if (r === true) return;
  if (wanted === 'webgpu') {
    const why = navigator.gpu ? r : 'this browser does not expose navigator.gpu';
    message(`WebGPU is not available (${why}). Training runs on the CPU instead (slower). ` +
      'For WebGPU use Chrome or Edge 113+ (on Linux start Chromium with --enable-unsafe-webgpu), ' +
      'or Firefox with dom.webgpu.enabled.', 'error');
    const c = await openDevice('cpu');
    if (c !== true) message(`No device could be opened: ${c}`, 'error');
  } else {
    message(`The ${wanted} device could not be opened: ${r}`, 'error');
  }
}

$('device').addEventListener('change', () => chooseDevice($('device').value));

// ---- model --------------------------------------------------------------------------

function useBundled() {
  try {
    model = WebModel.bundled();
    $('model-info').textContent = model.describe();
    return true;
  } catch (e) {
    message(`The bundled model could not be loaded: ${errorText(e)}`, 'error');
    return false;
  }
}

async function loadModelFiles(files) {
  const byName = {};
  for (const f of files) byName[f.name] = f;
  const bytes = async (n) => byName[n] ? new Uint8Array(await byName[n].arrayBuffer()) : undefined;
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
  const t0 = performance.now();
  try {
    const name = (files[0].webkitRelativePath || '').split('/')[0] || 'dropped model';
    message(`Reading ${name}…`, 'info');
    const m = WebModel.fromFiles(name, await bytes('config.json'), await bytes('model.safetensors'),
      await bytes('tokenizer.json'), await bytes('tokenizer_config.json'));
    model = m;
    state.modelLoadMs = performance.now() - t0;
    noteMemory();
    $('model-info').textContent = model.describe();
    const took = state.modelLoadMs < 1000 ? `${state.modelLoadMs.toFixed(0)} ms` : `${(state.modelLoadMs / 1000).toFixed(1)} s`;
    message(`Model loaded in ${took}: ${model.describe()}`, 'ok');
  } catch (e) {
    message(`${errorText(e)}\nThe model in use is unchanged.`, 'error');
  }
}

$('use-bundled').addEventListener('click', () => { if (useBundled()) message('Using the bundled tiny model.', 'ok'); });
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

// The WebAssembly module's linear memory (it only grows), the peak kept in the state.
function noteMemory() {
  if (!wasmMemory) return;
  state.wasmMemoryBytes = Math.max(state.wasmMemoryBytes || 0, wasmMemory.buffer.byteLength);
}

function options() {
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

async function datasetInput() {
  if (document.querySelector('input[name=data]:checked').value === 'addition') {
    return { name: undefined, bytes: undefined, rows: Math.max(1, Math.floor(Number($('rows').value) || 64)) };
  }
  const f = $('data-file').files[0];
  if (!f) throw new Error('No dataset file chosen: pick a .jsonl file, or choose the built-in addition task.');
  return { name: f.name, bytes: new Uint8Array(await f.arrayBuffer()), rows: 0 };
}

async function train() {
  if (busy) return;
  if (!model) { message('No model: use the bundled one or drop a model folder first.', 'error'); return; }
  setBusy(true);
  cancelRequested = false;
  state.training = true; state.done = false; state.error = null; state.losses = [];
  $('download').disabled = true;
  drawChart([], 1);
  try {
    const o = options();
    const d = await datasetInput();
    $('status').textContent = 'preparing…';
    run = null;
    const tPrepare = performance.now();
    run = await WebRun.create(model, d.name, d.bytes, d.rows, JSON.stringify(o), state.device);
    state.prepareMs = performance.now() - tPrepare;
    state.stepMs = [];
    noteMemory();
    $('data-info').textContent = `${run.trainSamples} training samples, ${run.trainableParameters.toLocaleString()} trainable parameters`;
    message(`Training ${run.totalSteps} steps on ${state.device}…`, 'info');
    const t0 = performance.now();
    let tokens = 0;
    for (;;) {
      const tStep = performance.now();
      if (cancelRequested) { message(`Cancelled after ${state.losses.length} steps; the adapter so far can be tried and downloaded.`, 'info'); break; }
      const text = await run.step();
      if (text === undefined || text === null) { message(`Done: ${state.losses.length} steps, loss ${state.losses[0].toFixed(4)} → ${state.losses.at(-1).toFixed(4)}.`, 'ok'); break; }
      const r = JSON.parse(text);
      state.stepMs.push(performance.now() - tStep);
      state.stepTokens = r.tokens;
      noteMemory();
      state.losses.push(r.loss);
      tokens += r.tokens;
      const secs = (performance.now() - t0) / 1000;
      $('stat-step').textContent = `${r.step} / ${r.total_steps}`;
      $('stat-loss').textContent = r.loss.toFixed(4);
      $('stat-tps').textContent = rate(tokens / secs);
      $('stat-sps').textContent = rate(r.step / secs);
      state.stepsPerSecond = r.step / secs;
      state.tokensPerSecond = tokens / secs;
      drawChart(state.losses, r.total_steps);
      $('status').textContent = `step ${r.step}`;
      await new Promise((res) => setTimeout(res, 0));
    }
    if (state.losses.length > 0) {
      const w = await run.adapterWeights();
      state.adapterBytes = w.length;
      $('stat-size').textContent = `${(w.length / 1024).toFixed(1)} KiB`;
      $('download').disabled = false;
    }
    $('status').textContent = cancelRequested ? 'cancelled' : 'done';
    state.done = true;
  } catch (e) {
    message(`${errorText(e)}`, 'error');
    $('status').textContent = 'failed';
    state.done = true;
    if (state.losses.length === 0) run = null;
  } finally {
    state.training = false;
    setBusy(false);
  }
}

$('train').addEventListener('click', train);
$('cancel').addEventListener('click', () => { cancelRequested = true; $('status').textContent = 'cancelling after this step…'; });

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
  if (!run || busy) return;
  try {
    save(await run.adapterWeights(), 'adapter_model.safetensors', 'application/octet-stream');
    save(await run.adapterConfig(), 'adapter_config.json', 'application/json');
  } catch (e) {
    message(errorText(e), 'error');
  }
});

$('generate').addEventListener('click', async () => {
  if (busy || !model) return;
  setBusy(true);
  const prompt = $('prompt').value;
  $('out-base').textContent = '…';
  $('out-adapter').textContent = run ? '…' : '(train first)';
  try {
    $('out-base').textContent = await model.generate(prompt, 16, state.device);
    if (run) $('out-adapter').textContent = await run.generate(prompt, 16);
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
    wasmMemory = (await init()).memory;
  } catch (e) {
    message(`The WebAssembly module could not be loaded: ${errorText(e)}. Build it with web-demo/build.sh.`, 'error');
    return;
  }
  const q = new URLSearchParams(location.search);
  for (const k of ['rank', 'lr', 'steps', 'seed', 'rows']) if (q.has(k)) $(k).value = q.get(k);
  useBundled();
  message('Ready: press Train to fine-tune the bundled model on the addition task.', 'info');
  await chooseDevice(q.get('device') || 'webgpu');
  drawChart([], 1);
  state.ready = true;
  state.loadMs = performance.now();
}

start();
