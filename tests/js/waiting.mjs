// Shared by the scripts of tests/js: read the environment, wait for conditions re-checked on
// every event (never a sleep; the timeout is a safety net only), publish through the HTTP API.

export const TIMEOUT_MS = 10000;

export const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

// Returns { notify, until }: call notify() after each event; until(what, predicate) resolves
// once predicate() holds, or rejects after TIMEOUT_MS.
export function waiters() {
  let pending = [];
  const notify = () => {
    pending = pending.filter((w) => {
      if (!w.predicate()) return true;
      clearTimeout(w.timer);
      w.resolve();
      return false;
    });
  };
  const until = (what, predicate) =>
    new Promise((resolve, reject) => {
      if (predicate()) return resolve();
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), TIMEOUT_MS);
      pending.push({ predicate, resolve, timer });
    });
  return { notify, until };
}

// Publish through the hub's HTTP API (fetch), with optional tags; returns the API's result
// ({offset, epoch}).
export async function apiPublish(apiUrl, apiKey, channel, data, tags = undefined) {
  const response = await fetch(`${apiUrl}/publish`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', 'X-API-Key': apiKey },
    body: JSON.stringify({ channel, data, tags }),
  });
  const body = await response.json();
  if (response.status !== 200 || body.error) {
    throw new Error(`publish failed: ${response.status} ${JSON.stringify(body)}`);
  }
  return body.result;
}
