// centrifuge-js when the hub drops it with a reconnect code: the same flow the Python client
// runs in tests/server/test_centrifuge_js.py (test_js_sdk_and_python_client_reconnect_alike).
// Subscribe with recovery, 2 live publications, the hub disconnects the user (3000, through
// the HTTP API), 2 publications meanwhile, reconnect and recover. Prints one JSON object.
//
// Environment: HUB_WS_URL, HUB_TOKEN, HUB_API_URL, HUB_API_KEY, HUB_CHANNEL, HUB_USER.
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

import { env, waiters } from './waiting.mjs';

const apiUrl = env('HUB_API_URL');
const apiKey = env('HUB_API_KEY');
const channel = env('HUB_CHANNEL');

const received = [];
const subscribed = [];
const states = [];
const { notify, until } = waiters();

async function api(method, params) {
  const response = await fetch(`${apiUrl}/${method}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-API-Key': apiKey },
    body: JSON.stringify(params),
  });
  const body = await response.json();
  if (response.status !== 200 || body.error) throw new Error(JSON.stringify(body));
  return body.result;
}

const client = new Centrifuge(env('HUB_WS_URL'), {
  token: env('HUB_TOKEN'),
  websocket: WebSocket,
  minReconnectDelay: 20,
  maxReconnectDelay: 200,
});
client.on('state', (ctx) => {
  states.push(ctx.newState);
  notify();
});
const sub = client.newSubscription(channel, { recoverable: true });
sub.on('subscribed', (ctx) => {
  subscribed.push({ wasRecovering: ctx.wasRecovering, recovered: ctx.recovered });
  notify();
});
sub.on('publication', (ctx) => {
  received.push(ctx.offset);
  notify();
});

let error = null;
try {
  client.connect();
  sub.subscribe();
  await until('the first subscribe', () => subscribed.length === 1);
  for (let n = 1; n <= 2; n++) await api('publish', { channel, data: { n } });
  await until('2 live publications', () => received.length >= 2);
  await api('disconnect', {
    user: env('HUB_USER'),
    disconnect: { code: 3000, reason: 'test kick' },
  });
  for (let n = 3; n <= 4; n++) await api('publish', { channel, data: { n } });
  await until('the resubscribe', () => subscribed.length === 2);
  await until('4 publications', () => received.length >= 4);
} catch (e) {
  error = String(e && e.stack ? e.stack : e);
} finally {
  client.disconnect();
}
process.stdout.write(JSON.stringify({ error, subscribed, received, states }) + '\n');
process.exit(error === null ? 0 : 1);
