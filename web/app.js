// Shared helpers of the staff pages: the signed-in session, API calls with the CSRF token,
// long-polling a job's events, the navigation bar and a few formatters. No third-party code.

let sessionPromise = null;

/** The signed-in member of staff: {user, role, csrf, node}. Sends to /login when signed out. */
export function session() {
  if (!sessionPromise) {
    sessionPromise = fetch('/api/v1/session', { credentials: 'same-origin' }).then(async (r) => {
      if (r.status === 401) {
        toLogin();
        throw new Error('signed out');
      }
      return r.json();
    });
  }
  return sessionPromise;
}

export function toLogin() {
  const next = location.pathname + location.search;
  location.assign('/login?next=' + encodeURIComponent(next));
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `the node answered ${status}`);
    this.status = status;
    this.code = (body && body.error) || 'http-' + status;
    this.body = body;
  }
}

/** Call the node's API; JSON in and out. Unsafe methods carry the session's CSRF token. */
export async function api(method, path, body, { raw = null, contentType = null } = {}) {
  const headers = {};
  if (!['GET', 'HEAD'].includes(method)) {
    headers['X-CSRF-Token'] = (await session()).csrf || '';
  }
  let payload;
  if (raw !== null) {
    payload = raw;
    if (contentType) headers['Content-Type'] = contentType;
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  }
  const r = await fetch(path, { method, headers, body: payload, credentials: 'same-origin' });
  let data = null;
  const type = r.headers.get('Content-Type') || '';
  if (type.includes('json')) data = await r.json();
  if (r.status === 401 && path !== '/api/v1/session') {
    toLogin();
  }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

/** Upload files with progress (fetch cannot report upload progress; XMLHttpRequest can). */
export async function upload(path, formData, onProgress) {
  const csrf = (await session()).csrf || '';
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    xhr.setRequestHeader('X-CSRF-Token', csrf);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress(e.loaded, e.total);
    };
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { data = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, data));
    };
    xhr.onerror = () => reject(new ApiError(0, { message: 'the upload was cut off; try again' }));
    xhr.send(formData);
  });
}

/**
 * Follow a job's events (long-poll) until it ends or `stop()` is called.
 * `onEvent(event)` is called for each event in order.
 */
export function follow(jobId, onEvent) {
  let after = 0;
  let stopped = false;
  const done = (async () => {
    let failures = 0;
    while (!stopped) {
      let res;
      try {
        res = await api('GET', `/api/v1/jobs/${encodeURIComponent(jobId)}/events?after=${after}&wait=20`);
        failures = 0;
      } catch (err) {
        if (err.status === 404 || ++failures > 5) throw err;
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      for (const e of res.events) {
        after = Math.max(after, e.seq);
        onEvent(e);
      }
      if (res.done) return;
    }
  })();
  return { done, stop: () => { stopped = true; } };
}

/** Build an element: h('p', {class: 'x'}, 'text', child). Text is always text, never HTML. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const $ = (sel) => document.querySelector(sel);

/** The navigation bar, with who is signed in and a sign-out button. */
export async function nav(active) {
  const s = await session();
  const links = [
    ['/send', 'Send'],
    ['/receive', 'Receive'],
    ['/transfers', 'Transfers'],
  ];
  const bar = h('nav', { class: 'nav' },
    h('a', { class: 'brand', href: '/' }, s.node.name),
    ...links.map(([href, label]) =>
      h('a', { href, class: href === active ? 'active' : null, 'aria-current': href === active ? 'page' : null }, label)),
    h('span', { class: 'who' }, s.user ? `${s.user} (${s.role})` : 'API token'),
    h('button', {
      type: 'button', class: 'link', id: 'sign-out',
      onclick: async () => {
        await api('DELETE', '/api/v1/session').catch(() => null);
        location.assign('/login');
      },
    }, 'Sign out'),
  );
  document.body.prepend(bar);
  return s;
}

export function fmtBytes(n) {
  if (n === undefined || n === null) return '?';
  if (n < 1e3) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}

export function fmtTime(epoch) {
  if (!epoch) return '';
  return new Date(epoch * 1000).toLocaleString();
}

export function fmtDuration(s) {
  if (!isFinite(s) || s < 0) return '—';
  s = Math.round(s);
  const m = Math.floor(s / 60);
  return m ? `${m} min ${String(s % 60).padStart(2, '0')} s` : `${s} s`;
}

/** A spoken code as words to read aloud: "7-glisten-ivory" → ["7", "glisten", "ivory"]. */
export function codeWords(code) {
  return String(code).split(/[-\s]+/).filter(Boolean);
}

/** Rate and time left from successive (bytes, seconds) samples, smoothed over ~3 s. */
export class Rate {
  constructor() { this.samples = []; }
  add(bytes, at) {
    this.samples.push([bytes, at]);
    while (this.samples.length > 2 && at - this.samples[0][1] > 3) this.samples.shift();
  }
  perSecond() {
    if (this.samples.length < 2) return NaN;
    const [b0, t0] = this.samples[0];
    const [b1, t1] = this.samples[this.samples.length - 1];
    return t1 > t0 ? (b1 - b0) / (t1 - t0) : NaN;
  }
  eta(total) {
    const rate = this.perSecond();
    const last = this.samples[this.samples.length - 1];
    return last && rate > 0 ? (total - last[0]) / rate : NaN;
  }
}

/**
 * Per-series progress bars. Instances travel in manifest order, which is series by series
 * (the order of `series`), so `done` instances fill the series one after another.
 */
export function seriesBars(container, series) {
  container.replaceChildren();
  const rows = series.map((s) => {
    const bar = h('progress', { max: s.instances || 1, value: 0 });
    const label = h('span', { class: 'count' }, `0 / ${s.instances}`);
    container.append(h('div', { class: 'series-row' },
      h('span', { class: 'series-name' }, s.description || s.modality || 'series'), bar, label));
    return { bar, label, n: s.instances };
  });
  return (done) => {
    let left = done;
    for (const r of rows) {
      const v = Math.max(0, Math.min(r.n, left));
      r.bar.value = v;
      r.label.textContent = `${v} / ${r.n}`;
      left -= r.n;
    }
  };
}

/** Show an error a person can act on in the page's message area. */
export function showError(el, err) {
  el.textContent = err instanceof Error ? err.message : String(err);
  el.hidden = false;
  el.classList.add('error');
}
