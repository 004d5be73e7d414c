// The official JavaScript SDK (centrifuge-js) against a hub whose application hooks decide
// (in process or over Centrifugo's HTTP proxy): connect with no token (the session travels in
// the connect data), receive the connect data and the server-side subscriptions, a refused
// subscription (error 103), a publication rewritten by the publish hook, an RPC answered by
// the application. Prints one JSON object to stdout; exit status 1 on failure.
//
// Environment: HUB_WS_URL, HUB_API_URL, HUB_API_KEY, HUB_SESSION.
import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

import { apiPublish, env, waiters } from './waiting.mjs';

const url = env('HUB_WS_URL');
const apiUrl = env('HUB_API_URL');
const apiKey = env('HUB_API_KEY');
const session = env('HUB_SESSION');

const { notify, until } = waiters();
const out = {
  error: null,
  connectedData: null,
  serverSubscribed: [],
  serverPublications: [],
  denied: null,
  roomPublications: [],
  rpc: null,
};

const client = new Centrifuge(url, {
  websocket: WebSocket,
  data: { session },
  minReconnectDelay: 50,
  maxReconnectDelay: 500,
});
client.on('connected', (ctx) => {
  out.connectedData = ctx.data;
  notify();
});
client.on('subscribed', (ctx) => {
  out.serverSubscribed.push({ channel: ctx.channel, data: ctx.data ?? null });
  notify();
});
client.on('publication', (ctx) => {
  out.serverPublications.push({ channel: ctx.channel, data: ctx.data });
  notify();
});

const secret = client.newSubscription('secret:plans');
secret.on('unsubscribed', (ctx) => {
  out.denied = { code: ctx.code, reason: ctx.reason };
  notify();
});
const room = client.newSubscription('chat.room');
let roomSubscribed = false;
room.on('subscribed', () => {
  roomSubscribed = true;
  notify();
});
room.on('publication', (ctx) => {
  out.roomPublications.push(ctx.data);
  notify();
});

try {
  client.connect();
  await until('connected', () => out.connectedData !== null);
  await until('2 server-side subscriptions', () => out.serverSubscribed.length === 2);
  const personal = out.serverSubscribed.find((s) => s.channel.startsWith('personal:')).channel;
  await apiPublish(apiUrl, apiKey, personal, { note: 'for you' });
  await until('a publication on the personal channel', () => out.serverPublications.length === 1);

  secret.subscribe();
  await until('the refusal', () => out.denied !== null);

  room.subscribe();
  await until('the room subscription', () => roomSubscribed);
  await room.publish({ text: 'hello from js' });
  await until('the rewritten publication', () => out.roomPublications.length === 1);

  const reply = await client.rpc('whoami', { from: 'js' });
  out.rpc = reply.data;
} catch (e) {
  out.error = String(e && e.stack ? e.stack : JSON.stringify(e));
} finally {
  client.disconnect();
}
process.stdout.write(JSON.stringify(out) + '\n');
process.exit(out.error === null ? 0 : 1);
