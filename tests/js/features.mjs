// centrifuge-js with fossil deltas and a tags filter against an eventcast hub: a ticker whose
// ~2 KB documents change a few fields per update (received through deltas), and a channel
// whose publications are filtered on the server by their tags. Prints one JSON object.
//
// Environment: HUB_WS_URL, HUB_TOKEN, HUB_API_URL, HUB_API_KEY, HUB_PREFIX (the channels'
// common prefix), HUB_PROTOCOL (json or protobuf).
import WebSocket from 'ws';

import { decodeData, loadCentrifuge } from './sdk.mjs';
import { apiPublish, env, waiters } from './waiting.mjs';

const Centrifuge = await loadCentrifuge();
const apiUrl = env('HUB_API_URL');
const apiKey = env('HUB_API_KEY');
const prefix = env('HUB_PREFIX');
const { notify, until } = waiters();

const publish = (channel, data, tags) => apiPublish(apiUrl, apiKey, channel, data, tags);

function quote(n) {
  const depth = [];
  for (let level = 0; level < 40; level++) depth.push({ level, size: level * 10 + n });
  return { symbol: 'S1', bid: 100 + n, ask: 101 + n, depth, notes: 'Indicative prices. '.repeat(20) };
}

const client = new Centrifuge(env('HUB_WS_URL'), { token: env('HUB_TOKEN'), websocket: WebSocket });
const ticker = client.newSubscription(`${prefix}.ticker`, { delta: 'fossil' });
const filtered = client.newSubscription(`${prefix}.tags`, {
  tagsFilter: { op: 'or', nodes: [
    { key: 'symbol', cmp: 'eq', val: 'S1' },
    { key: 'size', cmp: 'gte', val: '100' },
  ] },
});
const quotes = [];
const tagged = [];
ticker.on('publication', (ctx) => { quotes.push(decodeData(ctx.data)); notify(); });
filtered.on('publication', (ctx) => { tagged.push(decodeData(ctx.data).n); notify(); });
let subscribed = 0;
for (const sub of [ticker, filtered]) sub.on('subscribed', () => { subscribed++; notify(); });

let error = null;
let deltaStats = null;
let exact = false;
try {
  client.connect();
  ticker.subscribe();
  filtered.subscribe();
  await until('both subscribed', () => subscribed === 2);
  for (let n = 1; n <= 4; n++) await publish(`${prefix}.ticker`, quote(n));
  const tags = [['S1', '1'], ['S2', '5'], ['S2', '500'], ['S1', '2'], ['S3', '7']];
  for (let n = 0; n < tags.length; n++) {
    await publish(`${prefix}.tags`, { n }, { symbol: tags[n][0], size: tags[n][1] });
  }
  await until('4 quotes', () => quotes.length >= 4);
  await until('3 tagged', () => tagged.length >= 3);
  exact = quotes.every((q, i) => JSON.stringify(q) === JSON.stringify(quote(i + 1)));
  deltaStats = ticker.deltaStats();
} catch (e) {
  error = String(e && e.stack ? e.stack : e);
} finally {
  client.disconnect();
}
process.stdout.write(JSON.stringify({ error, exact, deltaStats, tagged }) + '\n');
process.exit(error === null ? 0 : 1);
