// Views: each takes the context (me, params, args...) and returns a DOM node built from API data.

import { ApiError, get, post, seg } from './api.js';
import { badge, h, json, kv, link, route, show, table, time } from './dom.js';

const PAGE_SIZES = [10, 25, 50, 100];
const DEFAULT_PAGE = 50;

/** The page size asked for in the URL (?limit=), within the API's bounds. */
function pageSize(params) {
  const n = Number.parseInt(params.get('limit') || '', 10);
  return Number.isFinite(n) && n >= 1 && n <= 1000 ? n : DEFAULT_PAGE;
}

/** A URL of this view with some parameters changed (null removes one). */
function withParams(base, params, changes) {
  const q = new URLSearchParams(params);
  for (const [k, v] of Object.entries(changes)) {
    if (v === null || v === undefined || v === '') q.delete(k); else q.set(k, v);
  }
  const s = q.toString();
  return s ? `${base}?${s}` : base;
}

/** First / next page links for a cursor-paginated list. */
export function pager(base, params, next, shown) {
  const after = params.get('after');
  return h('nav', { class: 'pager', 'aria-label': 'Pages' },
    after ? h('a', { href: withParams(base, params, { after: null }), 'data-testid': 'first-page' }, '« First page') : null,
    next ? h('a', { href: withParams(base, params, { after: next }), 'data-testid': 'next-page' }, 'Next page »') : null,
    h('span', { class: 'muted', 'data-testid': 'page-count' }, `${shown} shown`),
    h('label', null, 'Page size ',
      h('select', {
        'data-testid': 'page-size',
        onchange: (e) => { window.location.hash = withParams(base, params, { limit: e.target.value, after: null }); },
      }, PAGE_SIZES.map((n) => h('option', { value: String(n), selected: n === pageSize(params) }, String(n))))));
}

/** A filter form whose submit navigates to base?field=value... (fields: [{name, label, type, options}]). */
function filterForm(base, params, fields) {
  const form = h('form', { class: 'filters', role: 'search' },
    fields.map((f) => h('label', null, f.label,
      f.options
        ? h('select', { name: f.name }, f.options.map(([value, text]) => h('option', {
          value, selected: (params.get(f.name) || '') === value,
        }, text)))
        : h('input', { name: f.name, value: params.get(f.name) || '', placeholder: f.placeholder || '',
          autocomplete: 'off' }))),
    h('button', { type: 'submit', class: 'primary' }, 'Filter'),
    h('a', { href: base }, 'Clear'));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const changes = { after: null };
    for (const f of fields) changes[f.name] = String(data.get(f.name) || '').trim();
    window.location.hash = withParams(base, params, changes);
  });
  return form;
}

function section(title, ...children) {
  return h('section', null, h('h2', null, title), children);
}

/** Items of a paginated API answer ({items, next}) or a bare list. */
function itemsOf(page) {
  if (Array.isArray(page)) return page;
  return (page && page.items) || [];
}

// ------------------------------------------------------------------------------------------------ shell

export function notFound(hash) {
  return h('div', null, h('h1', null, 'Not found'), h('p', null, `The console has no page ${hash}.`),
    h('p', null, link('Back to the dashboard')));
}

export function failed(err) {
  const forbidden = err instanceof ApiError && err.status === 403;
  return h('div', { 'data-testid': 'failed' },
    h('h1', null, forbidden ? 'Not allowed' : 'Something went wrong'),
    h('p', null, err instanceof ApiError ? err.message : String(err)));
}

// ------------------------------------------------------------------------------------------------ login

