// tokengate web console. Plain JavaScript, no build step, no third-party code: it is
// compiled into the control plane and talks to the same /v1 API as the CLI. The session
// lives in an HttpOnly cookie; the CSRF token only in this page's memory.
'use strict';

const PAGE_SIZE = 20;
const DAY = 86400;
const PRESETS = [
  { value: '3600', label: '1 hour', seconds: 3600 },
  { value: '86400', label: '1 day', seconds: DAY },
  { value: '604800', label: '7 days', seconds: 7 * DAY },
  { value: '2592000', label: '30 days', seconds: 30 * DAY },
  { value: '5184000', label: '60 days', seconds: 60 * DAY },
  { value: '7776000', label: '90 days', seconds: 90 * DAY },
  { value: 'never', label: 'No expiration', seconds: null },
  { value: 'custom', label: 'Custom date…', seconds: null },
];
const AUDIT_ACTIONS = [
  'token.created', 'token.updated', 'token.suspended', 'token.reactivated',
  'token.rotated', 'token.revoked', 'token.expiry_warning', 'token.purged',
  'token.quota_exhausted', 'scope.created', 'scope.updated', 'scope.deleted',
];
// How a quota's period reads after "used/limit".
const PERIOD_NOW = { hour: 'this hour', day: 'today', month: 'this month' };

const state = {
  session: null,
  cursors: [null], // cursor of each page visited; the last one is the current page's
  nextCursor: null,
  tokens: new Map(),
  scopes: [], // every scope, by name, as last loaded
  auditCursor: null,
  pending: null, // the token or scope a dialog acts on
  confirm: null, // what the confirmation dialog does when confirmed
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('data-') || k.startsWith('aria-') || k === 'title' || k === 'type' || k === 'name') node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `The server answered ${status}.`);
    this.status = status;
    this.field = body && body.field;
    this.code = body && body.error;
    this.tokens = body && body.tokens;
  }
}

