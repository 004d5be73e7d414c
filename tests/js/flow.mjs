// The official JavaScript SDK (centrifuge-js) against an eventcast hub: subscribe with
// recovery, receive, disconnect, publications made meanwhile (through the HTTP API, with
// fetch), reconnect, recover; then publish, history and presence from the client. Prints one
// JSON object to stdout; exit status 1 on failure.
//
// Environment: HUB_WS_URL, HUB_TOKEN, HUB_API_URL, HUB_API_KEY, HUB_CHANNEL; HUB_PROTOCOL
// (json or protobuf: the SDK's Protobuf build); HUB_TRANSPORTS (optional: a JSON list of
// centrifuge-js transport endpoints, e.g. a blocked WebSocket then HTTP-streaming) with
// HUB_EMULATION_URL (where emulation requests go).
import { EventSource } from 'eventsource';
import WebSocket from 'ws';

import { decodeData, encodeData, loadCentrifuge } from './sdk.mjs';
import { apiPublish, env, waiters } from './waiting.mjs';

const Centrifuge = await loadCentrifuge();

const url = env('HUB_WS_URL');
const token = env('HUB_TOKEN');
const apiUrl = env('HUB_API_URL');
const apiKey = env('HUB_API_KEY');
const channel = env('HUB_CHANNEL');

const received = [];
const subscribed = [];
const published = [];
const states = [];

const { notify, until } = waiters();

async function publish(data) {
  const result = await apiPublish(apiUrl, apiKey, channel, data);
  published.push(result);
  return result;
}

const transports = process.env.HUB_TRANSPORTS ? JSON.parse(process.env.HUB_TRANSPORTS) : null;
const client = new Centrifuge(transports || url, {
  token,
  websocket: WebSocket,
  eventsource: EventSource,
  emulationEndpoint: process.env.HUB_EMULATION_URL || '/emulation',
  minReconnectDelay: 50,
  maxReconnectDelay: 500,
});
const transportsUsed = [];
client.on('connected', (ctx) => {
  transportsUsed.push(ctx.transport);
});
client.on('state', (ctx) => {
  states.push(ctx.newState);
  notify();
});
const sub = client.newSubscription(channel, { recoverable: true });
sub.on('subscribed', (ctx) => {
  subscribed.push({
    wasRecovering: ctx.wasRecovering,
    recovered: ctx.recovered,
    recoverable: ctx.recoverable,
    offset: ctx.streamPosition ? ctx.streamPosition.offset : null,
    epoch: ctx.streamPosition ? ctx.streamPosition.epoch : null,
  });
  notify();
});
sub.on('publication', (ctx) => {
  received.push({ offset: ctx.offset, data: decodeData(ctx.data) });
  notify();
});

let error = null;
let history = null;
let presence = null;
let presenceStats = null;
try {
  client.connect();
  sub.subscribe();
  await until('the first subscribe', () => subscribed.length === 1);
  for (let n = 1; n <= 3; n++) await publish({ n, text: `live ${n}` });
  await until('3 live publications', () => received.length >= 3);

  client.disconnect();
  await until('disconnected', () => client.state === 'disconnected');
  for (let n = 4; n <= 6; n++) await publish({ n, text: `missed ${n}` });

  client.connect();
  await until('the resubscribe', () => subscribed.length === 2);
  await until('3 recovered publications', () => received.length >= 6);
  await publish({ n: 7, text: 'sentinel' });
  await until('the sentinel', () => received.some((p) => p.data.n === 7));

  // Client commands: publish, history, presence (the channel's namespace allows them).
  await sub.publish(encodeData({ n: 8, text: 'from the client' }));
  await until('the client publication', () => received.some((p) => p.data.n === 8));
  const page = await sub.history({ limit: 100 });
  history = page.publications.map((p) => ({ offset: p.offset, n: decodeData(p.data).n }));
  const who = await sub.presence();
  presence = Object.values(who.clients).map((info) => info.user);
  presenceStats = await sub.presenceStats();
} catch (e) {
  error = String(e && e.stack ? e.stack : e);
} finally {
  client.disconnect();
}
process.stdout.write(
  JSON.stringify({
    error,
    subscribed,
    received,
    published,
    states,
    history,
    presence,
    presenceStats,
    transports: transportsUsed,
  }) + '\n',
);
process.exit(error === null ? 0 : 1);
