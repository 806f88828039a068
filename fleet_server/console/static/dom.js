// DOM helpers. Data never becomes markup: text goes in with text nodes, attributes with setAttribute, and
// links only to this console's own routes. Nothing in the console parses a string as HTML.

const SAFE_URL = /^(#|\/(?!\/))/;

/** Build an element: h('a', {href: '#/x', class: 'y', onclick: fn}, 'text', child, [more]). */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === 'class') {
      el.className = value;
    } else if (key === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (key === 'value') {
      el.value = value;
    } else if (key === 'href' || key === 'src' || key === 'action') {
      const url = String(value);
      if (!SAFE_URL.test(url)) throw new Error(`refusing a link outside the console: ${url}`);
      el.setAttribute(key, url);
    } else if (key.startsWith('on') || key === 'style') {
      throw new Error(`refusing attribute ${key}`);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children (nodes, strings, numbers, nested arrays; null/false skipped) as nodes or text. */
export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Remove every child of el, then append children. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A route of this console: route('devices', id) -> '#/devices/<id, escaped>'. */
export function route(...parts) {
  return '#/' + parts.map((p) => encodeURIComponent(String(p))).join('/');
}

/** A link to a console route. */
export function link(text, ...parts) {
  return h('a', { href: route(...parts) }, text);
}

/** Text of a value for a table cell: null -> '—', objects as compact JSON. */
export function show(value) {
  if (value === null || value === undefined || value === '') return '—';
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

/** An ISO 8601 time (API) or unix seconds (rollout device times) as 'YYYY-MM-DD HH:MM:SS UTC'. */
export function time(value) {
  if (value === null || value === undefined || value === '') return '—';
  const date = typeof value === 'number' ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return date.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}

/** A coloured word (class = the word itself, restricted to [a-z_]). */
export function badge(word) {
  const text = show(word);
  const cls = /^[a-z_]+$/.test(text) ? text : 'unknown';
  return h('span', { class: `badge ${cls}` }, text);
}

/** A table: columns = [{title, cell: row => node|text, num?}], rows = array. */
export function table(columns, rows, { empty = 'Nothing to show.', testid } = {}) {
  if (!rows || rows.length === 0) return h('p', { class: 'empty', 'data-testid': testid }, empty);
  return h('table', { 'data-testid': testid },
    h('thead', null, h('tr', null, columns.map((c) => h('th', { class: c.num ? 'num' : null }, c.title)))),
    h('tbody', null, rows.map((row) => h('tr', null,
      columns.map((c) => h('td', { class: c.num ? 'num' : null }, c.cell(row)))))));
}

/** A definition list of [label, value] pairs. */
export function kv(pairs, testid) {
  return h('dl', { class: 'kv', 'data-testid': testid },
    pairs.filter((p) => p).map(([k, v]) => [h('dt', null, k), h('dd', null, v instanceof Node ? v : show(v))]));
}

/** Pretty JSON of any value, as text. */
export function json(value) {
  return h('pre', { class: 'mono' }, JSON.stringify(value, null, 2));
}
