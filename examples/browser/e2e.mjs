// End-to-end run of the example chat page in Debian's headless Chromium, driven by
// playwright-core (never a browser download). For each page URL: log in, send each
// message in turn, wait for the stream to finish, and record what the page shows.
// Prints one JSON line per page: {format, status, replies, transcript, screenshot}.
// Usage: node e2e.mjs --user U --password P --out DIR [--say MSG]... PAGE_URL...
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const STEP_TIMEOUT_MS = 15000;
// Bounds the whole run, so a hung browser fails the test instead of stalling CI.
const watchdog = setTimeout(() => {
  console.error('e2e: gave up after 60 s');
  process.exit(3);
}, 60000);

function parseArgs(argv) {
  const opts = { user: '', password: '', out: '.', say: [], pages: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--user') opts.user = argv[++i];
    else if (a === '--password') opts.password = argv[++i];
    else if (a === '--out') opts.out = argv[++i];
    else if (a === '--say') opts.say.push(argv[++i]);
    else opts.pages.push(a);
  }
  if (opts.pages.length === 0 || opts.say.length === 0) {
    throw new Error('usage: e2e.mjs --user U --password P --out DIR --say MSG... PAGE_URL...');
  }
  return opts;
}

async function runPage(context, url, index, opts) {
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console: ${msg.text()}`);
  });
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  await page.goto(url);
  const format = new URL(url).searchParams.get('format') || 'text';

  await page.fill('#username', opts.user);
  await page.fill('#password', opts.password);
  await page.click('#login-button');
  await page.waitForFunction(() => !document.getElementById('send').disabled
    || document.getElementById('status').classList.contains('error'));

  const replies = [];
  if (!(await page.isDisabled('#send'))) {
    for (const message of opts.say) {
      await page.fill('#message', message);
      await page.click('#send');
      // The page marks the body when a stream has ended (done or failed).
      await page.waitForFunction(
        (n) => document.querySelectorAll('.turn.assistant').length === n
          && ['done', 'failed'].includes(document.body.dataset.state),
        replies.length + 1,
      );
      replies.push(await page.locator('.turn.assistant .text').last().innerText());
      if ((await page.getAttribute('body', 'data-state')) === 'failed') break;
    }
  }

  const status = await page.locator('#status').innerText();
  const transcript = await page.locator('#output').innerText();
  mkdirSync(opts.out, { recursive: true });
  const screenshot = resolve(join(opts.out, `page${index + 1}-${format}.png`));
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.close();
  return { format, status, replies, transcript, problems, screenshot };
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  // A fresh profile each run; the flags keep Chromium off the (closed) network.
  const profile = mkdtempSync(join(tmpdir(), 'chatgate-e2e-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 900, height: 700 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  try {
    for (const [index, url] of opts.pages.entries()) {
      console.log(JSON.stringify(await runPage(context, url, index, opts)));
    }
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(
  () => { clearTimeout(watchdog); },
  (err) => { console.error(`e2e: ${err.stack || err}`); process.exit(1); },
);