async function api(method, path, body) {
  const headers = { accept: 'application/json' };
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (method !== 'GET' && state.session) headers['x-csrf-token'] = state.session.csrf_token;
  let res;
  try {
    res = await fetch(path, {
      method, headers, credentials: 'same-origin', cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, { message: 'The control plane cannot be reached.' });
  }
  let data = null;
  if (res.status !== 204) {
    try { data = await res.json(); } catch (e) { data = null; }
  }
  if (!res.ok) {
    const err = new ApiError(res.status, data);
    if (res.status === 401 && path !== '/v1/session') showSignIn('Your session has ended. Sign in again.');
    throw err;
  }
  return data;
}

function say(message, kind) {
  const s = $('status');
  s.textContent = message || '';
  s.className = 'status' + (kind ? ' ' + kind : '');
}

// ---- time ----

const relative = new Intl.RelativeTimeFormat('en', { numeric: 'always' });
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
// The largest unit that fits, so that 7 days less a few seconds still reads "in 7 days".
const UNITS = [['year', 365 * DAY, 730 * DAY], ['month', 30 * DAY, 60 * DAY], ['day', DAY, 0.95 * DAY],
  ['hour', 3600, 0.95 * 3600], ['minute', 60, 55], ['second', 1, 0]];

function fromNow(iso) {
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  const [unit, size] = UNITS.find(([, , from]) => Math.abs(seconds) >= from);
  return relative.format(Math.round(seconds / size), unit);
}

function when(iso) {
  return dateFormat.format(new Date(iso));
}

// ---- views ----

function show(view) {
  for (const v of ['signin-view', 'tokens-view', 'scopes-view', 'audit-view']) $(v).hidden = v !== view;
  const signedIn = view !== 'signin-view';
  $('nav').hidden = !signedIn;
  $('who').hidden = !signedIn;
  for (const [link, target] of [['nav-tokens', 'tokens-view'], ['nav-scopes', 'scopes-view'], ['nav-audit', 'audit-view']]) {
    if (view === target) $(link).setAttribute('aria-current', 'page');
    else $(link).removeAttribute('aria-current');
  }
}

function showSignIn(message) {
  state.session = null;
  state.tokens.clear();
  state.scopes = [];
  $('tokens').tBodies[0].replaceChildren();
  $('scopes').tBodies[0].replaceChildren();
  $('audit').tBodies[0].replaceChildren();
  hideSecret();
  for (const d of document.querySelectorAll('dialog[open]')) d.close();
  show('signin-view');
  $('signin-error').textContent = message || '';
  $('credential').focus();
}

async function route() {
  if (!state.session) return;
  if (location.hash === '#audit') {
    show('audit-view');
    await loadAudit(true);
  } else if (location.hash === '#scopes') {
    show('scopes-view');
    await loadScopes();
  } else {
    show('tokens-view');
    await loadTokens();
  }
}

async function start() {
  for (const a of AUDIT_ACTIONS) $('a-action').append(el('option', { value: a, text: a }));
  wire();
  try {
    state.session = await api('GET', '/v1/session');
  } catch (e) {
    showSignIn(e.status === 401 ? '' : e.message);
    return;
  }
  signedIn();
}

function signedIn() {
  $('actor').textContent = state.session.actor;
  route().catch((e) => say(e.message, 'bad'));
}

// ---- token list ----

function listQuery() {
  const q = new URLSearchParams({ limit: String(PAGE_SIZE), order: 'newest' });
  const add = (k, v) => { if (v.trim()) q.set(k, v.trim()); };
  add('name_contains', $('f-name').value);
  add('status', $('f-status').value);
  add('kind', $('f-kind').value);
  add('owner', $('f-owner').value);
  const cursor = state.cursors[state.cursors.length - 1];
  if (cursor) q.set('cursor', cursor);
  return q;
}

async function loadTokens() {
  const page = await api('GET', '/v1/tokens?' + listQuery());
  state.nextCursor = page.next_cursor;
  state.tokens.clear();
  const rows = page.tokens.map((t) => { state.tokens.set(t.id, t); return tokenRow(t); });
  $('tokens').tBodies[0].replaceChildren(...rows);
  $('tokens-empty').hidden = rows.length > 0;
  $('prev').disabled = state.cursors.length === 1;
  $('next').disabled = !state.nextCursor;
  $('page-no').textContent = `Page ${state.cursors.length}`;
}

function firstPage() {
  state.cursors = [null];
  loadTokens().catch((e) => say(e.message, 'bad'));
}

function expiryCell(t) {
  if (!t.expires_at) return el('td', { class: 'expiry-cell muted', 'data-label': 'Expires' }, 'Never');
  const left = (Date.parse(t.expires_at) - Date.now()) / 1000;
  const warn = state.session && left <= state.session.expiry_warning_seconds;
  const cls = 'expiry-cell' + (t.expired || left <= 0 ? ' expired' : warn ? ' warn' : '');
  const hint = t.expired || left <= 0 ? `expired ${fromNow(t.expires_at)}` : `expires ${fromNow(t.expires_at)}`;
  return el('td', { class: cls, title: t.expires_at, 'data-label': 'Expires' },
    el('span', { class: 'date' }, when(t.expires_at)), el('span', { class: 'hint' }, hint));
}

// A token's quota: "used/limit this <period>", with when it starts over. Records from a
// control plane without quotas carry neither field: the cell then says nothing is set.
function quotaCell(t) {
  const q = t.quota;
  if (!q) return el('td', { class: 'quota-cell muted', 'data-label': 'Quota' }, 'None');
  const u = t.quota_usage;
  const period = PERIOD_NOW[q.period] || `per ${q.period}`;
  if (!u) return el('td', { class: 'quota-cell', 'data-label': 'Quota' }, `${q.limit} ${period.replace(/^this /, 'per ')}`);
  const spent = u.remaining === 0;
  const hint = u.resets_at ? `${spent ? 'used up, resets' : 'resets'} ${fromNow(u.resets_at)}` : null;
  return el('td', { class: 'quota-cell' + (spent ? ' warn' : ''), title: u.resets_at || null, 'data-label': 'Quota', 'data-remaining': String(u.remaining) },
    el('span', { class: 'date' }, `${u.used}/${q.limit} ${period}`), hint && el('span', { class: 'hint' }, hint));
}

// null: unrestricted; []: no request at all; else the names.
function scopesCell(t) {
  const names = t.scopes;
  if (names === undefined || names === null) return el('td', { class: 'scopes-cell muted', 'data-label': 'Scopes' }, 'unrestricted');
  if (names.length === 0) return el('td', { class: 'scopes-cell warn', 'data-label': 'Scopes' }, 'none', el('span', { class: 'hint' }, 'every request refused'));
  return el('td', { class: 'scopes-cell', 'data-label': 'Scopes' }, ...names.map((n) => el('span', { class: 'scope-tag' }, n)));
}

function statusBadge(t) {
  if (t.expired) return el('span', { class: 'badge expired' }, 'expired');
  return el('span', { class: 'badge ' + t.status }, t.status);
}

function tokenRow(t) {
  const act = (action, label, cls) => el('button', {
    type: 'button', class: cls || '', 'data-action': action, 'aria-label': `${label} ${t.name}`,
  }, label);
  const toggle = t.status === 'suspended' ? act('reactivate', 'Reactivate') : act('suspend', 'Suspend');
  const fleet = t.max_rps !== null && t.limit_scope === 'fleet' ? act('fleet', 'Fleet') : null;
  const lastUsed = t.last_used_at
    ? el('td', { class: 'used-cell', title: t.last_used_at, 'data-label': 'Last used' }, fromNow(t.last_used_at))
    : el('td', { class: 'used-cell muted', 'data-label': 'Last used' }, 'Never used');
  const grace = t.old_secret_valid_until
    ? el('span', { class: 'hint' }, `old secret works until ${when(t.old_secret_valid_until)}`) : null;
  return el('tr', { 'data-id': t.id, 'data-status': t.status },
    el('th', { scope: 'row' }, el('span', { class: 'name' }, t.name), el('span', { class: 'hint mono' }, t.id), grace),
    el('td', { 'data-label': 'Kind' }, t.kind),
    el('td', { 'data-label': 'Owner' }, t.owner),
    el('td', { class: 'status-cell', 'data-label': 'Status' }, statusBadge(t)),
    el('td', { class: 'num', 'data-label': 'Max RPS' }, t.max_rps === null ? el('span', { class: 'muted' }, 'Unlimited')
      : el('span', {}, String(t.max_rps), el('span', { class: 'hint', 'data-scope': t.limit_scope }, t.limit_scope === 'proxy' ? 'per Envoy' : 'whole fleet'))),
    quotaCell(t),
    scopesCell(t),
    expiryCell(t),
    lastUsed,
    el('td', { class: 'row-actions' },
      toggle, act('edit', 'Edit'), fleet, act('rotate', 'Rotate'), act('audit', 'Audit'), act('revoke', 'Revoke', 'danger')),
  );
}

function replaceRow(t) {
  state.tokens.set(t.id, t);
  const old = document.querySelector(`#tokens tr[data-id="${CSS.escape(t.id)}"]`);
  if (old) old.replaceWith(tokenRow(t));
}

async function rowAction(action, t) {
  switch (action) {
    case 'suspend':
    case 'reactivate': {
      const updated = await api('POST', `/v1/tokens/${encodeURIComponent(t.id)}/${action}`);
      replaceRow(updated);
      say(`${updated.name} is ${updated.status}.`, 'ok');
      break;
    }
    case 'edit': openEdit(t); break;
    case 'fleet': {
      const live = await api('GET', `/v1/tokens/${encodeURIComponent(t.id)}`);
      say(fleetSummary(live), 'ok');
      break;
    }
    case 'rotate': openRotate(t); break;
    case 'revoke': openRevoke(t); break;
    case 'audit':
      $('a-token').value = t.id;
      $('a-actor').value = '';
      $('a-action').value = '';
      location.hash = '#audit';
      break;
    default: break;
  }
}

// The live fleet view of a fleet-limited token, in one sentence.
function fleetSummary(t) {
  const f = t.fleet;
  if (!f) return `${t.name}: no fleet view (the limit is per Envoy, or there is none).`;
  const rate = (x) => (Math.round(x * 10) / 10).toString();
  const shares = f.shares.map((s) => `${s.proxy_id} admits ${rate(s.admitted_rps)}/s, share ${rate(s.share_rps)}/s`);
  return `${t.name}: ${rate(f.admitted_rps)}/s admitted of ${t.max_rps}/s across ${f.proxies_seen} of ${f.proxies_live} live Envoys`
    + (shares.length ? ` (${shares.join('; ')})` : '') + '.';
}

// ---- the one-time secret ----

function showSecret(title, secret) {
  $('secret-title').textContent = title;
  $('secret-value').textContent = secret;
  $('copy-secret').textContent = 'Copy';
  $('secret-panel').hidden = false;
  $('copy-secret').focus();
}

function hideSecret() {
  $('secret-value').textContent = '';
  $('secret-panel').hidden = true;
}

async function copySecret() {
  const text = $('secret-value').textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    // No clipboard permission (e.g. plain http on a non-local host): select it instead.
    const range = document.createRange();
    range.selectNodeContents($('secret-value'));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    document.execCommand('copy');
  }
  $('copy-secret').textContent = 'Copied';
}

