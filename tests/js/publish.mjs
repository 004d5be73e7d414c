// The official JavaScript SDK (centrifuge-js) as a publisher: connects to an eventcast hub and
// publishes HUB_COUNT messages into HUB_CHANNEL with `centrifuge.publish(channel, data)`, one
// after the other (each waits for its reply). Prints one JSON object to stdout; exit status 1
// on failure. Run by tests/client/test_interop.py.
//
// Environment: HUB_WS_URL, HUB_TOKEN, HUB_CHANNEL, HUB_COUNT.
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env('HUB_WS_URL');
const token = env('HUB_TOKEN');
const channel = env('HUB_CHANNEL');
const count = Number(env('HUB_COUNT'));
// A safety net only: every step waits for an event or a reply.
const TIMEOUT_MS = 10000;

const client = new Centrifuge(url, { token, websocket: WebSocket, timeout: TIMEOUT_MS });
const published = [];
let error = null;
try {
  const connected = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('timed out connecting')), TIMEOUT_MS);
    client.once('connected', (ctx) => {
      clearTimeout(timer);
      resolve(ctx);
    });
  });
  client.connect();
  await connected;
  for (let n = 1; n <= count; n++) {
    const data = { n, from: 'centrifuge-js', text: `héllo ${n} ✓`, nested: { list: [n, null, true] } };
    await client.publish(channel, data);
    published.push(data);
  }
} catch (e) {
  error = String(e && e.stack ? e.stack : e);
} finally {
  client.disconnect();
}
process.stdout.write(JSON.stringify({ error, published }) + '\n');
process.exit(error === null ? 0 : 1);
