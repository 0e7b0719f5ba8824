// Drives the demo page in headless Chromium: bad inputs give messages and leave the page
// usable, a bundled-model run on DEVICE trains (in the page's worker, the page's thread
// ticking throughout) with the losses of the native reference run, the adapter downloads,
// and generation with and without it works. Then a page without navigator.gpu falls back
// to the CPU device, where a run is cancelled after its first step and ShareGPT and
// alpaca files train with the native losses. Reads OUT_DIR/reference{,-sharegpt,-alpaca}.json
// (web-demo-reference); writes result.json, screenshot.png and adapter/ under OUT_DIR;
// exits non-zero when a check failed.
//
// node browser.mjs URL OUT_DIR DEVICE
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const [url, outDir, device] = process.argv.slice(2);
const readRef = (name) => JSON.parse(fs.readFileSync(path.join(outDir, name), 'utf8'));
const ref = readRef('reference.json');
const fileRefs = { sharegpt: readRef('reference-sharegpt.json'), alpaca: readRef('reference-alpaca.json') };
const TOL = 1e-3;
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const baseArgs = ['--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

let passed = 0, failed = 0;
function check(name, ok, detail = '') {
  if (ok) { passed++; console.log(`ok   ${name}${detail ? ': ' + detail : ''}`); }
  else { failed++; console.log(`FAIL ${name}${detail ? ': ' + detail : ''}`); }
}

async function launch() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferrotune-web-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: chromiumPath, headless: true, acceptDownloads: true,
    viewport: { width: 1200, height: 900 },
    args: [...baseArgs, '--enable-unsafe-webgpu'],
  });
  return { ctx, dir };
}

