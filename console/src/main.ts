// Fleetplane's web console: a fleet overview, agents, configs with a
// side-by-side diff, assignments, and rollouts with live stage progress and
// their commands. It uses only the public admin API and its event stream.

import "./style.css";
import { ApiError, type FleetEvent, type Json, api, followEvents, get, saveSession, session } from "./api";
import { sideBySide } from "./diff";
import { badge, h, short, table, when } from "./ui";

const app = document.getElementById("app")!;
const sessionBox = document.getElementById("session")!;

/// Connected agents over time, sampled while the console is open.
const connectedSeries: { t: number; n: number }[] = [];
/// The newest events, for the events page and agent histories.
const recentEvents: FleetEvent[] = [];
/// Called on every event while a page wants live updates.
let onLiveEvent: ((e: FleetEvent) => void) | null = null;
let streamState = "connecting";
let stopEvents: (() => void) | null = null;

function startEvents(): void {
  stopEvents?.();
  stopEvents = followEvents(
    (e) => {
      recentEvents.push(e);
      if (recentEvents.length > 500) recentEvents.shift();
      onLiveEvent?.(e);
    },
    (state) => {
      streamState = state;
      renderSession();
    },
  );
}

function renderSession(): void {
  const s = session();
  sessionBox.replaceChildren(
    h("span", { class: `stream ${streamState}`, title: "event stream" }, `events: ${streamState}`),
    " ",
    h("span", {}, `tenant: ${s.tenant || "default"}`),
    " ",
    h(
      "button",
      {
        class: "link",
        onclick: () => {
          saveSession({ token: "", tenant: "" });
          location.hash = "#/login";
        },
      },
      s.token ? "sign out" : "sign in",
    ),
  );
}

function loginPage(message = ""): HTMLElement {
  const token = h("input", { type: "password", name: "token", placeholder: "operator token", autocomplete: "off" }) as HTMLInputElement;
  const tenant = h("input", { type: "text", name: "tenant", placeholder: "tenant (default)" }) as HTMLInputElement;
  tenant.value = session().tenant;
  return h(
    "section",
    { class: "login" },
    h("h1", {}, "Sign in"),
    message ? h("p", { class: "error" }, message) : null,
    h(
      "form",
      {
        onsubmit: (e: Event) => {
          e.preventDefault();
          saveSession({ token: token.value.trim(), tenant: tenant.value.trim() });
          startEvents();
          if (location.hash === "#/") void render();
          else location.hash = "#/";
        },
      },
      h("label", {}, "Token ", token),
      h("label", {}, "Tenant ", tenant),
      h("button", { type: "submit" }, "Sign in"),
    ),
  );
}

function count<T>(items: T[], key: (t: T) => string): [string, number][] {
  const m = new Map<string, number>();
  for (const i of items) m.set(key(i), (m.get(key(i)) ?? 0) + 1);
  return [...m.entries()].sort((a, b) => b[1] - a[1]);
}

function chart(samples: { t: number; n: number }[]): HTMLElement {
  let points = samples;
  const width = 600;
  const height = 120;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "chart");
  if (points.length === 1) points = [points[0], { t: points[0].t + 1, n: points[0].n }];
  if (points.length > 0) {
    const t0 = points[0].t;
    const span = Math.max(1, points[points.length - 1].t - t0);
    const max = Math.max(1, ...points.map((p) => p.n));
    const coords = points.map((p) => `${((p.t - t0) / span) * (width - 10) + 5},${height - 5 - (p.n / max) * (height - 20)}`);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", coords.join(" "));
    svg.append(line);
    const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
    label.setAttribute("x", "5");
    label.setAttribute("y", "12");
    label.textContent = `max ${max}`;
    svg.append(label);
  }
  return h("figure", {}, svg as unknown as HTMLElement, h("figcaption", {}, "Connected agents since this page opened"));
}

function tiles(title: string, entries: [string, number][]): HTMLElement {
  return h(
    "div",
    { class: "tile" },
    h("h3", {}, title),
    entries.length === 0 ? h("p", {}, "-") : h("dl", {}, entries.flatMap(([k, n]) => [h("dt", {}, k), h("dd", {}, n)])),
  );
}

