// The centrifuge-js build a test runs: the JSON one, or the Protobuf one (HUB_PROTOCOL=protobuf),
// whose publications carry their data as bytes (the JSON the hub stores, decoded here).
export const protocol = process.env.HUB_PROTOCOL || 'json';

export async function loadCentrifuge() {
  const module = protocol === 'protobuf'
    ? await import('centrifuge/build/protobuf')
    : await import('centrifuge');
  return module.Centrifuge;
}

const decoder = new TextDecoder();

// A publication's data as JSON, whichever build received it.
export function decodeData(data) {
  return protocol === 'protobuf' ? JSON.parse(decoder.decode(data)) : data;
}

// Data to publish from the client, whichever build sends it.
export function encodeData(value) {
  return protocol === 'protobuf' ? new TextEncoder().encode(JSON.stringify(value)) : value;
}
