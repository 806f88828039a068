// Rollouts: the list, and one rollout with its phase, tally, halt reason, devices and the actions the
// user's role allows from its state (the API decides; the buttons only reflect /console/policy.json).

import { ApiError, get, post, seg } from './api.js';
import { badge, h, json, kv, link, route, show, table, time } from './dom.js';
import { pager } from './views.js';

const ACTIONS = [
  { action: 'start', label: 'Start', done: 'started' },
  { action: 'pause', label: 'Pause', done: 'paused' },
  { action: 'resume', label: 'Resume', done: 'resumed' },
  { action: 'retry-failed', label: 'Retry failed devices', done: 'retrying its failed devices' },
  {
    action: 'abort', label: 'Abort', done: 'aborted', danger: true,
    confirm: 'Abort this rollout? Devices in the middle of an update are cancelled at once; this cannot be undone.',
  },
  {
    action: 'rollback', label: 'Roll back', done: 'rolled back', danger: true,
    confirm: 'Roll back this rollout? Devices that installed the new version get the previous version again.',
  },
];

const STATUSES = ['draft', 'running', 'paused', 'completed', 'aborted', 'rolled_back'];

function pageSize(params) {
  const n = Number.parseInt(params.get('limit') || '', 10);
  return Number.isFinite(n) && n >= 1 && n <= 1000 ? n : 50;
}

/** 'phase 2 of 3' while running or paused (the API's phase is 1-based). */
function statusText(r) {
  if (r.status === 'running' || r.status === 'paused') return `phase ${r.phase} of ${r.phases}`;
  return '';
}

export async function list(ctx) {
  const p = ctx.params;
  const status = p.get('status');
  const page = await get('/rollouts', { status, limit: pageSize(p), after: p.get('after') });
  const items = (page && page.items) || [];
  const filter = h('form', { class: 'filters', role: 'search' },
    h('label', null, 'Status', h('select', { name: 'status' },
      h('option', { value: '', selected: !status }, 'any'),
      STATUSES.map((s) => h('option', { value: s, selected: s === status }, s)))),
    h('button', { type: 'submit', class: 'primary' }, 'Filter'));
  filter.addEventListener('submit', (e) => {
    e.preventDefault();
    const s = new FormData(filter).get('status');
    window.location.hash = s ? `#/rollouts?status=${encodeURIComponent(s)}` : '#/rollouts';
  });
  return h('div', null,
    h('h1', null, 'Rollouts'),
    filter,
    table([
      { title: 'Rollout', cell: (r) => link(r.name || r.id, 'rollouts', r.id) },
      { title: 'Status', cell: (r) => [badge(r.status), ' ', statusText(r)] },
      { title: 'Model', cell: (r) => `${r.model} v${r.version}` },
      { title: 'Halted by', cell: (r) => show(r.halt_rule) },
      { title: 'Cohorts', cell: (r) => (r.cohorts || []).map((c, i) => [i ? ', ' : '', link(c, 'cohorts', c)]) },
      { title: 'Created', cell: (r) => `${time(r.created_at)} by ${show(r.created_by)}` },
      { title: 'Updated', cell: (r) => time(r.updated_at) },
    ], items, { empty: 'No rollout.', testid: 'rollouts' }),
    pager('#/rollouts', p, page.next, items.length));
}

/** The actions shown for rollout r: allowed from its state, and by the user's role. */
export function allowedActions(ctx, r) {
  const policy = (ctx.policy && ctx.policy.rollout_actions) || {};
  return ACTIONS.filter((a) => {
    const rule = policy[a.action];
    return rule && rule.role && rule.states.includes(r.status) && ctx.roleAtLeast(rule.role);
  });
}

/** Ask for confirmation (and an optional reason) in the page's dialog; resolves to {ok, reason}. */
function confirmDialog(title, text) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  const reason = document.getElementById('confirm-reason');
  reason.value = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      resolve({ ok: dialog.returnValue === 'ok', reason: reason.value.trim() });
    }, { once: true });
    dialog.returnValue = '';
    dialog.showModal();
  });
}

async function act(ctx, r, a, button) {
  let reason = '';
  if (a.confirm) {
    const answer = await confirmDialog(`${a.label}: ${r.name || r.id}`, a.confirm);
    if (!answer.ok) return;
    reason = answer.reason;
  }
  button.disabled = true;
  try {
    await post(`/rollouts/${seg(r.id)}/${a.action}`, reason ? { reason } : {});
    ctx.notify(`Rollout ${r.name || r.id} ${a.done}.`, 'info', { sticky: true });
    await ctx.refresh();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;
    ctx.notify(err instanceof ApiError ? err.message : String(err));
    button.disabled = false;
  }
}

function stepsTable(id, steps, current) {
  return table([
    {
      title: 'Step',
      cell: ([step]) => (step === 'not_started' ? badge(step)
        : h('a', { href: `${route('rollouts', id)}?step=${encodeURIComponent(step)}`, title: 'Show these devices' },
          badge(step), step === current ? ' (shown below)' : '')),
    },
    { title: 'Devices', cell: ([, n]) => show(n), num: true },
  ], Object.entries(steps || {}).filter(([, n]) => n > 0), { empty: 'No device in the target.', testid: 'steps' });
}