function logPage(page, tag) {
  page.on('console', (m) => console.log(`  [${tag} ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.log(`  [${tag} exception] ${e.message}`));
  return page;
}

const lastMessage = (page) => page.evaluate(() => window.demoState.messages.at(-1) || { kind: '', text: '' });
const waitDone = (page, timeout) => page.waitForFunction(() => window.demoState.done && !window.demoState.training, null, { timeout });
// Waits for a message of `kind` after the first `since` messages; returns it.
async function nextMessage(page, since, kinds, timeout = 30000) {
  await page.waitForFunction(([n, k]) => window.demoState.messages.slice(n).some((m) => k.includes(m.kind)),
    [since, kinds], { timeout });
  return page.evaluate(([n, k]) => window.demoState.messages.slice(n).find((m) => k.includes(m.kind)), [since, kinds]);
}
const messageCount = (page) => page.evaluate(() => window.demoState.messages.length);

// A page-side timer: every 20 ms it records the time (the same clock as the worker's step
// times). If a step ran on the page's thread, no tick could fall inside it.
const startHeartbeat = (page) => page.evaluate(() => {
  window.heartbeat = [];
  window.heartbeatTimer = setInterval(() => window.heartbeat.push(performance.timeOrigin + performance.now()), 20);
});
// `needLong`: the run's steps are meant to be long enough (100 ms) for the check to bite.
async function checkHeartbeat(page, name, needLong) {
  const h = await page.evaluate(() => {
    clearInterval(window.heartbeatTimer);
    return { ticks: window.heartbeat, steps: window.demoState.stepWindows };
  });
  const { ticks, steps } = h;
  if (steps.length === 0) { check(`${name}: the page's thread kept running during the steps`, false, 'no steps'); return; }
  // The gaps between ticks from the first step's start to the last step's end.
  const t0 = steps[0].start, t1 = steps.at(-1).end;
  const inRun = ticks.filter((t) => t >= t0 && t <= t1);
  let maxGap = 0;
  for (let i = 1; i < inRun.length; i++) maxGap = Math.max(maxGap, inRun[i] - inRun[i - 1]);
  if (inRun.length) maxGap = Math.max(maxGap, inRun[0] - t0, t1 - inRun.at(-1));
  else maxGap = t1 - t0;
  // Steps long enough for several ticks must each contain one.
  const long = steps.filter((s) => s.end - s.start >= 100);
  const blocked = long.filter((s) => !ticks.some((t) => t > s.start && t < s.end));
  const longest = Math.max(...steps.map((s) => s.end - s.start));
  check(`${name}: the page's thread kept running during the steps`,
    (long.length > 0 || !needLong) && blocked.length === 0 && maxGap < 1000,
    `${long.length} steps of 100 ms or more (longest ${longest.toFixed(0)} ms), ${blocked.length} without a tick; ` +
    `longest pause between ticks ${maxGap.toFixed(0)} ms (bound 1000)`);
}

const compareLosses = (name, got, want) => {
  const n = Math.min(got.length, want.length);
  const worst = n ? Math.max(...want.slice(0, n).map((r, i) => Math.abs(r - got[i]))) : Infinity;
  check(`${name}: losses equal the native run within ${TOL}`,
    got.length === want.length && got.every(Number.isFinite) && worst <= TOL,
    `${got.length} steps, ${JSON.stringify(got.map((l) => +l.toFixed(4)))}, max |diff| ${worst.toExponential(2)}`);
};

async function main() {
  fs.mkdirSync(outDir, { recursive: true });
  const result = { device, reference: ref };
  const { ctx } = await launch();
  const page = logPage(ctx.pages()[0] || await ctx.newPage(), 'page');
  const q = `?device=${device}&steps=${ref.options.steps}&rank=${ref.options.rank}` +
    `&lr=${ref.options.learning_rate}&seed=${ref.options.seed}&rows=${ref.rows}`;
  const t0 = Date.now();
  await page.goto(url + q);
  await page.waitForFunction(() => window.demoState && window.demoState.ready, null, { timeout: 120000 });
  result.load_ms = Date.now() - t0;
  result.device_info = await page.textContent('#device-info');
  const used = await page.evaluate(() => window.demoState.device);
  check('page loads and opens the device', used === device, `${used}: ${result.device_info}, ${result.load_ms} ms`);

  // A model folder with files missing: a message, the bundled model stays in use.
  let before = await messageCount(page);
  await page.setInputFiles('#model-files', [{ name: 'config.json', mimeType: 'application/json', buffer: Buffer.from('{}') }]);
  let m = await nextMessage(page, before, ['error', 'ok']);
  check('missing model files are reported', /missing model\.safetensors, tokenizer\.json/.test(m.text), m.text.split('\n')[0]);
  // An unsupported weights file.
  before = await messageCount(page);
  await page.setInputFiles('#model-files', [
    { name: 'config.json', mimeType: 'application/json', buffer: fs.readFileSync(new URL('../model/config.json', import.meta.url)) },
    { name: 'model.safetensors', mimeType: 'application/octet-stream', buffer: Buffer.from('this is not a safetensors file') },
    { name: 'tokenizer.json', mimeType: 'application/json', buffer: fs.readFileSync(new URL('../model/tokenizer.json', import.meta.url)) },
  ]);
  m = await nextMessage(page, before, ['error', 'ok']);
  check('an unreadable model.safetensors is reported', m.kind === 'error' && /not a safetensors file/.test(m.text), m.text.split('\n')[0]);

  // A config.json of an architecture that is not supported.
  const modelFile = (n) => fs.readFileSync(new URL(`../model/${n}`, import.meta.url));
  const mamba = JSON.parse(modelFile('config.json'));
  mamba.architectures = ['MambaForCausalLM'];
  mamba.model_type = 'mamba';
  before = await messageCount(page);
  await page.setInputFiles('#model-files', [
    { name: 'config.json', mimeType: 'application/json', buffer: Buffer.from(JSON.stringify(mamba)) },
    { name: 'model.safetensors', mimeType: 'application/octet-stream', buffer: modelFile('model.safetensors') },
    { name: 'tokenizer.json', mimeType: 'application/json', buffer: modelFile('tokenizer.json') },
  ]);
  m = await nextMessage(page, before, ['error', 'ok']);
  check('an unsupported architecture is reported with what to do',
    m.kind === 'error' && /config\.json: unsupported architecture MambaForCausalLM; supported architectures: .*LlamaForCausalLM/.test(m.text) &&
    /To fix: pick the folder of a model of a supported architecture/.test(m.text) && /model in use is unchanged/.test(m.text), m.text);
  // A tokenizer.json that does not parse.
  before = await messageCount(page);
  await page.setInputFiles('#model-files', [
    { name: 'config.json', mimeType: 'application/json', buffer: modelFile('config.json') },
    { name: 'model.safetensors', mimeType: 'application/octet-stream', buffer: modelFile('model.safetensors') },
    { name: 'tokenizer.json', mimeType: 'application/json', buffer: Buffer.from('{"version": "1.0", "model": ') },
  ]);
  m = await nextMessage(page, before, ['error', 'ok']);
  check('a tokenizer.json that does not parse is reported with what to do',
    m.kind === 'error' && /^tokenizer\.json: not a Hugging Face tokenizer\.json/.test(m.text) &&
    /To fix: use the tokenizer\.json saved with the model/.test(m.text) && /model in use is unchanged/.test(m.text), m.text);

  // A model folder picked as a folder (the bundled model's), then back to the bundled model.
  before = await messageCount(page);
  await page.setInputFiles('#model-folder', fileURLToPath(new URL('../model', import.meta.url)));
  m = await nextMessage(page, before, ['error', 'ok']);
  check('then a picked model folder loads', /Model loaded in .*: model: 2 layers, hidden 64/.test(m.text), m.text);
  before = await messageCount(page);
  await page.click('#use-bundled');
  m = await nextMessage(page, before, ['error', 'ok']);
  check('the bundled model is back in use', /bundled/.test(m.text) && /ferrotune-tiny-llama/.test(await page.textContent('#model-info')), m.text);

  // A dataset line that does not parse.
  await page.check('input[name=data][value=file]');
  await page.setInputFiles('#data-file', [{ name: 'bad.jsonl', mimeType: 'application/jsonl',
    buffer: Buffer.from('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n{"messages": [oops\n') }]);
  await page.click('#train');
  await waitDone(page, 60000);
  m = await lastMessage(page);
  check('a malformed dataset line is reported with its line number', m.kind === 'error' && /bad\.jsonl:2/.test(m.text), m.text);

  // The page is still usable: train the bundled model on the addition task.
  await page.check('input[name=data][value=addition]');
  await startHeartbeat(page);
  await page.click('#train');
  await waitDone(page, 600000);
  // On SwiftShader a step takes seconds; the CPU device's steps here may be shorter.
  await checkHeartbeat(page, `training on ${device}`, device === 'webgpu');
  const s = await page.evaluate(() => ({ losses: window.demoState.losses, error: window.demoState.error,
    sps: window.demoState.stepsPerSecond, tps: window.demoState.tokensPerSecond, adapterBytes: window.demoState.adapterBytes }));
  result.losses = s.losses;
  result.steps_per_second = s.sps;
  result.tokens_per_second = s.tps;
  result.adapter_bytes = s.adapterBytes;
  check('training finishes without an error', s.error === null && s.losses.length === ref.losses.length,
    `${s.losses.length} steps, ${s.sps?.toFixed(2)} steps/s, ${s.tps?.toFixed(0)} tokens/s`);
  const n = Math.min(s.losses.length, ref.losses.length);
  const diffs = ref.losses.slice(0, n).map((r, i) => Math.abs(r - s.losses[i]));
  const worst = Math.max(...diffs);
  check(`losses equal the native ${ref.device} run within ${TOL}`, n === ref.losses.length && worst <= TOL, `max |diff| ${worst.toExponential(2)}`);
  const first = s.losses[0], tail = s.losses.slice(-3).reduce((a, b) => a + b, 0) / 3;
  check('the loss fell', tail < first * 0.5, `${first.toFixed(4)} -> mean of last 3 ${tail.toFixed(4)}`);

  // Generation with the base model and with the adapter.
  await page.fill('#prompt', 'What is 12 + 34?');
  await page.click('#generate');
  await page.waitForFunction(() => window.demoState.generated, null, { timeout: 120000 });
  result.generated = await page.evaluate(() => window.demoState.generated);
  check('generation with and without the adapter', typeof result.generated.adapter === 'string' && result.generated.base !== '…',
    JSON.stringify(result.generated));

  // The adapter downloads as PEFT files.
  const adapterDir = path.join(outDir, 'adapter');
  fs.rmSync(adapterDir, { recursive: true, force: true });
  fs.mkdirSync(adapterDir, { recursive: true });
  const names = [];
  const got = new Promise((resolve) => {
    page.on('download', async (d) => {
      await d.saveAs(path.join(adapterDir, d.suggestedFilename()));
      names.push(d.suggestedFilename());
      if (names.length === 2) resolve();
    });
  });
  await page.click('#download');
  await Promise.race([got, new Promise((r) => setTimeout(r, 30000))]);
  check('the adapter downloads', names.sort().join(',') === 'adapter_config.json,adapter_model.safetensors', names.join(', '));

  await page.screenshot({ path: path.join(outDir, 'screenshot.png'), fullPage: true });
  await page.close();

  // A browser without WebGPU, simulated by removing navigator.gpu before the page's
  // scripts run: a message, and the page trains on the CPU device. Sequences of 256 tokens
  // (alpaca's prompt alone is ~180 of the bundled tokenizer's byte tokens).
  const o = fileRefs.sharegpt.options;
  const cpu = logPage(await ctx.newPage(), 'no-gpu page');
  await cpu.addInitScript(() => { delete Navigator.prototype.gpu; });
  await cpu.goto(`${url}?device=webgpu&seq=${o.sequence_len}&batch=${o.micro_batch_size}&rank=${o.rank}` +
    `&lr=${o.learning_rate}&seed=${o.seed}&steps=200&rows=64`);
  await cpu.waitForFunction(() => window.demoState && window.demoState.ready, null, { timeout: 120000 });
  const st = await cpu.evaluate(() => ({ gpu: 'gpu' in navigator, device: window.demoState.device, err: window.demoState.error }));
  check('without navigator.gpu the page says so and uses the CPU',
    !st.gpu && st.device === 'cpu' && /WebGPU is not available \(this browser does not expose navigator\.gpu\)/.test(st.err || ''), st.err || '');

  // A long run on the CPU device, cancelled after its first step; the page's thread keeps
  // ticking while the worker trains.
  await startHeartbeat(cpu);
  await cpu.click('#train');
  await cpu.waitForFunction(() => window.demoState.losses.length >= 1, null, { timeout: 120000 });
  await cpu.click('#cancel');
  await waitDone(cpu, 120000);
  await checkHeartbeat(cpu, 'training on the CPU device', true);
  const c = await cpu.evaluate(() => ({ steps: window.demoState.losses.length, cancelled: window.demoState.cancelled,
    error: window.demoState.error, status: document.querySelector('#status').textContent,
    last: window.demoState.messages.at(-1).text, download: !document.querySelector('#download').disabled }));
  result.cancelled_after_steps = c.steps;
  check('Cancel stops the run after the current step and says so',
    c.cancelled && c.steps >= 1 && c.steps < 200 && c.status === 'cancelled' && c.last === `Cancelled after ${c.steps} steps; the adapter so far can be tried and downloaded.` && c.download,
    `${c.steps} of 200 steps; status ${c.status}; ${c.last}`);

  // A dataset in no known format, then ShareGPT (with a byte order mark) and alpaca files:
  // the page is still usable and trains them as natively.
  await cpu.check('input[name=data][value=file]');
  await cpu.fill('#steps', String(o.steps));
  await cpu.setInputFiles('#data-file', [{ name: 'qa.jsonl', mimeType: 'application/jsonl',
    buffer: Buffer.from('{"question": "What is 2 + 2?", "answer": "4"}\n') }]);
  await cpu.click('#train');
  await waitDone(cpu, 60000);
  m = await lastMessage(cpu);
  check('a dataset in no known format is reported with the formats it could be in',
    m.kind === 'error' && /qa\.jsonl:1: no known dataset format \(the first row has `question`, `answer`\); rows need `messages` \(chat\), `conversations` \(ShareGPT\)/.test(m.text), m.text);
  for (const [name, what] of [['sharegpt', 'a ShareGPT file'], ['alpaca', 'an alpaca file']]) {
    await cpu.setInputFiles('#data-file', fileURLToPath(new URL(`data/${name}.jsonl`, import.meta.url)));
    await cpu.click('#train');
    await waitDone(cpu, 120000);
    const r = await cpu.evaluate(() => ({ losses: window.demoState.losses, error: window.demoState.error,
      cancelled: window.demoState.cancelled, data: document.querySelector('#data-info').textContent }));
    result[`${name}_losses`] = r.losses;
    check(`${what} trains on the CPU device`, r.error === null && !r.cancelled && r.losses.length === o.steps, `${r.data}; ${r.error || 'no error'}`);
    compareLosses(what, r.losses, fileRefs[name].losses);
  }
  await cpu.screenshot({ path: path.join(outDir, 'screenshot-cpu.png'), fullPage: true });
  await ctx.close();

  fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify(result, null, 2));
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => { console.error(e); console.log(`${passed} passed, ${failed + 1} failed`); process.exit(1); });