// ---- dialogs ----

function clearErrors(form) {
  for (const p of form.querySelectorAll('.error')) p.textContent = '';
  for (const i of form.querySelectorAll('[aria-invalid]')) i.removeAttribute('aria-invalid');
}

// Drops a field's error once the field is changed.
function forget(id) {
  const err = $(`${id}-error`);
  if (err) err.textContent = '';
  $(id).removeAttribute('aria-invalid');
}

function fieldError(prefix, fields, err) {
  const id = fields[err.field];
  if (id) {
    $(`${prefix}-${id}-error`).textContent = err.message;
    const input = $(`${prefix}-${id}`);
    input.setAttribute('aria-invalid', 'true');
    input.focus();
  } else {
    $(`${prefix}-error`).textContent = err.message;
  }
}

function kindLimits() {
  const kind = $('generate-form').elements.kind.value;
  return state.session[kind];
}

function refreshExpiryOptions() {
  const limits = kindLimits();
  const select = $('g-expiry');
  const previous = select.value;
  select.replaceChildren();
  let best = null;
  for (const p of PRESETS) {
    const tooLong = p.seconds !== null && limits.max_lifetime_seconds !== null && p.seconds > limits.max_lifetime_seconds;
    const forbidden = tooLong || (p.value === 'never' && limits.require_expiry);
    select.append(el('option', { value: p.value, disabled: forbidden }, p.label + (forbidden ? ' (not allowed)' : '')));
    if (!forbidden && p.seconds !== null && p.seconds <= 30 * DAY) best = p.value;
  }
  const keep = [...select.options].find((o) => o.value === previous && !o.disabled);
  select.value = keep ? previous : best || 'custom';
  const kind = $('generate-form').elements.kind.value;
  $('g-owner-hint').textContent = kind === 'user'
    ? `The person it acts for; empty: you (${state.session.actor}).`
    : 'The group that owns the automation (required).';
  refreshExpiryHint();
}

