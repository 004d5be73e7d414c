// Fossil deltas made and applied by fossil-delta (a port of Fossil's own delta.c),
// for tests/protocol/test_delta.py. Reads {"create": [[source, target]...],
// "apply": [[source, delta]...]} as base64 from stdin; writes {"created": [delta...],
// "applied": [target or null...]} (null: the delta was rejected).
import { applyDelta, createDelta } from 'fossil-delta';

const chunks = [];
for await (const chunk of process.stdin) {
  chunks.push(chunk);
}
const request = JSON.parse(Buffer.concat(chunks).toString());
const bytes = (b64) => new Uint8Array(Buffer.from(b64, 'base64'));
const b64 = (array) => Buffer.from(array).toString('base64');

const created = request.create.map(([source, target]) => b64(createDelta(bytes(source), bytes(target))));
const applied = request.apply.map(([source, delta]) => {
  try {
    return b64(applyDelta(bytes(source), bytes(delta), { verifyChecksum: true }));
  } catch (e) {
    return null;
  }
});
process.stdout.write(JSON.stringify({ created, applied }));
