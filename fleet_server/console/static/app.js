// The console's shell: session, navigation (the URL fragment names the view: #/devices?status=online) and
// the message banner. Views live in views.js and rollouts.js; every byte of data comes from /api/v1.

import { ApiError, get, onUnauthorized, post, setCsrfToken } from './api.js';
import { replace } from './dom.js';
import * as views from './views.js';
import * as rollouts from './rollouts.js';

const state = { me: null, checked: false, policy: null, renders: 0, flash: null };

const ROUTES = {
  '': { view: views.dashboard, nav: 'dashboard' },
  login: { view: views.login, public: true },
  devices: { view: views.devices, detail: views.device, nav: 'devices' },
  cohorts: { view: views.cohorts, detail: views.cohort, nav: 'cohorts' },
  bundles: { view: views.bundles, detail: views.bundle, nav: 'bundles' },
  rollouts: { view: rollouts.list, detail: rollouts.detail, nav: 'rollouts' },
  audit: { view: views.audit, nav: 'audit' },
};

const $ = (id) => document.getElementById(id);

/** '#/devices/abc?x=1' -> {name: 'devices', args: ['abc'], params: URLSearchParams}. */
function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, '');
  const [path, search = ''] = raw.split('?', 2);
  const parts = path.split('/').filter((p) => p !== '').map((p) => {
    try { return decodeURIComponent(p); } catch { return p; }
  });
  return { name: parts[0] || '', args: parts.slice(1), params: new URLSearchParams(search), hash: `#/${raw}` };
}

/** Show a message above the view (kind: 'error' or 'info'); sticky = survive the next navigation. */
export function notify(text, kind = 'error', { sticky = false } = {}) {
  const box = $('message');
  box.className = `message ${kind}`;
  box.textContent = text;
  box.hidden = false;
  box.dataset.kind = kind;
  if (sticky) state.flash = { text, kind };
}

function clearMessage() {
  const box = $('message');
  box.hidden = true;
  box.textContent = '';
}

/** Whether the logged-in user's role holds `role` (roles are ordered weakest first in the policy). */
export function roleAtLeast(role) {
  if (!state.me || !state.policy) return false;
  const order = state.policy.roles;
  return order.indexOf(state.me.role) >= order.indexOf(role) && order.indexOf(role) >= 0;
}

function showSession() {
  const me = state.me;
  $('nav').hidden = !me;
  $('who').hidden = !me;
  $('nav-audit').hidden = !(me && roleAtLeast('admin'));
  $('who-name').textContent = me ? me.username : '';
  $('who-role').textContent = me ? me.role : '';
}

function markNav(nav) {
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.nav === nav);
}

function setSession(me) {
  state.me = me;
  state.checked = true;
  setCsrfToken(me ? me.csrf_token : null);
  showSession();
}

function toLogin(reason) {
  const here = parseHash();
  setSession(null);
  if (here.name !== 'login') {
    const next = here.name ? `?next=${encodeURIComponent(here.hash)}` : '';
    if (reason) notify(reason, 'info', { sticky: true });
    window.location.hash = `#/login${next}`;
  }
}

async function loadSession() {
  if (!state.policy) state.policy = await fetch('/console/policy.json', { cache: 'no-store' }).then((r) => r.json());
  if (state.me || state.checked) return state.me;
  try {
    setSession(await get('/auth/me'));
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) throw err;
    setSession(null);
  }
  return state.me;
}

async function render() {
  const ticket = ++state.renders;
  const where = parseHash();
  const main = $('view');
  const route = ROUTES[where.name];
  const flash = state.flash;
  state.flash = null;
  if (flash) notify(flash.text, flash.kind); else clearMessage();
  main.setAttribute('aria-busy', 'true');
  try {
    const me = await loadSession();
    if (!route) {
      replace(main, views.notFound(where.hash));
      return;
    }
    if (!route.public && !me) {
      toLogin();
      return;
    }
    if (where.name === 'login' && me) {
      window.location.hash = where.params.get('next') || '#/';
      return;
    }
    markNav(route.nav);
    const ctx = {
      me, policy: state.policy, params: where.params, args: where.args, hash: where.hash,
      notify, roleAtLeast, setSession, refresh: render, stale: () => ticket !== state.renders,
    };
    const view = where.args.length && route.detail ? route.detail : route.view;
    const node = await view(ctx);
    if (ticket === state.renders && node) {
      replace(main, node);
      main.dataset.hash = where.hash; // which view is on screen (tests and scripts can wait for it)
    }
  } catch (err) {
    if (ticket !== state.renders) return;
    if (err instanceof ApiError && err.status === 401) return; // onUnauthorized took us to the login page
    replace(main, views.failed(err));
    notify(err instanceof ApiError ? err.message : `Unexpected error: ${err}`);
  } finally {
    if (ticket === state.renders) main.setAttribute('aria-busy', 'false');
  }
}

async function logout() {
  try {
    await post('/auth/logout');
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) {
      notify(err.message || String(err));
      return;
    }
  }
  setSession(null);
  notify('You are logged out.', 'info', { sticky: true });
  window.location.hash = '#/login';
}

onUnauthorized(() => {
  if (state.me) toLogin('Your session has ended: please log in again.');
  else toLogin();
});
$('logout').addEventListener('click', logout);
window.addEventListener('hashchange', render);
render();