function refreshExpiryHint() {
  const v = $('g-expiry').value;
  $('g-date').hidden = v !== 'custom';
  const limits = kindLimits();
  const cap = limits.max_lifetime_seconds;
  let hint = '';
  if (v === 'never') hint = 'The token will never expire. Prefer an expiry: it limits the harm of a leak.';
  else if (v === 'custom') hint = cap ? `Any date up to ${when(new Date(Date.now() + cap * 1000))}.` : 'Pick the last day the token works.';
  else hint = `The token will expire on ${when(new Date(Date.now() + Number(v) * 1000))}.`;
  $('g-expiry-hint').textContent = hint;
}

// ---- a token's scopes and quota, in the generate and edit dialogs ----

async function fetchScopes() {
  const page = await api('GET', '/v1/scopes');
  state.scopes = page.scopes;
  return state.scopes;
}

// The scope checkboxes of the dialog `prefix` (g or e), `selected` ticked; null: unrestricted.
function renderAccess(prefix, selected) {
  const form = $(`${prefix}-scopes`).form;
  const ticked = new Set(selected || []);
  // A scope the token names is listed even before the list of scopes has arrived.
  const names = [...new Set([...state.scopes.map((sc) => sc.name), ...ticked])].sort();
  const about = new Map(state.scopes.map((sc) => [sc.name, sc.description]));
  const boxes = names.map((n) => el('label', { class: 'inline' },
    el('input', { type: 'checkbox', name: 'scope', value: n, checked: ticked.has(n) }),
    el('code', {}, n), about.get(n) ? el('span', { class: 'muted' }, about.get(n)) : null));
  $(`${prefix}-scope-list`).replaceChildren(...boxes);
  form.elements.access.value = selected === null || selected === undefined ? 'unrestricted' : 'scoped';
  refreshAccess(prefix);
}

function refreshAccess(prefix) {
  const form = $(`${prefix}-scopes`).form;
  const scoped = form.elements.access.value === 'scoped';
  for (const box of $(`${prefix}-scope-list`).querySelectorAll('input')) box.disabled = !scoped;
  const ticked = $(`${prefix}-scope-list`).querySelectorAll('input:checked').length;
  let hint = '';
  if (!scoped) hint = 'The token may call any method on any path behind Envoy.';
  else if (state.scopes.length === 0 && ticked === 0) hint = 'There are no scopes yet: create them under Scopes. With none ticked, every request is refused.';
  else if (ticked === 0) hint = 'None ticked: every request is refused (403 insufficient_scope).';
  else hint = 'Envoy lets through only the requests one of the ticked scopes covers.';
  $(`${prefix}-scopes-hint`).textContent = hint;
}

// null: unrestricted; otherwise the ticked names (possibly none).
function readAccess(prefix) {
  const form = $(`${prefix}-scopes`).form;
  if (form.elements.access.value !== 'scoped') return null;
  return [...$(`${prefix}-scope-list`).querySelectorAll('input:checked')].map((b) => b.value);
}

// null: no quota; NaN: not a usable limit; else the quota.
function readQuota(prefix) {
  const raw = $(`${prefix}-quota-limit`).value.trim();
  if (!raw) return null;
  const limit = positiveInteger(raw);
  if (Number.isNaN(limit)) return NaN;
  return { limit, period: $(`${prefix}-quota-period`).value };
}

function showQuota(prefix, quota) {
  $(`${prefix}-quota-limit`).value = quota ? String(quota.limit) : '';
  const select = $(`${prefix}-quota-period`);
  // A period the page does not offer (a test server's "10s") is kept as it is.
  if (quota && ![...select.options].some((o) => o.value === quota.period)) {
    select.append(el('option', { value: quota.period, text: `per ${quota.period}` }));
  }
  select.value = quota ? quota.period : 'day';
}

const QUOTA_MESSAGE = 'A whole number of requests per period, or empty for no quota.';