export async function login(ctx) {
  const next = ctx.params.get('next');
  const error = h('p', { class: 'message error', role: 'alert', 'data-testid': 'login-error', hidden: true });
  const form = h('form', { class: 'login', 'aria-label': 'Log in' },
    h('h1', null, 'Log in'),
    h('label', null, 'User name', h('input', { name: 'username', autocomplete: 'username', required: true,
      maxlength: '64', autofocus: true })),
    h('label', null, 'Password', h('input', { name: 'password', type: 'password', autocomplete: 'current-password',
      required: true, maxlength: '1024' })),
    error,
    h('button', { type: 'submit', class: 'primary' }, 'Log in'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const button = form.querySelector('button');
    button.disabled = true;
    error.hidden = true;
    try {
      const me = await post('/auth/login', { username: String(data.get('username')), password: String(data.get('password')) });
      ctx.setSession(me);
      window.location.hash = next && next.startsWith('#/') && !next.startsWith('#/login') ? next : '#/';
    } catch (err) {
      error.textContent = err instanceof ApiError ? ApiError.detailText(err.detail) || err.message : String(err);
      error.hidden = false;
      form.querySelector('input[name=password]').value = '';
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

// ------------------------------------------------------------------------------------------------ dashboard

const DEVICE_STATES = ['online', 'offline', 'stale', 'never', 'revoked'];
const ROLLOUT_STATUSES = ['draft', 'running', 'paused', 'completed', 'aborted', 'rolled_back'];

function countCard(testid, href, value, label) {
  return h('a', { class: 'card', href, 'data-testid': testid },
    h('div', { class: 'value' }, show(value)), h('div', { class: 'label' }, label));
}

export async function dashboard() {
  const [summary, versions] = await Promise.all([get('/summary'), get('/versions')]);
  return h('div', null,
    h('h1', null, 'Dashboard'),
    section('Devices',
      h('div', { class: 'cards', 'data-testid': 'device-counts' },
        countCard('count-total', '#/devices', summary.devices_total, 'total'),
        DEVICE_STATES.map((s) => countCard(`count-${s}`, `#/devices?status=${s}`, summary.devices[s] ?? 0, s))),
      h('p', { class: 'muted' }, `Stale: silent for more than ${show(summary.stale_after_s)} s. As of ${time(summary.at)}.`)),
    section('Rollouts by status',
      h('div', { class: 'cards', 'data-testid': 'rollout-counts' },
        ROLLOUT_STATUSES.map((s) => countCard(`rollouts-${s}`, `#/rollouts?status=${s}`, summary.rollouts[s] ?? 0, s)))),
    section('Versions per model', versionTable(versions)));
}

function versionTable(versions) {
  return table([
    { title: 'Model', cell: (r) => r.model },
    { title: 'Version', cell: (r) => show(r.version), num: true },
    {
      title: 'Devices',
      cell: (r) => h('a', {
        href: `#/devices?model=${encodeURIComponent(r.model)}&version=${encodeURIComponent(r.version)}`,
      }, show(r.devices)),
      num: true,
    },
  ], itemsOf(versions), { empty: 'No device reports a model yet.', testid: 'versions' });
}

// ------------------------------------------------------------------------------------------------ devices

function deviceStatus(d) {
  return d.state;
}

function whyText(why) {
  return Array.isArray(why) ? why.join(', ') : show(why);
}

function labelsText(labels) {
  if (!labels) return '—';
  return Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(', ') || '—';
}

function modelsText(models) {
  if (!models || models.length === 0) return '—';
  return models.map((m) => `${m.model} v${m.version}`).join(', ');
}

export async function devices(ctx) {
  const p = ctx.params;
  const base = '#/devices';
  const labels = (p.get('label') || '').split(',').map((l) => l.trim()).filter((l) => l);
  const page = await get('/devices', {
    status: p.get('status'), label: labels, cohort: p.get('cohort'), q: p.get('q'), model: p.get('model'),
    version: p.get('version'), limit: pageSize(p), after: p.get('after'),
  });
  const items = itemsOf(page);
  return h('div', null,
    h('h1', null, 'Devices'),
    filterForm(base, p, [
      { name: 'status', label: 'Status', options: [['', 'any'], ...DEVICE_STATES.map((s) => [s, s])] },
      { name: 'label', label: 'Labels', placeholder: 'key=value, key2=value2' },
      { name: 'cohort', label: 'Cohort', placeholder: 'cohort name' },
      { name: 'model', label: 'Model', placeholder: 'model name' },
      { name: 'version', label: 'Version', placeholder: '3' },
      { name: 'q', label: 'Id starts with', placeholder: 'cam-' },
    ]),
    table([
      { title: 'Device', cell: (d) => link(d.id, 'devices', d.id) },
      { title: 'Status', cell: (d) => badge(deviceStatus(d)) },
      { title: 'Labels', cell: (d) => labelsText(d.labels) },
      { title: 'Profile', cell: (d) => show(d.firmware_profile) },
      { title: 'Models', cell: (d) => modelsText(d.models) },
      { title: 'Agent', cell: (d) => show(d.agent_version) },
      { title: 'Last seen', cell: (d) => time(d.last_seen_at) },
    ], items, { empty: 'No device matches.', testid: 'devices' }),
    pager(base, p, page.next, items.length));
}

export async function device(ctx) {
  const id = ctx.args[0];
  const d = await get(`/devices/${seg(id)}`);
  const history = d.history || {};
  return h('div', null,
    h('h1', null, 'Device ', h('span', { class: 'mono', 'data-testid': 'device-id' }, d.id)),
    kv([
      ['Status', badge(deviceStatus(d))],
      ['Stale since', time(d.stale_since)],
      ['Last seen', time(d.last_seen_at)],
      ['Last heartbeat', time(d.heartbeat_at)],
      ['First seen', time(d.first_seen_at)],
      ['Firmware profile', show(d.firmware_profile)],
      ['Agent version', show(d.agent_version)],
      ['Wire schema', show(d.schema_version)],
      ['Uptime (s)', show(d.uptime_s)],
      ['Registered', d.registered_at ? `${time(d.registered_at)} by ${show(d.registered_by)}` : '—'],
      d.revoked_at ? ['Revoked', time(d.revoked_at)] : null,
      ['Hardware', show(d.hardware)],
    ], 'device-summary'),
    section('Labels', table([
      { title: 'Key', cell: (r) => r[0] }, { title: 'Value', cell: (r) => r[1] },
    ], Object.entries(d.labels || {}), { empty: 'No labels.', testid: 'device-labels' })),
    section('Cohorts', table([
      { title: 'Cohort', cell: (c) => link(c.name, 'cohorts', c.name) },
      { title: 'Why', cell: (c) => whyText(c.why) },
    ], d.cohorts || [], { empty: 'In no cohort.', testid: 'device-cohorts' })),
    section('Versions', table([
      { title: 'Model', cell: (m) => m.model },
      { title: 'Active', cell: (m) => show(m.version), num: true },
      { title: 'Previous', cell: (m) => show(m.previous_version), num: true },
      { title: 'Healthy', cell: (m) => show(m.healthy) },
      { title: 'Since', cell: (m) => time(m.changed_at) },
      { title: 'Slot', cell: (m) => show(m.slot) },
    ], d.models || [], { empty: 'No model reported.', testid: 'device-versions' })),
    section('Version changes', table([
      { title: 'When', cell: (c) => time(c.at) },
      { title: 'Model', cell: (c) => c.model },
      { title: 'From', cell: (c) => show(c.from_version), num: true },
      { title: 'To', cell: (c) => show(c.to_version), num: true },
      { title: 'Rollout', cell: (c) => (c.rollout_id ? link(c.rollout_id, 'rollouts', c.rollout_id) : '—') },
    ], history.version_changes || [], { empty: 'No version change.', testid: 'device-changes' })),
    section('Rollouts', table([
      { title: 'Rollout', cell: (r) => link(r.name || r.rollout_id, 'rollouts', r.rollout_id) },
      { title: 'Version', cell: (r) => `${r.model} v${r.version}` },
      { title: 'Rollout status', cell: (r) => badge(r.rollout_status) },
      { title: 'Step', cell: (r) => badge(r.step) },
      { title: 'Since', cell: (r) => time(r.since) },
      { title: 'Attempts', cell: (r) => show(r.attempts), num: true },
      { title: 'Reason', cell: (r) => show(r.reason) },
    ], history.rollouts || [], { empty: 'In no rollout.', testid: 'device-rollouts' })),
    section('Deployment events', table([
      { title: 'When (device clock)', cell: (e) => time(e.at) },
      { title: 'Event', cell: (e) => badge(e.kind) },
      { title: 'Model', cell: (e) => (e.model ? `${e.model} v${show(e.version)}` : '—') },
      { title: 'Reason', cell: (e) => show(e.reason) },
      { title: 'Command', cell: (e) => h('span', { class: 'mono' }, show(e.command_id)) },
    ], history.events || [], { empty: 'No deployment event.', testid: 'device-events' })));
}

// ------------------------------------------------------------------------------------------------ cohorts

export async function cohorts(ctx) {
  const p = ctx.params;
  const page = await get('/cohorts', { limit: pageSize(p), after: p.get('after') });
  const items = itemsOf(page);
  return h('div', null,
    h('h1', null, 'Cohorts'),
    table([
      { title: 'Cohort', cell: (c) => link(c.name, 'cohorts', c.name) },
      { title: 'Description', cell: (c) => show(c.description) },
      { title: 'Selector', cell: (c) => labelsText(c.selector) },
      { title: 'Explicit members', cell: (c) => show(c.explicit_members), num: true },
      { title: 'Updated', cell: (c) => time(c.updated_at) },
    ], items, { empty: 'No cohort yet.', testid: 'cohorts' }),
    pager('#/cohorts', p, page.next, items.length));
}

export async function cohort(ctx) {
  const name = ctx.args[0];
  const p = ctx.params;
  const [c, members] = await Promise.all([
    get(`/cohorts/${seg(name)}`),
    get(`/cohorts/${seg(name)}/devices`, { limit: pageSize(p), after: p.get('after') }),
  ]);
  const items = itemsOf(members);
  return h('div', null,
    h('h1', null, 'Cohort ', h('span', { class: 'mono' }, c.name)),
    kv([
      ['Description', show(c.description)],
      ['Selector', labelsText(c.selector)],
      ['Explicit members', show(c.explicit_members)],
      ['Devices now', show(c.size)],
      ['Created', `${time(c.created_at)} by ${show(c.created_by)}`],
      ['Updated', time(c.updated_at)],
    ], 'cohort-summary'),
    section('Members', table([
      { title: 'Device', cell: (m) => link(m.device_id, 'devices', m.device_id) },
      { title: 'Why', cell: (m) => whyText(m.why) },
    ], items, { empty: 'No member.', testid: 'cohort-members' }),
    pager(route('cohorts', name), p, members.next, items.length)));
}

// ------------------------------------------------------------------------------------------------ bundles

export async function bundles(ctx) {
  const p = ctx.params;
  const page = await get('/bundles', { model: p.get('model'), limit: pageSize(p), after: p.get('after') });
  const items = itemsOf(page);
  return h('div', null,
    h('h1', null, 'Bundles'),
    filterForm('#/bundles', p, [{ name: 'model', label: 'Model', placeholder: 'model name' }]),
    table([
      { title: 'Digest', cell: (b) => h('a', { href: route('bundles', b.digest), class: 'mono' }, b.digest.slice(0, 16)) },
      { title: 'Model', cell: (b) => b.model },
      { title: 'Version', cell: (b) => show(b.version), num: true },
      { title: 'Size (bytes)', cell: (b) => show(b.length), num: true },
      { title: 'Profiles', cell: (b) => (b.profiles || []).join(', ') || '—' },
      { title: 'Expires', cell: (b) => time(b.expires_at) },
      { title: 'Uploaded', cell: (b) => `${time(b.uploaded_at)} by ${show(b.uploaded_by)}` },
    ], items, { empty: 'No bundle uploaded.', testid: 'bundles' }),
    pager('#/bundles', p, page.next, items.length));
}

export async function bundle(ctx) {
  const b = await get(`/bundles/${seg(ctx.args[0])}`);
  return h('div', null,
    h('h1', null, `Bundle ${b.model} v${b.version}`),
    kv([
      ['Digest', h('span', { class: 'mono' }, b.digest)],
      ['File sha256', h('span', { class: 'mono' }, show(b.file_sha256))],
      ['Model', b.model],
      ['Version', show(b.version)],
      ['Size (bytes)', show(b.length)],
      ['Profiles', (b.profiles || []).join(', ') || '—'],
      ['Runtime', show(b.runtime)],
      ['Signers', (b.signers || []).join(', ') || '—'],
      ['Built', time(b.created_at)],
      ['Expires', time(b.expires_at)],
      ['Uploaded', `${time(b.uploaded_at)} by ${show(b.uploaded_by)}`],
      ['Download URL', h('span', { class: 'mono' }, show(b.url))],
    ], 'bundle-summary'),
    b.references ? section('In use', kv([
      ['In use', b.references.in_use ? 'yes' : 'no'],
      ['Devices running it', show(b.references.devices_active)],
      ['Devices keeping it as previous version', show(b.references.devices_previous)],
      ['Rollouts', h('span', null, (b.references.rollouts || []).map((r, i) => [i ? ', ' : '',
        link(r.rollout_id, 'rollouts', r.rollout_id), ` (${r.status}, ${r.role})`]))],
    ], 'bundle-references')) : null,
    b.manifest ? section('Manifest', json(b.manifest)) : null);
}

// ------------------------------------------------------------------------------------------------ audit

export async function audit(ctx) {
  const p = ctx.params;
  const page = await get('/audit', {
    actor: p.get('actor'), action: p.get('action'), target: p.get('target'), limit: pageSize(p), after: p.get('after'),
  });
  const items = itemsOf(page);
  return h('div', null,
    h('h1', null, 'Audit log'),
    filterForm('#/audit', p, [
      { name: 'actor', label: 'Actor', placeholder: 'user:alice' },
      { name: 'action', label: 'Action', placeholder: 'rollout.pause' },
      { name: 'target', label: 'Target', placeholder: 'rollout:r1' },
    ]),
    table([
      { title: 'When', cell: (a) => time(a.at) },
      { title: 'Actor', cell: (a) => a.actor },
      { title: 'Action', cell: (a) => h('span', { class: 'mono' }, a.action) },
      { title: 'Target', cell: (a) => a.target },
      { title: 'Outcome', cell: (a) => badge(a.outcome) },
      { title: 'Detail', cell: (a) => (a.detail && Object.keys(a.detail).length ? show(a.detail) : '—') },
    ], items, { empty: 'No record matches.', testid: 'audit' }),
    pager('#/audit', p, page.next, items.length));
}
