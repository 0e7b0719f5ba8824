// Drives the demo page in headless Chromium: bad inputs give messages and leave the page
// usable, a bundled-model run trains with the losses of the native reference run, the
// adapter downloads, and generation with and without it works. Writes result.json,
// screenshot.png and adapter/ under OUT_DIR; exits non-zero on the first failed check.
//
// node browser.mjs URL REFERENCE_JSON OUT_DIR DEVICE
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const [url, refPath, outDir, device] = process.argv.slice(2);
const ref = JSON.parse(fs.readFileSync(refPath, 'utf8'));
const TOL = 1e-3;
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const baseArgs = ['--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

let passed = 0, failed = 0;
function check(name, ok, detail = '') {
  if (ok) { passed++; console.log(`ok   ${name}${detail ? ': ' + detail : ''}`); }
  else { failed++; console.log(`FAIL ${name}${detail ? ': ' + detail : ''}`); }
}

async function launch(webgpu) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferrotune-web-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: chromiumPath, headless: true, acceptDownloads: true,
    viewport: { width: 1200, height: 900 },
    args: webgpu ? [...baseArgs, '--enable-unsafe-webgpu'] : baseArgs,
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('console', (m) => console.log(`  [page ${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => console.log(`  [page exception] ${e.message}`));
  return { ctx, page, dir };
}

const lastMessage = (page) => page.evaluate(() => window.demoState.messages.at(-1) || { kind: '', text: '' });
const waitDone = (page, timeout) => page.waitForFunction(() => window.demoState.done && !window.demoState.training, null, { timeout });

async function main() {
  fs.mkdirSync(outDir, { recursive: true });
  const result = { device, reference: ref };
  const { ctx, page } = await launch(true);
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
  await page.setInputFiles('#model-files', [{ name: 'config.json', mimeType: 'application/json', buffer: Buffer.from('{}') }]);
  await page.waitForFunction(() => window.demoState.messages.at(-1).kind === 'error', null, { timeout: 10000 });
  let m = await lastMessage(page);
  check('missing model files are reported', /missing model\.safetensors, tokenizer\.json/.test(m.text), m.text.split('\n')[0]);
  // An unsupported weights file.
  await page.setInputFiles('#model-files', [
    { name: 'config.json', mimeType: 'application/json', buffer: fs.readFileSync(new URL('../model/config.json', import.meta.url)) },
    { name: 'model.safetensors', mimeType: 'application/octet-stream', buffer: Buffer.from('this is not a safetensors file') },
    { name: 'tokenizer.json', mimeType: 'application/json', buffer: fs.readFileSync(new URL('../model/tokenizer.json', import.meta.url)) },
  ]);
  await page.waitForFunction(() => /safetensors/.test(window.demoState.messages.at(-1).text), null, { timeout: 10000 });
  m = await lastMessage(page);
  check('an unreadable model.safetensors is reported', m.kind === 'error' && /not a safetensors file/.test(m.text), m.text.split('\n')[0]);

  // A model folder picked as a folder (the bundled model's), then back to the bundled model.
  await page.setInputFiles('#model-folder', fileURLToPath(new URL('../model', import.meta.url)));
  await page.waitForFunction(() => window.demoState.messages.at(-1).kind === 'ok', null, { timeout: 30000 });
  m = await lastMessage(page);
  check('a picked model folder loads', /Model loaded in .*: model: 2 layers, hidden 64/.test(m.text), m.text);
  await page.click('#use-bundled');
  m = await lastMessage(page);
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
  await page.click('#train');
  await waitDone(page, 600000);
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
  await ctx.close();

  // A browser without WebGPU: a message, and the page falls back to the CPU.
  if (device === 'webgpu') {
    const b = await launch(false);
    await b.page.goto(url + '?device=webgpu');
    await b.page.waitForFunction(() => window.demoState && window.demoState.ready, null, { timeout: 120000 });
    const st = await b.page.evaluate(() => ({ device: window.demoState.device, err: window.demoState.error }));
    check('without WebGPU the page says so and uses the CPU', st.device === 'cpu' && /WebGPU is not available/.test(st.err || ''), st.err || '');
    await b.ctx.close();
  }

  fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify(result, null, 2));
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => { console.error(e); console.log(`${passed} passed, ${failed + 1} failed`); process.exit(1); });
