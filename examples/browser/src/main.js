// The example chat page's logic: form login on /auth, then each message is sent
// with the whole conversation to a chat_stream route and the reply is streamed
// into the page with @microsoft/fetch-event-source, as in the seed's Vue snippet.
import { fetchEventSource } from '@microsoft/fetch-event-source';

const params = new URLSearchParams(window.location.search);
const gateway = (params.get('gateway') || window.location.origin).replace(/\/+$/, '');
const streamPath = params.get('path') || '/chatCompletionStream';
// Must match the route's data_format. `text` is the seed's framing: data is the
// raw text. Known limitation: fetch-event-source joins data lines only when the
// data so far is non-empty, so a chunk that is a bare "\n" (sent as two empty
// `data:` lines) comes out as "" and a chunk starting with "\n" loses it; line
// breaks disappear. `json` exists for such clients: data is one JSON string
// literal per chunk, never split across lines, and JSON.parse gives it back exactly.
const format = params.get('format') === 'json' ? 'json' : 'text';

const $ = (id) => document.getElementById(id);
const history = [];
let token = null;

function setStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

/** Appends a turn to the output and returns its text element. */
function addTurn(role, text) {
  const turn = document.createElement('div');
  turn.className = `turn ${role}`;
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = role === 'user' ? 'You:' : 'Assistant:';
  const body = document.createElement('span');
  body.className = 'text';
  body.textContent = text;
  turn.append(who, body);
  $('output').append(turn);
  return body;
}

/** The gateway's {"errorMessage": ...} text, or the HTTP status. */
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && typeof body.errorMessage === 'string') return body.errorMessage;
  } catch (_) {
    // not JSON: fall through
  }
  return `HTTP ${response.status}`;
}

$('login').addEventListener('submit', async (e) => {
  e.preventDefault();
  setStatus('Logging in…');
  try {
    // Form data, like the seed's Go and Python examples (no CORS preflight needed).
    const response = await fetch(`${gateway}/auth`, {
      method: 'POST',
      body: new URLSearchParams({ username: $('username').value, password: $('password').value }),
    });
    if (!response.ok) {
      setStatus(`Login failed: ${await errorText(response)}`, true);
      return;
    }
    token = (await response.json()).accessToken;
    $('send').disabled = false;
    setStatus(`Logged in as ${$('username').value}.`);
  } catch (err) {
    setStatus(`Login failed: ${err.message}`, true);
  }
});

$('chat').addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = $('message').value;
  if (!token || !text.trim()) return;
  $('message').value = '';
  $('send').disabled = true;
  history.push({ role: 'user', Content: text });
  addTurn('user', text);
  const out = addTurn('assistant', '');
  let reply = '';
  let failed = false;
  setStatus('Streaming…');
  document.body.dataset.state = 'streaming';
  try {
    await fetchEventSource(`${gateway}${streamPath}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(history),
      openWhenHidden: true, // a hidden tab must not restart the request
      async onopen(response) {
        if (!response.ok) throw new Error(await errorText(response));
      },
      onmessage(ev) {
        if (ev.event === 'error') {
          // The upstream failed mid-answer: the gateway sends one error event and closes.
          failed = true;
          let message = ev.data;
          try { message = JSON.parse(ev.data).errorMessage; } catch (_) { /* keep raw */ }
          setStatus(`Reply cut: ${message}`, true);
          return;
        }
        if (ev.data === '') return; // the empty first and last events
        const piece = format === 'json' ? JSON.parse(ev.data) : ev.data;
        reply += piece;
        out.textContent = reply;
      },
      onerror(err) {
        throw err; // no automatic retry: a chat request is not idempotent
      },
    });
    if (!failed) setStatus('Done.');
  } catch (err) {
    failed = true;
    setStatus(`Request failed: ${err.message}`, true);
  }
  history.push({ role: 'assistant', Content: reply });
  $('send').disabled = false;
  document.body.dataset.state = failed ? 'failed' : 'done';
});