async function overviewPage(): Promise<HTMLElement> {
  const agents: Json[] = await get("/agents");
  const connected = agents.filter((a) => a.connected).length;
  connectedSeries.push({ t: Date.now(), n: connected });
  if (connectedSeries.length > 720) connectedSeries.shift();
  const page = h(
    "section",
    {},
    h("h1", {}, "Fleet overview"),
    h(
      "div",
      { class: "tiles" },
      h("div", { class: "tile big" }, h("h3", {}, "Connected"), h("p", { id: "connected-count" }, `${connected} / ${agents.length}`)),
      tiles("Health", count(agents, (a) => (a.healthy === true ? "healthy" : a.healthy === false ? "unhealthy" : "unknown"))),
      tiles("Config status", count(agents, (a) => a.remote_config?.status ?? "none")),
      tiles("Agent version", count(agents, (a) => a.identifying_attributes?.["service.version"] ?? a.non_identifying_attributes?.["service.version"] ?? "unknown")),
      tiles("Service", count(agents, (a) => a.identifying_attributes?.["service.name"] ?? "unknown")),
    ),
    chart(connectedSeries),
  );
  onLiveEvent = (e) => {
    if (e.kind === "agent.connected" || e.kind === "agent.disconnected" || e.kind === "agent.config_status") scheduleRender(1000);
  };
  return page;
}

function agentRow(a: Json): HTMLElement[] {
  return [
    h("a", { href: `#/agents/${a.instance_uid}` }, a.instance_uid),
    a.identifying_attributes?.["service.name"] ?? "-",
    badge(a.connected ? "connected" : "offline"),
    a.healthy === false ? badge("unhealthy") : a.healthy ? badge("healthy") : "-",
    short(a.remote_config?.hash),
    a.remote_config ? badge(a.remote_config.status) : "-",
    a.desired_config ? `${a.desired_config.config} v${a.desired_config.version}` : "-",
  ] as HTMLElement[];
}

async function agentsPage(query: URLSearchParams): Promise<HTMLElement> {
  const selector = query.get("selector") ?? "";
  const params = new URLSearchParams();
  if (selector) params.set("selector", selector);
  if (query.get("connected")) params.set("connected", query.get("connected")!);
  const agents: Json[] = await get(`/agents?${params}`);
  const input = h("input", { type: "text", name: "selector", placeholder: "selector, e.g. service.name=checkout,!canary" }) as HTMLInputElement;
  input.value = selector;
  onLiveEvent = (e) => {
    if (e.kind.startsWith("agent.")) scheduleRender(1500);
  };
  return h(
    "section",
    {},
    h("h1", {}, `Agents (${agents.length})`),
    h(
      "form",
      {
        class: "filters",
        onsubmit: (e: Event) => {
          e.preventDefault();
          location.hash = `#/agents?selector=${encodeURIComponent(input.value)}`;
        },
      },
      input,
      h("button", { type: "submit" }, "Filter"),
    ),
    table(["Agent", "Service", "Connection", "Health", "Config", "Status", "Desired"], agents.map(agentRow), { id: "agents" }),
  );
}

