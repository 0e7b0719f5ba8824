// The trainer, in a dedicated worker so that no step runs on the page's thread: the wasm
// module, the model, the training run and generation all live here, on WebGPU (which
// Chromium exposes to workers) or on the CPU.
//
// The page sends requests {id, op, ...}; each is answered {id, ok: true, value} or
// {id, ok: false, error}. While `train` runs it also posts events {event: 'prepared' |
// 'progress', ...}. `cancel` is answered at once and stops the run after its current
// step: between steps the loop returns to the event loop, which delivers the request.
import init, { Device, WebModel, WebRun } from './pkg/ferrotune_web_demo.js';

let memory = null;
let model = null;
let run = null;
let device = null;
let cancelRequested = false;

const now = () => performance.timeOrigin + performance.now();
const memoryBytes = () => (memory ? memory.buffer.byteLength : 0);
const yieldToEvents = () => new Promise((resolve) => setTimeout(resolve, 0));

const ops = {
  async init() {
    memory = (await init()).memory;
    model = WebModel.bundled();
    return { model: model.describe(), memoryBytes: memoryBytes() };
  },

  async openDevice({ name }) {
    const d = await Device.open(name);
    device = name;
    return { name, info: d.info };
  },

  bundled() {
    model = WebModel.bundled();
    return { model: model.describe() };
  },

  // `files`: {name: File} of the model folder; a missing file is absent.
  async loadModel({ name, files }) {
    const t0 = performance.now();
    const bytes = async (n) => (files[n] ? new Uint8Array(await files[n].arrayBuffer()) : undefined);
    const m = WebModel.fromFiles(name, await bytes('config.json'), await bytes('model.safetensors'),
      await bytes('tokenizer.json'), await bytes('tokenizer_config.json'));
    model = m;
    return { model: m.describe(), loadMs: performance.now() - t0, memoryBytes: memoryBytes() };
  },

  // `dataset`: {file} (a File) or {rows} (the built-in addition task).
  async train({ options, dataset }) {
    cancelRequested = false;
    run = null;
    const tPrepare = performance.now();
    const bytes = dataset.file ? new Uint8Array(await dataset.file.arrayBuffer()) : undefined;
    const r = await WebRun.create(model, dataset.file ? dataset.file.name : undefined, bytes,
      dataset.rows || 0, JSON.stringify(options), device);
    run = r;
    post({
      event: 'prepared', trainSamples: r.trainSamples, trainableParameters: r.trainableParameters,
      totalSteps: Number(r.totalSteps), prepareMs: performance.now() - tPrepare, memoryBytes: memoryBytes(),
    });
    const t0 = performance.now();
    let tokens = 0, steps = 0;
    for (;;) {
      await yieldToEvents();
      if (cancelRequested) break;
      const start = now();
      const text = await r.step();
      if (text === undefined || text === null) break;
      const end = now();
      const report = JSON.parse(text);
      steps++;
      tokens += report.tokens;
      const secs = (performance.now() - t0) / 1000;
      post({
        event: 'progress', step: report.step, totalSteps: report.total_steps, loss: report.loss,
        tokens: report.tokens, start, end, stepMs: end - start,
        tokensPerSecond: tokens / secs, stepsPerSecond: steps / secs, memoryBytes: memoryBytes(),
      });
    }
    const adapterBytes = steps > 0 ? (await r.adapterWeights()).length : 0;
    return { steps, cancelled: cancelRequested, losses: JSON.parse(r.losses()), adapterBytes, memoryBytes: memoryBytes() };
  },

  cancel() {
    cancelRequested = true;
    return true;
  },

  async adapterFiles() {
    if (!run) throw new Error('No adapter yet: train first.');
    const weights = await run.adapterWeights();
    const config = await run.adapterConfig();
    return { weights, config };
  },

  async generate({ prompt, maxNewTokens }) {
    const base = await model.generate(prompt, maxNewTokens, device);
    const adapter = run ? await run.generate(prompt, maxNewTokens) : null;
    return { base, adapter };
  },
};

function post(message) {
  // Large byte arrays move to the page instead of being copied.
  const transfer = message.value && message.value.weights ? [message.value.weights.buffer] : [];
  self.postMessage(message, transfer);
}

self.onmessage = async (e) => {
  const { id, op, ...args } = e.data;
  try {
    if (!ops[op]) throw new Error(`unknown request ${op}`);
    post({ id, ok: true, value: await ops[op](args) });
  } catch (err) {
    post({ id, ok: false, error: (err && err.message) ? err.message : String(err) });
  }
};
