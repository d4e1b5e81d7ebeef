// The public admin API, and nothing else: every request carries the
// operator's token and tenant, kept for this browser tab only.

export type Json = any; // eslint-disable-line @typescript-eslint/no-explicit-any

export interface Session {
  token: string;
  tenant: string;
}

const KEY = "fleetplane.session";

export function session(): Session {
  try {
    const saved = JSON.parse(sessionStorage.getItem(KEY) ?? "{}");
    return { token: saved.token ?? "", tenant: saved.tenant ?? "" };
  } catch {
    return { token: "", tenant: "" };
  }
}

export function saveSession(s: Session): void {
  sessionStorage.setItem(KEY, JSON.stringify(s));
}

export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
  }
}

function headers(extra: Record<string, string> = {}): Record<string, string> {
  const s = session();
  const h: Record<string, string> = { ...extra };
  if (s.token) h["Authorization"] = `Bearer ${s.token}`;
  if (s.tenant) h["Fleetplane-Tenant"] = s.tenant;
  return h;
}

export async function api(method: string, path: string, body?: unknown): Promise<Json> {
  const response = await fetch(`/api/v1${path}`, {
    method,
    headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let value: Json = null;
  if (text) {
    try {
      value = JSON.parse(text);
    } catch {
      value = text;
    }
  }
  if (!response.ok) {
    const message = value && typeof value === "object" && value.error ? value.error : `HTTP ${response.status}`;
    throw new ApiError(message, response.status);
  }
  return value;
}

export const get = (path: string) => api("GET", path);

export interface FleetEvent {
  id: string;
  unix_ms: number;
  kind: string;
  subject: string;
  message: string;
  fields: Record<string, string>;
}

/// Follows the tenant's event stream (fetch, since EventSource cannot send
/// the token); reconnects with Last-Event-ID after a drop. Returns a stop
/// function.
export function followEvents(onEvent: (e: FleetEvent) => void, onState: (s: string) => void): () => void {
  const controller = new AbortController();
  let last: string | null = null;
  let stopped = false;
  const run = async () => {
    while (!stopped) {
      try {
        const extra: Record<string, string> = {};
        if (last) extra["Last-Event-ID"] = last;
        const response = await fetch("/api/v1/events", { headers: headers(extra), signal: controller.signal });
        if (!response.ok || !response.body) throw new ApiError(`HTTP ${response.status}`, response.status);
        onState("live");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end: number;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let kind = "message";
            let data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) kind = line.slice(6).trim();
              else if (line.startsWith("data:")) data += line.slice(5).trimStart();
            }
            if (!data) continue;
            if (kind === "lagged") {
              // Events were missed: start over with fresh state.
              last = null;
              onState("lagged");
              break;
            }
            const event = JSON.parse(data) as FleetEvent;
            last = event.id;
            onEvent(event);
          }
        }
      } catch (e) {
        if (stopped) return;
        onState(e instanceof ApiError && e.status === 401 ? "unauthorized" : "reconnecting");
      }
      if (!stopped) await new Promise((r) => setTimeout(r, 1000));
    }
  };
  void run();
  return () => {
    stopped = true;
    controller.abort();
  };
}
