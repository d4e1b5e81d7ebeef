// Minimal OpAMP over WebSocket for k6: just enough protobuf to describe an
// agent, heartbeat, and acknowledge a pushed config. Field numbers follow
// opamp.proto (AgentToServer, ServerToAgent, AgentRemoteConfig,
// RemoteConfigStatus); frames carry the 0x00 WebSocket header.

function varint(out, value) {
  let v = value;
  while (v >= 0x80) {
    out.push((v & 0x7f) | 0x80);
    v = Math.floor(v / 128);
  }
  out.push(v);
}

function tag(out, field, wireType) {
  varint(out, (field << 3) | wireType);
}

function bytesField(out, field, bytes) {
  tag(out, field, 2);
  varint(out, bytes.length);
  for (const b of bytes) out.push(b);
}

function stringBytes(s) {
  const out = [];
  for (let i = 0; i < s.length; i++) {
    let c = s.charCodeAt(i);
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 0x3f));
    else out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
  }
  return out;
}

function keyValue(key, value) {
  const anyValue = [];
  bytesField(anyValue, 1, stringBytes(value)); // AnyValue.string_value
  const kv = [];
  bytesField(kv, 1, stringBytes(key)); // KeyValue.key
  bytesField(kv, 2, anyValue); // KeyValue.value
  return kv;
}

// ReportsStatus | AcceptsRemoteConfig | ReportsRemoteConfig | ReportsHeartbeat
export const CAPABILITIES = 0x1 | 0x2 | 0x1000 | 0x2000;

export function newUid() {
  const uid = [];
  for (let i = 0; i < 16; i++) uid.push(Math.floor(Math.random() * 256));
  uid[6] = (uid[6] & 0x0f) | 0x70; // version 7 layout, random payload
  return uid;
}

function frame(fields) {
  const out = [0x00]; // WebSocket header
  for (const b of fields) out.push(b);
  return new Uint8Array(out).buffer;
}

function base(uid, seq) {
  const out = [];
  bytesField(out, 1, uid); // instance_uid
  tag(out, 2, 0); varint(out, seq); // sequence_num
  tag(out, 4, 0); varint(out, CAPABILITIES); // capabilities
  return out;
}

export function hello(uid, seq, attributes) {
  const out = base(uid, seq);
  const description = [];
  for (const [k, v] of Object.entries(attributes)) bytesField(description, 1, keyValue(k, v));
  bytesField(out, 3, description); // agent_description
  return frame(out);
}

export function heartbeat(uid, seq) {
  return frame(base(uid, seq));
}

// RemoteConfigStatus{last_remote_config_hash, status} (APPLIED = 1, FAILED = 3)
export function configStatus(uid, seq, hash, status) {
  const out = base(uid, seq);
  const rcs = [];
  bytesField(rcs, 1, hash);
  tag(rcs, 2, 0); varint(rcs, status);
  bytesField(out, 7, rcs); // remote_config_status
  return frame(out);
}

function readVarint(bytes, pos) {
  let value = 0;
  let mul = 1;
  for (;;) {
    const b = bytes[pos++];
    value += (b & 0x7f) * mul;
    if (b < 0x80) return [value, pos];
    mul *= 128;
  }
}

// The top-level fields of a message: {field: [bytes or number, ...]}.
function fields(bytes, start, end) {
  const found = {};
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(bytes, pos);
    const field = Math.floor(key / 8);
    const wire = key & 7;
    let value;
    if (wire === 0) {
      [value, pos] = readVarint(bytes, pos);
    } else if (wire === 2) {
      let len;
      [len, pos] = readVarint(bytes, pos);
      value = [pos, pos + len];
      pos += len;
    } else if (wire === 1) {
      value = null; pos += 8;
    } else if (wire === 5) {
      value = null; pos += 4;
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
    (found[field] = found[field] || []).push(value);
  }
  return found;
}

// Decodes what k6 scripts need of a ServerToAgent frame.
export function decodeReply(buffer) {
  const bytes = new Uint8Array(buffer);
  const start = bytes[0] === 0x00 ? 1 : 0;
  const top = fields(bytes, start, bytes.length);
  const reply = { error: null, configHash: null, flags: (top[6] || [0])[0] };
  if (top[2]) {
    const [s, e] = top[2][0];
    const err = fields(bytes, s, e);
    reply.error = { type: (err[1] || [0])[0] };
  }
  if (top[3]) {
    const [s, e] = top[3][0];
    const rc = fields(bytes, s, e);
    if (rc[2]) {
      const [hs, he] = rc[2][0];
      reply.configHash = Array.from(bytes.slice(hs, he));
    }
  }
  return reply;
}