function tallyList(t) {
  if (!t) return null;
  const failures = Object.entries(t.failures || {}).map(([k, n]) => `${k}: ${n}`).join(', ');
  return kv([
    ['Phase', show(t.phase)],
    ['Members of the phase', show(t.members)],
    ['Reached so far', show(t.population)],
    ['Healthy', show(t.healthy)],
    ['Failed', failures ? `${t.failed} (${failures})` : show(t.failed)],
    ['Cancelled', show(t.cancelled)],
    ['Updating', show(t.updating)],
    ['Waiting to be ordered', show(t.pending)],
    ['Busy in another rollout', show(t.busy)],
  ], 'tally');
}

function phasesTable(r) {
  const phases = (r.spec && r.spec.phases) || [];
  const planned = r.planned || [];
  const live = r.status === 'running' || r.status === 'paused';
  const rows = phases.map((ph, i) => ({ ph, i, size: planned[i] }));
  return table([
    { title: 'Phase', cell: (x) => [String(x.i + 1), live && r.phase === x.i + 1 ? ' (current)' : ''] },
    { title: 'Target', cell: (x) => (x.ph.percent != null ? `${x.ph.percent} %` : show(x.ph.count)) },
    { title: 'Planned devices (cumulative)', cell: (x) => show(x.size), num: true },
    { title: 'Soak (s)', cell: (x) => show(x.ph.min_soak_s), num: true },
    { title: 'Success to advance', cell: (x) => show(x.ph.success_threshold), num: true },
    { title: 'Halt at failure rate', cell: (x) => show(x.ph.failure_rate_halt), num: true },
  ], rows, { empty: 'No phase.', testid: 'phases' });
}

export async function detail(ctx) {
  const id = ctx.args[0];
  const p = ctx.params;
  const [r, devs] = await Promise.all([
    get(`/rollouts/${seg(id)}`),
    get(`/rollouts/${seg(id)}/devices`, { step: p.get('step'), limit: pageSize(p), after: p.get('after') }),
  ]);
  const items = (devs && devs.items) || [];
  const actions = allowedActions(ctx, r);
  const buttons = actions.map((a) => {
    const b = h('button', { type: 'button', class: a.danger ? 'danger' : 'primary', 'data-action': a.action }, a.label);
    b.addEventListener('click', () => act(ctx, r, a, b));
    return b;
  });
  return h('div', null,
    h('h1', null, 'Rollout ', h('span', { 'data-testid': 'rollout-name' }, r.name || r.id)),
    kv([
      ['Status', h('span', null, h('span', { 'data-testid': 'rollout-status' }, badge(r.status)), ' ', statusText(r))],
      ['Id', h('span', { class: 'mono' }, r.id)],
      ['Model', `${r.model} v${r.version}`],
      ['Bundle', h('a', { href: route('bundles', r.bundle), class: 'mono' }, r.bundle.slice(0, 16))],
      ['Cohorts', h('span', null, (r.cohorts || []).map((c, i) => [i ? ', ' : '', link(c, 'cohorts', c)]))],
      ['Devices in the target', show(r.target)],
      ['Last change', h('span', { 'data-testid': 'rollout-reason' }, `${show(r.reason)} (${time(r.changed_at)})`)],
      ['Phase started', time(r.phase_started_at)],
      r.waiting ? ['Waiting for', r.waiting] : null,
      ['Created', `${time(r.created_at)} by ${show(r.created_by)}`],
      r.rollback_to ? ['Rolled back to', `${r.rollback_to.model} v${r.rollback_to.version}`] : null,
    ], 'rollout-summary'),
    r.halt_rule ? h('div', { class: 'halt', 'data-testid': 'halt' },
      h('strong', null, `Halted by the ${r.halt_rule} gate: `), show(r.reason)) : null,
    r.rollouts_enabled === false ? h('p', { class: 'message info' },
      'This server cannot sign deployment orders (orders_key_file and download_token_secret are not set): '
      + 'starting, resuming, retrying and rolling back are refused until they are.') : null,
    h('div', { class: 'actions', 'data-testid': 'actions' },
      buttons.length ? buttons : h('span', { class: 'muted', 'data-testid': 'no-actions' },
        'No action available to your role in this state.')),
    h('section', null, h('h2', null, 'Current phase, as the gates judge it'), tallyList(r.tally)),
    h('section', null, h('h2', null, 'Devices per step'), stepsTable(r.id, r.steps, p.get('step'))),
    h('section', null, h('h2', null, 'Phases'), phasesTable(r)),
    h('section', null, h('h2', null, p.get('step') ? ['Devices in step ', badge(p.get('step')), ' ',
      h('a', { href: route('rollouts', id) }, '(all steps)')] : 'Devices'),
      table([
        { title: 'Device', cell: (d) => link(d.device_id, 'devices', d.device_id) },
        { title: 'Step', cell: (d) => badge(d.step) },
        { title: 'Since', cell: (d) => time(d.since) },
        { title: 'Attempts', cell: (d) => show(d.attempts), num: true },
        { title: 'Reason', cell: (d) => show(d.reason) },
        { title: 'Ordered', cell: (d) => time(d.ordered_at) },
        { title: 'Rollback order', cell: (d) => (d.rollback ? 'yes' : '') },
      ], items, { empty: 'No device has been ordered yet.', testid: 'rollout-devices' }),
      pager(route('rollouts', id), p, devs.next, items.length)),
    r.spec ? h('details', null, h('summary', null, 'Definition'), json(r.spec)) : null);
}