function kv(obj: Record<string, string> | undefined): HTMLElement {
  const entries = Object.entries(obj ?? {});
  return entries.length === 0 ? h("p", {}, "-") : h("dl", {}, entries.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

async function agentPage(uid: string): Promise<HTMLElement> {
  const [a, log]: [Json, FleetEvent[]] = await Promise.all([
    get(`/agents/${encodeURIComponent(uid)}`),
    get(`/event-log?subject=${encodeURIComponent(uid)}&limit=50`),
  ]);
  const history = log.slice().reverse();
  const errors = history.filter((e) => e.fields?.error || e.kind === "agent.config_status" && e.fields?.status === "FAILED");
  onLiveEvent = (e) => {
    if (e.subject === uid) scheduleRender(500);
  };
  const files = Object.entries((a.effective_config ?? {}) as Record<string, Json>);
  return h(
    "section",
    { class: "agent" },
    h("h1", {}, "Agent ", h("code", {}, a.instance_uid)),
    h("p", {}, badge(a.connected ? "connected" : "offline"), " ", a.transport, " · last seen ", when(a.last_seen_unix_ms)),
    h("div", { class: "columns" },
      h("div", {}, h("h2", {}, "Description"), h("h3", {}, "Identifying"), kv(a.identifying_attributes), h("h3", {}, "Non-identifying"), kv(a.non_identifying_attributes)),
      h("div", {},
        h("h2", {}, "Capabilities"),
        h("ul", { class: "caps" }, (a.capability_names ?? []).map((c: string) => h("li", {}, c))),
        h("h2", {}, "Health"),
        a.health ? h("p", {}, a.health.healthy ? badge("healthy") : badge("unhealthy"), " ", a.health.status ?? "", a.health.last_error ? h("span", { class: "error" }, ` ${a.health.last_error}`) : null) : h("p", {}, "-"),
        h("h2", {}, "Config"),
        h("p", {}, "reported ", h("code", {}, short(a.remote_config?.hash)), " ", a.remote_config ? badge(a.remote_config.status) : "-"),
        a.remote_config?.error_message ? h("p", { class: "error" }, `last error: ${a.remote_config.error_message}`) : null,
        h("p", {}, "desired ", a.desired_config ? `${a.desired_config.config} v${a.desired_config.version} (${short(a.desired_config.hash)})` : "-", a.desired_config?.rollout ? ` · rollout ${a.desired_config.rollout}` : ""),
      ),
    ),
    h("h2", {}, "Components"),
    Object.keys(a.available_components ?? {}).length === 0
      ? h("p", {}, "-")
      : h("dl", {}, Object.entries(a.available_components as Record<string, string[]>).flatMap(([kind, types]) => [h("dt", {}, kind), h("dd", {}, types.join(", "))])),
    h("h2", {}, "Effective config"),
    files.length === 0 ? h("p", {}, "-") : files.map(([name, f]) => h("div", {}, h("h3", {}, name || "(unnamed)"), h("pre", {}, f.body))),
    h("h2", {}, "Last errors"),
    errors.length === 0 ? h("p", {}, "None kept.") : h("ul", { class: "failures" }, errors.slice(0, 5).map((e) => h("li", {}, `${when(e.unix_ms)}: ${e.message}`))),
    h("h2", {}, "Status history"),
    history.length === 0
      ? h("p", {}, "No events kept for this agent.")
      : table(["When", "Event", "Message"], history.map((e) => [when(e.unix_ms), e.kind, e.message]), { id: "history" }),
  );
}

async function configsPage(): Promise<HTMLElement> {
  const configs: Json[] = await get("/configs");
  return h(
    "section",
    {},
    h("h1", {}, "Configs"),
    table(
      ["Config", "Latest", "Hash", "Created"],
      configs.map((c) => [h("a", { href: `#/configs/${c.name}` }, c.name), `v${c.version}`, h("code", {}, short(c.hash)), when(c.created_unix_ms)]),
    ),
  );
}

function fileText(version: Json): string {
  return Object.entries((version.files ?? {}) as Record<string, Json>)
    .map(([name, f]) => `# ${name}\n${f.body}`)
    .join("\n");
}

async function configPage(name: string, query: URLSearchParams): Promise<HTMLElement> {
  const versions: Json[] = await get(`/configs/${encodeURIComponent(name)}`);
  const numbers = versions.map((v) => v.version as number).sort((a, b) => a - b);
  const right = Number(query.get("right") ?? numbers[numbers.length - 1]);
  const left = Number(query.get("left") ?? numbers[Math.max(0, numbers.length - 2)]);
  const [a, b] = await Promise.all([
    get(`/configs/${encodeURIComponent(name)}/versions/${left}`),
    get(`/configs/${encodeURIComponent(name)}/versions/${right}`),
  ]);
  const select = (which: string, current: number) => {
    const s = h("select", { name: which, onchange: (e: Event) => {
      const q = new URLSearchParams({ left: String(left), right: String(right) });
      q.set(which, (e.target as HTMLSelectElement).value);
      location.hash = `#/configs/${name}?${q}`;
    } }, numbers.map((n) => h("option", { value: n, selected: n === current }, `v${n}`)));
    return s;
  };
  const rows = sideBySide(fileText(a), fileText(b));
  return h(
    "section",
    {},
    h("h1", {}, `Config ${name}`),
    table(["Version", "Hash", "Created"], versions.map((v) => [`v${v.version}`, h("code", {}, v.hash), when(v.created_unix_ms)])),
    h("h2", {}, "Compare ", select("left", left), " with ", select("right", right)),
    h(
      "table",
      { class: "diff" },
      h("tbody", {}, rows.map((r) => h("tr", { class: r.kind }, h("td", {}, h("pre", {}, r.left ?? "")), h("td", {}, h("pre", {}, r.right ?? ""))))),
    ),
  );
}

async function assignmentsPage(): Promise<HTMLElement> {
  const assignments: Json[] = await get("/assignments");
  return h(
    "section",
    {},
    h("h1", {}, "Assignments"),
    table(
      ["Assignment", "Selector", "Config", "Version", "Priority", "Updated"],
      assignments.map((a) => [a.name, h("code", {}, a.selector || "(every agent)"), h("a", { href: `#/configs/${a.config}` }, a.config), a.version ? `v${a.version}` : "latest", a.priority, when(a.updated_unix_ms)]),
    ),
  );
}

async function rolloutsPage(): Promise<HTMLElement> {
  const [rollouts, assignments, configs]: Json[][] = await Promise.all([get("/rollouts"), get("/assignments"), get("/configs")]);
  const message = h("p", { class: "error", id: "rollout-error" });
  const form = h(
    "form",
    {
      id: "start-rollout",
      class: "filters",
      onsubmit: async (e: Event) => {
        e.preventDefault();
        const data = new FormData(e.target as HTMLFormElement);
        const body: Json = {
          assignment: data.get("assignment"),
          config: data.get("config"),
          stages: String(data.get("stages")).split(",").map((s) => Number(s.trim())).filter((n) => n > 0),
          bake_seconds: Number(data.get("bake") || 0),
        };
        try {
          const created = await api("POST", "/rollouts", body);
          location.hash = `#/rollouts/${created.id}`;
        } catch (err) {
          message.textContent = (err as Error).message;
        }
      },
    },
    h("select", { name: "assignment" }, assignments.map((a) => h("option", { value: a.name }, a.name))),
    h("select", { name: "config" }, configs.map((c) => h("option", { value: c.name }, `${c.name} (latest v${c.version})`))),
    h("input", { name: "stages", value: "10,50,100", size: 10, title: "cumulative percentages" }),
    h("input", { name: "bake", value: "1", size: 4, title: "bake seconds per stage" }),
    h("button", { type: "submit" }, "Start rollout"),
  );
  onLiveEvent = (e) => {
    if (e.kind === "rollout") scheduleRender(500);
  };
  return h(
    "section",
    {},
    h("h1", {}, "Rollouts"),
    form,
    message,
    table(
      ["Rollout", "Assignment", "Config", "State", "Stage", "Reason"],
      rollouts.map((r) => [h("a", { href: `#/rollouts/${r.id}` }, r.id), r.assignment, `${r.config} v${r.version}`, badge(r.state), r.stage, r.reason || ""]),
    ),
  );
}

/// A progress bar; its width set through the DOM, which the console's
/// content security policy allows (inline style attributes it does not).
function bar(pct: number): HTMLElement {
  const fill = h("div", { class: "fill" });
  fill.style.width = `${pct}%`;
  return h("div", { class: "bar" }, fill);
}

async function rolloutPage(id: string): Promise<HTMLElement> {
  const r: Json = await get(`/rollouts/${encodeURIComponent(id)}`);
  const message = h("p", { class: "error" });
  const act = (verb: string) =>
    h(
      "button",
      {
        name: verb,
        onclick: async () => {
          try {
            await api("POST", `/rollouts/${encodeURIComponent(id)}/${verb}`);
            scheduleRender(0);
          } catch (err) {
            message.textContent = (err as Error).message;
          }
        },
      },
      verb,
    );
  const live = ["PENDING", "PROGRESSING", "BAKING", "PAUSED", "ROLLING_BACK"].includes(r.state);
  onLiveEvent = (e) => {
    if (e.kind === "rollout" && e.subject === id) scheduleRender(200);
  };
  if (live) scheduleRender(2000);
  return h(
    "section",
    { class: "rollout" },
    h("h1", {}, "Rollout ", h("code", {}, r.id)),
    h("p", {}, h("span", { id: "rollout-state" }, badge(r.state)), ` ${r.assignment} → ${r.config} v${r.version}`, r.reason ? h("span", { class: "error" }, ` · ${r.reason}`) : null),
    h("p", { class: "actions" }, act("pause"), act("resume"), act("abort"), act("rollback")),
    message,
    h(
      "div",
      { class: "stages" },
      (r.stages ?? []).map((s: Json) => {
        const applied = s.phases?.APPLIED ?? 0;
        const failed = (s.phases?.FAILED ?? 0) + (s.phases?.REVERTED ?? 0);
        const pct = s.agents ? Math.round((applied * 100) / s.agents) : 100;
        return h(
          "div",
          { class: `stage${s.stage === r.stage ? " current" : ""}` },
          h("h3", {}, `Stage ${s.stage} · ${s.percent}%`),
          bar(pct),
          h("p", {}, `${applied}/${s.agents} applied`, failed ? `, ${failed} failed or reverted` : ""),
          (s.failures ?? []).length === 0
            ? null
            : h("ul", { class: "failures" }, s.failures.map((f: Json) => h("li", {}, h("a", { href: `#/agents/${f.instance_uid}` }, short(f.instance_uid)), `: ${f.reason}`))),
        );
      }),
    ),
    h("h2", {}, "Events"),
    table(["When", "What"], (r.events ?? []).slice().reverse().map((e: Json) => [when(e.unix_ms), e.message])),
  );
}

function eventsPage(): HTMLElement {
  const list = h("tbody");
  const row = (e: FleetEvent) => h("tr", {}, h("td", {}, when(e.unix_ms)), h("td", {}, e.kind), h("td", {}, e.subject), h("td", {}, e.message));
  for (const e of recentEvents.slice().reverse()) list.append(row(e));
  onLiveEvent = (e) => list.prepend(row(e));
  return h("section", {}, h("h1", {}, "Events"), h("table", {}, h("thead", {}, h("tr", {}, ["When", "Kind", "Subject", "Message"].map((c) => h("th", {}, c)))), list));
}

let pending: number | null = null;
function scheduleRender(delay: number): void {
  if (pending !== null) return;
  pending = window.setTimeout(() => {
    pending = null;
    void render();
  }, delay);
}

async function render(): Promise<void> {
  const [path, queryText] = (location.hash.slice(1) || "/").split("?");
  const query = new URLSearchParams(queryText ?? "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  onLiveEvent = null;
  renderSession();
  let page: HTMLElement;
  try {
    if (parts[0] === "login") page = loginPage();
    else if (parts.length === 0) page = await overviewPage();
    else if (parts[0] === "agents" && parts[1]) page = await agentPage(parts[1]);
    else if (parts[0] === "agents") page = await agentsPage(query);
    else if (parts[0] === "configs" && parts[1]) page = await configPage(parts[1], query);
    else if (parts[0] === "configs") page = await configsPage();
    else if (parts[0] === "assignments") page = await assignmentsPage();
    else if (parts[0] === "rollouts" && parts[1]) page = await rolloutPage(parts[1]);
    else if (parts[0] === "rollouts") page = await rolloutsPage();
    else if (parts[0] === "events") page = eventsPage();
    else page = h("section", {}, h("h1", {}, "Not found"));
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) page = loginPage("The admin API wants an operator token.");
    else if (e instanceof ApiError && e.status === 403) page = loginPage(`Not allowed: ${e.message}`);
    else page = h("section", {}, h("h1", {}, "Error"), h("p", { class: "error" }, (e as Error).message));
  }
  app.replaceChildren(page);
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === `#/${parts[0] ?? ""}`);
  }
}

window.addEventListener("hashchange", () => void render());
setInterval(() => {
  if ((location.hash.slice(1) || "/") === "/") scheduleRender(0);
}, 5000);
startEvents();
void render();