// Where the API's fields are shown in the dialog `prefix`.
function tokenFields(prefix) {
  const fields = { name: 'name', max_rps: 'rps', limit_scope: 'scope', scopes: 'scopes', quota: 'quota-limit', 'quota.limit': 'quota-limit', 'quota.period': 'quota-period' };
  if (prefix === 'g') Object.assign(fields, { kind: 'kind', owner: 'owner', expires_in_seconds: 'expiry', expires_at: 'expiry' });
  return fields;
}

function openGenerate() {
  const form = $('generate-form');
  form.reset();
  clearErrors(form);
  const tomorrow = new Date(Date.now() + DAY * 1000);
  $('g-date').min = tomorrow.toISOString().slice(0, 10);
  refreshExpiryOptions();
  showQuota('g', null);
  renderAccess('g', null);
  fetchScopes().then(() => renderAccess('g', readAccess('g'))).catch((e) => say(e.message, 'bad'));
  $('generate-dialog').showModal();
  $('g-name').focus();
}

function sameJson(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

function positiveInteger(value) {
  const n = Number(value);
  return Number.isInteger(n) && n > 0 ? n : NaN;
}

async function submitGenerate(ev) {
  ev.preventDefault();
  const form = $('generate-form');
  clearErrors(form);
  const body = { name: $('g-name').value.trim(), kind: form.elements.kind.value };
  if (!body.name) return fieldError('g', { name: 'name' }, { field: 'name', message: 'Give the token a name.' });
  if ($('g-owner').value.trim()) body.owner = $('g-owner').value.trim();
  if ($('g-rps').value.trim()) {
    body.max_rps = positiveInteger($('g-rps').value);
    if (Number.isNaN(body.max_rps)) {
      return fieldError('g', { max_rps: 'rps' }, { field: 'max_rps', message: 'A whole number of requests per second, or empty for unlimited.' });
    }
    body.limit_scope = $('g-scope').value;
  }
  const quota = readQuota('g');
  if (Number.isNaN(quota)) return fieldError('g', { quota: 'quota-limit' }, { field: 'quota', message: QUOTA_MESSAGE });
  // Left out when there is none, so a control plane without quotas still takes the body.
  if (quota) body.quota = quota;
  const scopes = readAccess('g');
  if (scopes !== null) body.scopes = scopes;
  const expiry = $('g-expiry').value;
  if (expiry === 'custom') {
    if (!$('g-date').value) return fieldError('g', { expires_at: 'expiry' }, { field: 'expires_at', message: 'Pick a date.' });
    const [y, m, d] = $('g-date').value.split('-').map(Number);
    body.expires_at = new Date(y, m - 1, d, 23, 59, 59).toISOString().replace(/\.\d{3}Z$/, 'Z');
  } else if (expiry !== 'never') {
    body.expires_in_seconds = Number(expiry);
  }
  try {
    const created = await api('POST', '/v1/tokens', body);
    $('generate-dialog').close();
    showSecret(`Your new token “${created.name}”`, created.token);
    say(`Created ${created.name}.`, 'ok');
    await loadTokens();
  } catch (e) {
    fieldError('g', tokenFields('g'), e);
  }
}

function openEdit(t) {
  state.pending = t;
  const form = $('edit-form');
  clearErrors(form);
  $('edit-title').textContent = `Edit ${t.name}`;
  $('e-name').value = t.name;
  $('e-rps').value = t.max_rps === null ? '' : String(t.max_rps);
  $('e-scope').value = t.limit_scope || 'fleet';
  showQuota('e', t.quota || null);
  renderAccess('e', t.scopes === undefined ? null : t.scopes);
  fetchScopes().then(() => { if (state.pending === t) renderAccess('e', readAccess('e')); }).catch((e) => say(e.message, 'bad'));
  $('edit-dialog').showModal();
  $('e-name').focus();
}

async function submitEdit(ev) {
  ev.preventDefault();
  const t = state.pending;
  clearErrors($('edit-form'));
  const body = {};
  const name = $('e-name').value.trim();
  if (name !== t.name) body.name = name;
  const raw = $('e-rps').value.trim();
  const rps = raw ? positiveInteger(raw) : null;
  if (Number.isNaN(rps)) {
    return fieldError('e', { max_rps: 'rps' }, { field: 'max_rps', message: 'A whole number of requests per second, or empty for unlimited.' });
  }
  if (rps !== t.max_rps) body.max_rps = rps;
  if ($('e-scope').value !== t.limit_scope) body.limit_scope = $('e-scope').value;
  const quota = readQuota('e');
  if (Number.isNaN(quota)) return fieldError('e', { quota: 'quota-limit' }, { field: 'quota', message: QUOTA_MESSAGE });
  if (!sameJson(quota, t.quota || null)) body.quota = quota;
  const scopes = readAccess('e');
  const had = t.scopes === undefined ? null : t.scopes;
  if (!sameJson(scopes && [...scopes].sort(), had && [...had].sort())) body.scopes = scopes;
  if (Object.keys(body).length === 0) { $('edit-dialog').close(); return; }
  try {
    const updated = await api('PATCH', `/v1/tokens/${encodeURIComponent(t.id)}`, body);
    $('edit-dialog').close();
    replaceRow(updated);
    say(`Saved ${updated.name}.`, 'ok');
  } catch (e) {
    fieldError('e', tokenFields('e'), e);
  }
}

function openRotate(t) {
  state.pending = t;
  clearErrors($('rotate-form'));
  $('rotate-title').textContent = `Rotate ${t.name}`;
  $('rotate-dialog').showModal();
  $('r-grace').focus();
}

async function submitRotate(ev) {
  ev.preventDefault();
  const t = state.pending;
  try {
    const rotated = await api('POST', `/v1/tokens/${encodeURIComponent(t.id)}/rotate`, { grace_seconds: Number($('r-grace').value) });
    $('rotate-dialog').close();
    replaceRow(rotated);
    showSecret(`The new secret of “${rotated.name}”`, rotated.token);
    say(`Rotated ${rotated.name}.`, 'ok');
  } catch (e) {
    $('r-error').textContent = e.message;
  }
}

// Asks first; `run` does it once confirmed, and its error stays in the dialog.
function confirmThen(title, text, button, run) {
  state.confirm = run;
  clearErrors($('confirm-form'));
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-go').textContent = button;
  $('confirm-dialog').showModal();
  $('confirm-form').querySelector('.cancel').focus();
}

async function submitConfirm(ev) {
  ev.preventDefault();
  const run = state.confirm;
  if (!run) return;
  try {
    await run();
    $('confirm-dialog').close();
  } catch (e) {
    $('c-error').textContent = e.message;
  }
}

function openRevoke(t) {
  confirmThen(`Revoke ${t.name}?`,
    `Every client using “${t.name}” (${t.id}) is refused within moments. This cannot be undone.`,
    'Revoke token',
    async () => {
      await api('DELETE', `/v1/tokens/${encodeURIComponent(t.id)}`);
      say(`Revoked ${t.name}.`, 'ok');
      await loadTokens();
    });
}

// ---- scopes ----

function ruleText(r) {
  return r.methods ? `${r.methods.join(',')} ${r.path}` : r.path;
}

// One rule a line, `[METHODS ]PATH`, as the CLI's --rule reads it. Blank lines are skipped;
// `lines[i]` is the line number of rule i, for the API's `rules[i]` errors.
function parseRules(text) {
  const rules = [];
  const lines = [];
  const rows = text.split('\n');
  for (let i = 0; i < rows.length; i++) {
    const v = rows[i].trim();
    if (!v) continue;
    if (v.startsWith('/')) {
      rules.push({ path: v });
    } else {
      const at = v.search(/\s/);
      if (at < 0) return { error: `Line ${i + 1}: a rule is [METHODS ]PATH, e.g. “GET,HEAD /orders/**” or “/health”.` };
      rules.push({ methods: v.slice(0, at).split(','), path: v.slice(at).trim() });
    }
    lines.push(i + 1);
  }
  if (rules.length === 0) return { error: 'Give at least one rule.' };
  return { rules, lines };
}

function scopeRow(sc) {
  const shown = sc.rules.slice(0, 4).map((r) => el('code', { class: 'rule' }, ruleText(r)));
  const more = sc.rules.length > shown.length ? el('span', { class: 'hint' }, `and ${sc.rules.length - shown.length} more`) : null;
  const act = (action, label, cls) => el('button', {
    type: 'button', class: cls || '', 'data-action': action, 'aria-label': `${label} ${sc.name}`,
  }, label);
  return el('tr', { 'data-name': sc.name },
    el('th', { scope: 'row' }, el('span', { class: 'name' }, sc.name)),
    el('td', { class: sc.description ? '' : 'muted', 'data-label': 'Description' }, sc.description || '—'),
    el('td', { class: 'rules-cell', 'data-label': 'Rules', title: sc.rules.map(ruleText).join('\n') }, ...shown, more),
    el('td', { title: sc.updated_at, 'data-label': 'Updated' },
      el('span', { class: 'date' }, fromNow(sc.updated_at)), el('span', { class: 'hint' }, `version ${sc.version}`)),
    el('td', { class: 'row-actions' }, act('edit', 'Edit'), act('delete', 'Delete', 'danger')),
  );
}

async function loadScopes() {
  const scopes = await fetchScopes();
  $('scopes').tBodies[0].replaceChildren(...scopes.map(scopeRow));
  $('scopes-empty').hidden = scopes.length > 0;
}

function openScope(sc) {
  state.pending = sc;
  const form = $('scope-form');
  form.reset();
  clearErrors(form);
  $('scope-dialog-title').textContent = sc ? `Edit ${sc.name}` : 'New scope';
  $('s-submit').textContent = sc ? 'Save' : 'Create scope';
  $('s-name').value = sc ? sc.name : '';
  $('s-name').disabled = !!sc;
  $('s-description').value = sc ? sc.description : '';
  $('s-rules').value = sc ? sc.rules.map(ruleText).join('\n') : '';
  $('scope-dialog').showModal();
  (sc ? $('s-rules') : $('s-name')).focus();
}

// The API names `name`, `description`, `rules` or `rules[i].path|methods`; the last are
// shown at the rules, with the line they came from.
function scopeError(err, lines) {
  const m = /^rules\[(\d+)\]/.exec(err.field || '');
  if (m && lines && lines[Number(m[1])] !== undefined) {
    return fieldError('s', { [err.field]: 'rules' }, { field: err.field, message: `Line ${lines[Number(m[1])]}: ${err.message}` });
  }
  // A taken name is a 409 without a field.
  if (err.status === 409 && !err.field && !state.pending) return fieldError('s', { name: 'name' }, { field: 'name', message: err.message });
  return fieldError('s', { name: 'name', description: 'description', rules: 'rules' }, err);
}

async function submitScope(ev) {
  ev.preventDefault();
  const sc = state.pending;
  clearErrors($('scope-form'));
  const name = $('s-name').value.trim();
  if (!sc && !name) return fieldError('s', { name: 'name' }, { field: 'name', message: 'Give the scope a name.' });
  const parsed = parseRules($('s-rules').value);
  if (parsed.error) return fieldError('s', { rules: 'rules' }, { field: 'rules', message: parsed.error });
  const description = $('s-description').value.trim();
  try {
    let saved;
    if (sc) {
      const body = {};
      if (description !== sc.description) body.description = description;
      if (!sameJson(parsed.rules, sc.rules)) body.rules = parsed.rules;
      if (Object.keys(body).length === 0) { $('scope-dialog').close(); return; }
      saved = await api('PATCH', `/v1/scopes/${encodeURIComponent(sc.name)}`, body);
    } else {
      const body = { name, rules: parsed.rules };
      if (description) body.description = description;
      saved = await api('POST', '/v1/scopes', body);
    }
    $('scope-dialog').close();
    await loadScopes();
    say(sc ? `Saved ${saved.name}.` : `Created ${saved.name}.`, 'ok');
  } catch (e) {
    scopeError(e, parsed.lines);
  }
}

function openDeleteScope(sc) {
  confirmThen(`Delete ${sc.name}?`,
    `The scope “${sc.name}” is removed. It cannot be deleted while a token names it: take it off those tokens first.`,
    'Delete scope',
    async () => {
      try {
        await api('DELETE', `/v1/scopes/${encodeURIComponent(sc.name)}`);
      } catch (e) {
        if (e.code !== 'scope_in_use') throw e;
        const n = e.tokens === 1 ? '1 token still names it' : `${e.tokens} tokens still name it`;
        throw new Error(`${sc.name} is in use: ${n}. Take it off them first (Edit on the token's row, Scopes).`);
      }
      await loadScopes();
      say(`Deleted ${sc.name}.`, 'ok');
    });
}

// ---- audit ----

function auditQuery() {
  const q = new URLSearchParams({ limit: '50' });
  const add = (k, v) => { if (v.trim()) q.set(k, v.trim()); };
  add('token', $('a-token').value);
  add('actor', $('a-actor').value);
  add('action', $('a-action').value);
  if (state.auditCursor) q.set('cursor', state.auditCursor);
  return q;
}

function describeChange(e) {
  const before = e.before || {};
  const after = e.after || {};
  const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])];
  const show = (v) => (v === null || v === undefined ? '—' : typeof v === 'object' ? JSON.stringify(v) : String(v));
  if (!e.before) return keys.filter((k) => after[k] !== null).map((k) => `${k}: ${show(after[k])}`).join(', ');
  return keys.map((k) => `${k}: ${show(before[k])} → ${show(after[k])}`).join(', ');
}

