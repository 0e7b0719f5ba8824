// Measures the demo page on a model folder, as a user would use it: headless Chromium
// opens the page on DEVICE, the folder is picked in the page's folder input, a LoRA run
// of a few steps trains on the built-in addition task. Records the model's load time, the
// run's preparation time, each step's time, steps/s, tokens/s, the wasm module's memory
// and the browser processes' peak resident memory (sampled from /proc every 200 ms). The
// run's options come from REFERENCE_JSON (web-demo-reference on the same folder), whose
// losses the browser's must equal within 1e-3 (the exit status says whether they did).
// Writes OUT_DIR/bench-DEVICE.json and OUT_DIR/bench-DEVICE.png.
//
// node bench.mjs URL MODEL_DIR OUT_DIR DEVICE REFERENCE_JSON
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const [url, modelDir, outDir, device, refPath] = process.argv.slice(2);
const ref = JSON.parse(fs.readFileSync(refPath, 'utf8'));
const o = ref.options;
const TOL = 1e-3;
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = Number(process.env.WEB_DEMO_BENCH_TIMEOUT_MS || 3 * 3600 * 1000);

// Resident memory of the browser's processes, by process type, from /proc.
function procs() {
  const out = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      // Chromium rewrites its child processes' titles: the arguments then come space-separated.
      const cmd = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').split(/[\0 ]/);
      const rss = Number((fs.readFileSync(`/proc/${d}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/) || [0, 0])[1]) * 1024;
      const type = (cmd.find((a) => a.startsWith('--type=')) || '--type=browser').slice(7);
      out.push({ pid: Number(d), ppid, cmd: cmd.join(' '), rss, type });
    } catch { /* the process ended */ }
  }
  return out;
}

function browserTree(userDir) {
  const all = procs();
  const root = all.find((p) => p.type === 'browser' && p.cmd.includes(userDir));
  if (!root) return [];
  const tree = [root];
  for (let i = 0; i < tree.length; i++) for (const p of all) if (p.ppid === tree[i].pid) tree.push(p);
  return tree;
}

async function main() {
  fs.mkdirSync(outDir, { recursive: true });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferrotune-web-bench-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: chromiumPath, headless: true, viewport: { width: 1200, height: 900 },
    args: ['--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--enable-unsafe-webgpu'],
  });
  const peak = {};
  const sampler = setInterval(() => {
    const tree = browserTree(dir);
    const by = { total: 0 };
    for (const p of tree) { by[p.type] = (by[p.type] || 0) + p.rss; by.total += p.rss; }
    for (const [k, v] of Object.entries(by)) peak[k] = Math.max(peak[k] || 0, v);
  }, 200);
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('console', (m) => console.log(`  [page ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.log(`  [page exception] ${e.message}`));

  const result = { device, model_dir: modelDir, options: o, rows: ref.rows, reference: { device: ref.device, losses: ref.losses } };
  const t0 = Date.now();
  await page.goto(`${url}?device=${device}&steps=${o.steps}&rank=${o.rank}&seq=${o.sequence_len}` +
    `&batch=${o.micro_batch_size}&rows=${ref.rows}&lr=${o.learning_rate}&seed=${o.seed}`);
  await page.waitForFunction(() => window.demoState && window.demoState.ready, null, { timeout: 120000 });
  result.page_load_ms = Date.now() - t0;
  result.device_used = await page.evaluate(() => window.demoState.device);
  result.device_info = await page.textContent('#device-info');
  // The limits the WGSL backend asks for are the adapter's own (wgsl::context).
  result.adapter_limits = await page.evaluate(async () => {
    const a = navigator.gpu && await navigator.gpu.requestAdapter();
    if (!a) return null;
    const l = a.limits;
    return { maxStorageBufferBindingSize: l.maxStorageBufferBindingSize, maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize, maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension };
  });
  console.log(`device ${result.device_used}: ${result.device_info}; adapter limits ${JSON.stringify(result.adapter_limits)}`);

  // Pick the model folder, as a user does.
  const before = await page.evaluate(() => window.demoState.messages.length);
  await page.setInputFiles('#model-folder', modelDir);
  await page.waitForFunction((n) => window.demoState.messages.slice(n).some((m) => m.kind !== 'info'), before, { timeout: 600000 });
  const loaded = await page.evaluate(() => ({ ms: window.demoState.modelLoadMs, last: window.demoState.messages.at(-1) }));
  result.model_load_ms = loaded.ms;
  result.model_message = loaded.last.text;
  console.log(`model: ${loaded.last.text}`);

  if (loaded.last.kind !== 'error') {
    await page.click('#train');
    await page.waitForFunction(() => window.demoState.done && !window.demoState.training, null, { timeout: TIMEOUT, polling: 1000 });
    const s = await page.evaluate(() => {
      const d = window.demoState;
      return { losses: d.losses, error: d.error, prepareMs: d.prepareMs, stepMs: d.stepMs, stepTokens: d.stepTokens,
        sps: d.stepsPerSecond, tps: d.tokensPerSecond, wasm: d.wasmMemoryBytes, data: document.querySelector('#data-info').textContent };
    });
    Object.assign(result, {
      error: s.error, losses: s.losses, prepare_ms: s.prepareMs, step_ms: s.stepMs, tokens_per_step: s.stepTokens,
      steps_per_second: s.sps, tokens_per_second: s.tps, data: s.data,
    });
    // Steps after the first (which includes compiling the kernels' pipelines).
    if (s.stepMs && s.stepMs.length > 1) {
      const rest = s.stepMs.slice(1).reduce((a, b) => a + b, 0) / 1000;
      result.steady_steps_per_second = (s.stepMs.length - 1) / rest;
      result.steady_tokens_per_second = (s.stepMs.length - 1) * s.stepTokens / rest;
    }
    console.log(s.error ? `error: ${s.error}` : `losses ${JSON.stringify(s.losses)}, step ms ${JSON.stringify(s.stepMs.map(Math.round))}`);
  }
  result.wasm_memory_bytes = await page.evaluate(() => window.demoState.wasmMemoryBytes);
  clearInterval(sampler);
  result.peak_rss_bytes = peak;
  await page.screenshot({ path: path.join(outDir, `bench-${device}.png`), fullPage: true });
  await ctx.close();
  fs.rmSync(dir, { recursive: true, force: true });
  const n = (result.losses || []).length;
  result.max_abs_loss_diff = n === ref.losses.length ? Math.max(...ref.losses.map((r, i) => Math.abs(r - result.losses[i]))) : null;
  fs.writeFileSync(path.join(outDir, `bench-${device}.json`), JSON.stringify(result, null, 2));
  console.log(JSON.stringify(result, null, 2));
  const ok = result.max_abs_loss_diff !== null && result.max_abs_loss_diff <= TOL;
  console.log(ok ? `ok   ${device}: losses equal the native ${ref.device} run's within ${TOL} (max |diff| ${result.max_abs_loss_diff.toExponential(2)})`
    : `FAIL ${device}: ${n} of ${ref.losses.length} steps, losses ${JSON.stringify(result.losses)} vs native ${JSON.stringify(ref.losses)}`);
  process.exit(ok ? 0 : 1);
}

main().catch((e) => { console.error(e); process.exit(1); });
