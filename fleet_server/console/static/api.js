// The console's only way to the server: the JSON API under /api/v1, with the session cookie (HttpOnly: the
// page never sees it) and, on unsafe requests, the session's CSRF token in X-CSRF-Token.

const UNSAFE = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);
let csrfToken = null;
const listeners = { unauthorized: [] };

export function setCsrfToken(token) { csrfToken = token || null; }

/** Called with the ApiError when any call answers 401 (the session ended): the app shows the login page. */
export function onUnauthorized(fn) { listeners.unauthorized.push(fn); }

/** An API error: status and the API's own detail text. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(ApiError.describe(status, detail));
    this.status = status;
    this.detail = detail;
  }

  static detailText(detail) {
    if (detail === null || detail === undefined) return '';
    if (typeof detail === 'string') return detail;
    if (Array.isArray(detail)) {
      // FastAPI validation errors: [{loc: [...], msg: '...'}, ...]
      return detail.map((d) => (d && d.msg ? `${(d.loc || []).filter((x) => x !== 'body').join('.')}: ${d.msg}`
        : JSON.stringify(d))).join('; ');
    }
    return JSON.stringify(detail);
  }

  static describe(status, detail) {
    const text = ApiError.detailText(detail);
    if (status === 403) return `Your role does not allow this${text ? ` (${text})` : ''}.`;
    if (status === 401) return `Please log in${text ? ` (${text})` : ''}.`;
    if (status === 0) return `The server cannot be reached${text ? `: ${text}` : ''}.`;
    return text || `The server answered ${status}.`;
  }
}

/** Query string from an object; arrays repeat the key; null/'' values are left out. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    for (const item of [v].flat()) {
      if (item !== null && item !== undefined && item !== '') q.append(k, String(item));
    }
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

/** Call the API: api('GET', '/devices', {query: {...}}) -> parsed JSON; throws ApiError. */
export async function api(method, path, { params, body } = {}) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store', redirect: 'error' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  if (UNSAFE.has(method) && csrfToken) headers['X-CSRF-Token'] = csrfToken;
  let resp;
  try {
    resp = await fetch(`/api/v1${path}${query(params)}`, init);
  } catch (err) {
    throw new ApiError(0, String(err && err.message ? err.message : err));
  }
  const type = resp.headers.get('Content-Type') || '';
  let data = null;
  if (resp.status !== 204 && type.includes('json')) {
    try { data = await resp.json(); } catch { data = null; }
  } else if (resp.status !== 204) {
    data = await resp.text();
  }
  if (!resp.ok) {
    const detail = data && typeof data === 'object' && 'detail' in data ? data.detail : data;
    const error = new ApiError(resp.status, detail);
    if (resp.status === 401) listeners.unauthorized.forEach((fn) => fn(error));
    throw error;
  }
  return data;
}

export const get = (path, params) => api('GET', path, { params });
export const post = (path, body) => api('POST', path, { body });

/** A path segment, escaped. */
export const seg = (value) => encodeURIComponent(String(value));