async function loadAudit(fresh) {
  if (fresh) state.auditCursor = null;
  const page = await api('GET', '/v1/audit?' + auditQuery());
  const rows = page.entries.map((e) => el('tr', { 'data-seq': String(e.seq) },
    el('td', { title: e.at, 'data-label': 'When' }, when(e.at)),
    el('td', { 'data-label': 'Actor' }, e.actor),
    el('td', { 'data-label': 'Action' }, el('code', {}, e.action)),
    e.scope
      ? el('td', { 'data-label': 'Scope' }, el('span', { class: 'name' }, e.scope), el('span', { class: 'hint' }, 'scope'))
      : el('td', { 'data-label': 'Token' }, el('span', { class: 'name' }, e.token_name), el('span', { class: 'hint mono' }, e.token_id)),
    el('td', { class: 'change', 'data-label': 'Change' }, describeChange(e)),
  ));
  const body = $('audit').tBodies[0];
  if (fresh) body.replaceChildren(...rows); else body.append(...rows);
  state.auditCursor = page.next_cursor;
  $('audit-more').hidden = !page.next_cursor;
  $('audit-empty').hidden = body.rows.length > 0;
}

// ---- wiring ----

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function wire() {
  $('signin-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('signin-error').textContent = '';
    const credential = $('credential').value;
    if (!credential.trim()) { $('signin-error').textContent = 'Enter an admin credential.'; return; }
    try {
      state.session = await api('POST', '/v1/session', { credential });
    } catch (e) {
      $('signin-error').textContent = e.status === 401 ? 'That is not an admin credential.' : e.message;
      return;
    } finally {
      $('credential').value = '';
    }
    say('');
    signedIn();
  });
  $('sign-out').addEventListener('click', async () => {
    try { await api('DELETE', '/v1/session'); } catch (e) { /* signed out either way */ }
    showSignIn('You are signed out.');
  });
  window.addEventListener('hashchange', () => { say(''); route().catch((e) => say(e.message, 'bad')); });

  $('generate').addEventListener('click', openGenerate);
  $('generate-form').addEventListener('submit', submitGenerate);
  for (const r of $('generate-form').elements.kind) {
    r.addEventListener('change', () => {
      for (const id of ['g-owner', 'g-expiry']) forget(id);
      refreshExpiryOptions();
    });
  }
  for (const form of [$('generate-form'), $('edit-form')]) {
    form.addEventListener('input', (ev) => { if (ev.target.id) forget(ev.target.id); });
  }
  $('g-expiry').addEventListener('change', refreshExpiryHint);
  $('edit-form').addEventListener('submit', submitEdit);
  $('rotate-form').addEventListener('submit', submitRotate);
  $('confirm-form').addEventListener('submit', submitConfirm);
  $('new-scope').addEventListener('click', () => openScope(null));
  $('scope-form').addEventListener('submit', submitScope);
  $('scope-form').addEventListener('input', (ev) => { if (ev.target.id) forget(ev.target.id); });
  $('scopes').addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-action]');
    if (!button) return;
    const sc = state.scopes.find((x) => x.name === button.closest('tr').dataset.name);
    if (!sc) return;
    if (button.dataset.action === 'edit') openScope(sc);
    else if (button.dataset.action === 'delete') openDeleteScope(sc);
  });
  for (const prefix of ['g', 'e']) {
    $(`${prefix}-scopes`).addEventListener('change', () => { forget(`${prefix}-scopes`); refreshAccess(prefix); });
  }
  for (const b of document.querySelectorAll('dialog .cancel')) {
    b.addEventListener('click', () => b.closest('dialog').close());
  }

  $('copy-secret').addEventListener('click', () => { copySecret().catch((e) => say(e.message, 'bad')); });
  $('secret-done').addEventListener('click', hideSecret);

  $('tokens').addEventListener('click', (ev) => {
    const button = ev.target.closest('button[data-action]');
    if (!button) return;
    const t = state.tokens.get(button.closest('tr').dataset.id);
    if (!t) return;
    rowAction(button.dataset.action, t).catch((e) => say(e.message, 'bad'));
  });
  $('filters').addEventListener('submit', (ev) => { ev.preventDefault(); firstPage(); });
  const typing = (input, fn) => {
    const later = debounce(fn, 250);
    input.addEventListener('input', later);
    input.addEventListener('change', later);
  };
  typing($('f-name'), firstPage);
  typing($('f-owner'), firstPage);
  $('f-status').addEventListener('change', firstPage);
  $('f-kind').addEventListener('change', firstPage);
  $('prev').addEventListener('click', () => {
    if (state.cursors.length > 1) state.cursors.pop();
    loadTokens().catch((e) => say(e.message, 'bad'));
  });
  $('next').addEventListener('click', () => {
    if (!state.nextCursor) return;
    state.cursors.push(state.nextCursor);
    loadTokens().catch((e) => say(e.message, 'bad'));
  });

  const reloadAudit = () => loadAudit(true).catch((e) => say(e.message, 'bad'));
  $('audit-filters').addEventListener('submit', (ev) => { ev.preventDefault(); reloadAudit(); });
  typing($('a-token'), reloadAudit);
  typing($('a-actor'), reloadAudit);
  $('a-action').addEventListener('change', reloadAudit);
  $('audit-more').addEventListener('click', () => loadAudit(false).catch((e) => say(e.message, 'bad')));
}

start();
