// A few DOM helpers: elements built from data, text always set as text
// (never HTML), so agent-supplied strings cannot inject markup.

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | ((e: Event) => void) | undefined>;

export function h(tag: string, attrs: Attrs = {}, ...children: (Child | Child[])[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    if (typeof value === "function") el.addEventListener(key.replace(/^on/, ""), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function table(header: string[], rows: Child[][], attrs: Attrs = {}): HTMLElement {
  return h(
    "table",
    attrs,
    h("thead", {}, h("tr", {}, header.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))),
  );
}

export function short(hash: string | null | undefined): string {
  return hash ? hash.slice(0, 12) : "-";
}

export function when(ms: number | null | undefined): string {
  return ms ? new Date(ms).toLocaleString() : "-";
}

export function badge(text: string, kind = ""): HTMLElement {
  return h("span", { class: `badge ${kind || text.toLowerCase()}` }, text);
}
