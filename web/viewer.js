// The zero-footprint viewer: a plain ES module, no third-party code.
//
// It polls /api/v1/transfers/<job>/series (or /api/v1/studies/<id>/series for a study in the
// node's library) every second while the study arrives (only verified
// instances in place are listed), shows one thumbnail per series and the selected series on a
// canvas. Each frame is fetched once as modality values (Hounsfield units for CT) in the node's
// compact form ("P2PX" | u32 header length | JSON header | pixels, see p2pshare/viewer/decode.py)
// and windowed here, so window/level never refetches. The window is DICOM's linear function,
// rounded down, then MONOCHROME1 inversion: the same arithmetic as the node's thumbnails.
//
// Mouse: wheel = slice, Ctrl + wheel = zoom, left-drag = pan (or W/L in "W/L drag" mode),
// right-drag = window (horizontal) / level (vertical). Keys: arrows, Page Up/Down, Home/End.
// When the first image is on screen, window.p2pFirstImageAt is set and "p2p-first-image" fires.

const PRESETS = {
  'soft-tissue': { width: 400, center: 40 },
  lung: { width: 1500, center: -600 },
  bone: { width: 2000, center: 300 },
  brain: { width: 80, center: 40 },
};
const POLL_MS = 1000;
const MAX_CACHED_FRAMES = 200;
const FINAL_STATES = new Set(['complete', 'failed', 'cancelled']);

const $ = (id) => document.getElementById(id);
const canvas = $('image');
const ctx = canvas.getContext('2d');
const query = new URLSearchParams(location.search);
const job = query.get('job'); // a receive job
const libraryStudy = query.get('study'); // or a study in the node's library
const api = job
  ? `/api/v1/transfers/${encodeURIComponent(job)}`
  : libraryStudy ? `/api/v1/studies/${encodeURIComponent(libraryStudy)}` : null;

const state = {
  listing: null,
  seriesUid: null,
  slices: [], // [{sop, frame, number}] of the selected series
  index: 0,
  frame: null, // the decoded frame on screen
  frameKey: '',
  bitmap: null, // the windowed frame at native size
  bitmapFor: '',
  center: 0,
  width: 1,
  wlSet: false, // a preset or a drag chose the window (kept while scrolling)
  preset: null,
  zoom: 1,
  panX: 0,
  panY: 0,
  wlMode: false,
  firstDrawn: false,
  seq: 0,
  thumbs: new Map(), // series uid -> thumbnail sop shown
};
window.p2pViewer = state; // for the curious (and the tests): read-only by convention

// -- fetching ---------------------------------------------------------------------------------

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.message) return body.message;
  } catch (_) { /* not JSON */ }
  return `the node answered ${res.status}`;
}

async function getJson(url) {
  const res = await fetch(url, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
  if (!res.ok) {
    const err = new Error(await errorMessage(res));
    err.status = res.status;
    throw err;
  }
  return res.json();
}

function parseFrame(buf) {
  const bytes = new Uint8Array(buf);
  const magic = String.fromCharCode(bytes[0], bytes[1], bytes[2], bytes[3]);
  if (magic !== 'P2PX') throw new Error('the node sent pixels in a form this page does not know');
  const n = new DataView(buf).getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, n)));
  const count = header.rows * header.columns * header.samples;
  const offset = 8 + n;
  const Typed = { int16: Int16Array, float32: Float32Array, uint8: Uint8Array }[header.dtype];
  if (!Typed) throw new Error(`unknown pixel type ${header.dtype}`);
  return { ...header, pixels: new Typed(buf, offset, count) };
}

const frames = new Map(); // "sop/frame" -> Promise<frame>

function loadFrame(sop, frame) {
  const key = `${sop}/${frame}`;
  let p = frames.get(key);
  if (p) {
    frames.delete(key); // most recently used last
    frames.set(key, p);
    return p;
  }
  p = (async () => {
    const res = await fetch(`${api}/instances/${encodeURIComponent(sop)}/pixels?frame=${frame}`, {
      credentials: 'same-origin',
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    return parseFrame(await res.arrayBuffer());
  })();
  p.catch(() => frames.delete(key)); // a later look may succeed (e.g. after a sign-in)
  frames.set(key, p);
  while (frames.size > MAX_CACHED_FRAMES) frames.delete(frames.keys().next().value);
  return p;
}

// -- header, status, series list ---------------------------------------------------------------

function personName(pn) {
  if (!pn) return '—';
  const [family, given, middle, prefix, suffix] = pn.split('=')[0].split('^');
  const rest = [prefix, given, middle, suffix].filter(Boolean).join(' ');
  return rest ? `${family}, ${rest}` : family;
}

function isoDate(da) {
  return /^\d{8}$/.test(da || '') ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : da || '—';
}

function renderHeader(l) {
  const p = l.patient || {};
  $('patient-name').textContent = personName(p.name);
  $('patient-id').textContent = p.id || '—';
  $('patient-birth').textContent = isoDate(p.birth_date);
  $('patient-sex').textContent = p.sex || '—';
  const s = l.study;
  $('study-description').textContent = s ? s.description || 'Study' : 'Waiting for the sender…';
  $('study-date').textContent = s && s.date ? isoDate(s.date) : '';
  $('study-modality').textContent = s ? (s.modalities || []).join(', ') : '';
  if (s) document.title = `${personName(p.name)} — ${s.description || 'Study'} — p2pshare viewer`;
  const status = $('status');
  status.className = 'status';
  if (l.state === 'complete' && l.received === l.expected) {
    status.textContent = `Complete: ${l.received} instances, all verified`;
  } else if (l.state === 'failed' || l.state === 'cancelled') {
    status.className = 'status failed';
    status.textContent = `Transfer ${l.state}: ${l.error || 'see the transfer page'}; ` +
      `${l.received} verified instances shown`;
  } else if (l.study && l.study_id) {
    status.className = 'status arriving';
    status.textContent = `Still arriving at this node: ${l.received} instances so far`;
  } else if (l.study) {
    status.className = 'status arriving';
    status.textContent = `Arriving: ${l.received} of ${l.expected} instances verified`;
  } else {
    status.textContent = l.state === 'connecting' ? 'Connecting to the sender…' : `Waiting (${l.state})…`;
  }
}

function seriesLabel(s) {
  const parts = [s.number != null ? `S${s.number}` : null, s.modality || null].filter(Boolean);
  return `${parts.join(' · ')}${parts.length ? ' ' : ''}${s.description || ''}`.trim() || 'Series';
}

function renderSeriesList(l) {
  const list = $('series-list');
  const seen = new Set();
  for (const s of l.series) {
    seen.add(s.series_instance_uid);
    let el = list.querySelector(`[data-series="${CSS.escape(s.series_instance_uid)}"]`);
    if (!el) {
      el = document.createElement('button');
      el.type = 'button';
      el.className = 'series';
      el.dataset.series = s.series_instance_uid;
      const thumb = document.createElement('div');
      thumb.className = 'thumb';
      thumb.textContent = 'arriving…';
      const label = document.createElement('div');
      label.className = 'label';
      const count = document.createElement('div');
      count.className = 'count';
      el.append(thumb, label, count);
      el.addEventListener('click', () => selectSeries(s.series_instance_uid, true));
      list.append(el);
    }
    el.querySelector('.label').textContent = seriesLabel(s);
    const count = el.querySelector('.count');
    count.textContent = `${s.instances.length} of ${s.expected} verified`;
    count.className = s.instances.length < s.expected ? 'count arriving' : 'count';
    el.classList.toggle('selected', s.series_instance_uid === state.seriesUid);
    // The first thumbnail stays: the stream sends each series' middle slice first.
    if (s.thumbnail && !state.thumbs.has(s.series_instance_uid)) {
      state.thumbs.set(s.series_instance_uid, s.thumbnail);
      const img = document.createElement('img');
      img.alt = seriesLabel(s);
      img.src = `${api}/instances/${encodeURIComponent(s.thumbnail)}/thumbnail.png`;
      const thumb = el.querySelector('.thumb');
      thumb.textContent = '';
      thumb.append(img);
    }
  }
  // keep the list in the node's order (series number)
  for (const s of l.series) {
    list.append(list.querySelector(`[data-series="${CSS.escape(s.series_instance_uid)}"]`));
  }
  for (const el of [...list.children]) if (!seen.has(el.dataset.series)) el.remove();
}

function slicesOf(series) {
  const out = [];
  for (const inst of series.instances) {
    if (!inst.image) continue;
    for (let f = 0; f < (inst.frames || 1); f++) {
      out.push({ sop: inst.sop_instance_uid, frame: f, number: inst.instance_number });
    }
  }
  return out;
}

function selectSeries(uid, byUser = false) {
  const series = state.listing && state.listing.series.find((s) => s.series_instance_uid === uid);
  if (!series) return;
  const changed = uid !== state.seriesUid;
  state.seriesUid = uid;
  state.slices = slicesOf(series);
  if (changed) {
    const middle = state.slices.findIndex((x) => x.sop === series.thumbnail);
    state.index = middle >= 0 ? middle : Math.floor(state.slices.length / 2);
    if (byUser) resetView(false);
  }
  for (const el of $('series-list').children) el.classList.toggle('selected', el.dataset.series === uid);
  updateSlider();
  show(state.index);
}

function refreshSelected() {
  // New instances of the series on screen: keep the same image, grow the slider.
  const series = state.listing.series.find((s) => s.series_instance_uid === state.seriesUid);
  if (!series) return;
  const current = state.slices[state.index];
  const slices = slicesOf(series);
  if (slices.length === state.slices.length) return;
  state.slices = slices;
  if (current) {
    const i = slices.findIndex((x) => x.sop === current.sop && x.frame === current.frame);
    if (i >= 0) state.index = i;
  }
  updateSlider();
  if (!current) show(state.index);
}

async function poll() {
  if (!api) return;
  let l;
  try {
    l = await getJson(`${api}/series`);
  } catch (err) {
    notice(err.message);
    if (err.status === 401 || err.status === 404) return; // nothing to wait for
    setTimeout(poll, 3 * POLL_MS);
    return;
  }
  state.listing = l;
  renderHeader(l);
  renderSeriesList(l);
  if (!state.seriesUid) {
    const first = l.series.find((s) => s.instances.some((i) => i.image));
    if (first) selectSeries(first.series_instance_uid);
    else if (l.study && l.received > 0) notice('The instances received so far hold no images.');
  } else {
    refreshSelected();
  }
  const finished = FINAL_STATES.has(l.state) && (l.received === l.expected || l.state !== 'complete');
  if (!finished) setTimeout(poll, POLL_MS);
}

// -- drawing -------------------------------------------------------------------------------------

function notice(text) {
  const el = $('notice');
  el.textContent = text || '';
  el.hidden = !text;
}

function updateSlider() {
  const slider = $('slice');
  slider.max = String(Math.max(0, state.slices.length - 1));
  slider.value = String(state.index);
  slider.disabled = state.slices.length < 2;
  const s = state.slices[state.index];
  $('slice-label').textContent = s
    ? `${state.index + 1} / ${state.slices.length}${s.number != null ? ` (Im ${s.number})` : ''}`
    : '—';
}

async function show(index) {
  if (!state.slices.length) return;
  index = Math.max(0, Math.min(state.slices.length - 1, index));
  state.index = index;
  updateSlider();
  const s = state.slices[index];
  const seq = ++state.seq;
  let frame;
  try {
    frame = await loadFrame(s.sop, s.frame);
  } catch (err) {
    if (seq !== state.seq) return;
    state.frame = null;
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    notice(err.message);
    return;
  }
  if (seq !== state.seq) return; // the user has moved on
  notice('');
  state.frame = frame;
  state.frameKey = `${s.sop}/${s.frame}`;
  if (!state.wlSet) {
    state.center = frame.center;
    state.width = frame.width;
  }
  draw();
  for (const d of [1, -1, 2, -2]) { // neighbours, for smooth scrolling
    const n = state.slices[index + d];
    if (n) loadFrame(n.sop, n.frame).catch(() => {});
  }
}

function windowedBitmap(f) {
  const key = `${state.frameKey}|${state.center}|${state.width}`;
  if (state.bitmap && state.bitmapFor === key) return state.bitmap;
  const { rows, columns, samples, pixels, invert } = f;
  const scale = 255 / Math.max(state.width - 1, 1);
  const base = 127.5 - (state.center - 0.5) * scale;
  const image = new ImageData(columns, rows);
  const out = image.data;
  const n = rows * columns;
  for (let i = 0, o = 0; i < n; i++, o += 4) {
    if (samples === 3) {
      for (let c = 0; c < 3; c++) {
        const v = Math.floor(pixels[i * 3 + c] * scale + base);
        out[o + c] = v < 0 ? 0 : v > 255 ? 255 : v;
      }
    } else {
      let v = Math.floor(pixels[i] * scale + base);
      v = v < 0 ? 0 : v > 255 ? 255 : v;
      if (invert) v = 255 - v;
      out[o] = out[o + 1] = out[o + 2] = v;
    }
    out[o + 3] = 255;
  }
  let bmp = state.bitmap;
  if (!bmp || bmp.width !== columns || bmp.height !== rows) {
    bmp = document.createElement('canvas');
    bmp.width = columns;
    bmp.height = rows;
  }
  bmp.getContext('2d').putImageData(image, 0, 0);
  state.bitmap = bmp;
  state.bitmapFor = key;
  return bmp;
}

function draw() {
  const f = state.frame;
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, w, h);
  if (!f) return;
  const bmp = windowedBitmap(f);
  const scale = Math.min(w / f.columns, h / f.rows) * state.zoom;
  const dw = f.columns * scale;
  const dh = f.rows * scale;
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(bmp, (w - dw) / 2 + state.panX * dpr, (h - dh) / 2 + state.panY * dpr, dw, dh);
  const s = state.slices[state.index];
  const series = state.listing.series.find((x) => x.series_instance_uid === state.seriesUid);
  $('overlay').textContent =
    `${series ? seriesLabel(series) : ''}\n` +
    `Im ${s && s.number != null ? s.number : '—'}  (${state.index + 1}/${state.slices.length})` +
    `${f.frames > 1 ? `  frame ${f.frame + 1}/${f.frames}` : ''}\n` +
    `${f.columns} × ${f.rows}  ${f.photometric}`;
  $('readout').textContent =
    `W ${Math.round(state.width)}  L ${Math.round(state.center)}  ·  zoom ${state.zoom.toFixed(2)}×`;
  canvas.dataset.center = String(state.center);
  canvas.dataset.width = String(state.width);
  canvas.dataset.slice = String(state.index);
  canvas.dataset.sop = s ? s.sop : '';
  if (!state.firstDrawn) {
    state.firstDrawn = true;
    window.p2pFirstImageAt = performance.now();
    window.dispatchEvent(new Event('p2p-first-image'));
  }
}

// -- interaction -------------------------------------------------------------------------------

function setWindow(center, width, preset = null) {
  state.center = center;
  state.width = Math.max(1, width);
  state.wlSet = true;
  state.preset = preset;
  for (const b of document.querySelectorAll('[data-preset]')) {
    b.classList.toggle('active', b.dataset.preset === preset);
  }
  draw();
}

function resetView(redraw = true) {
  state.zoom = 1;
  state.panX = 0;
  state.panY = 0;
  state.wlSet = false;
  state.preset = null;
  for (const b of document.querySelectorAll('[data-preset]')) b.classList.remove('active');
  if (state.frame) {
    state.center = state.frame.center;
    state.width = state.frame.width;
  }
  if (redraw) draw();
}

function zoomBy(factor) {
  state.zoom = Math.max(0.1, Math.min(40, state.zoom * factor));
  draw();
}

for (const b of document.querySelectorAll('[data-preset]')) {
  b.addEventListener('click', () => {
    const p = PRESETS[b.dataset.preset];
    setWindow(p.center, p.width, b.dataset.preset);
  });
}
$('zoom-in').addEventListener('click', () => zoomBy(1.25));
$('zoom-out').addEventListener('click', () => zoomBy(0.8));
$('reset').addEventListener('click', () => resetView());
$('mode-wl').addEventListener('click', (e) => {
  state.wlMode = !state.wlMode;
  e.currentTarget.setAttribute('aria-pressed', String(state.wlMode));
  canvas.classList.toggle('wl', state.wlMode);
});
$('slice').addEventListener('input', (e) => show(Number(e.target.value)));

canvas.addEventListener('wheel', (e) => {
  e.preventDefault();
  if (e.ctrlKey) zoomBy(e.deltaY < 0 ? 1.1 : 1 / 1.1);
  else if (e.deltaY) show(state.index + (e.deltaY > 0 ? 1 : -1));
}, { passive: false });

canvas.addEventListener('contextmenu', (e) => e.preventDefault());

let drag = null;
canvas.addEventListener('pointerdown', (e) => {
  canvas.focus();
  const wl = e.button === 2 || (e.button === 0 && state.wlMode);
  if (e.button !== 0 && e.button !== 2) return;
  drag = { wl, x: e.clientX, y: e.clientY, center: state.center, width: state.width, panX: state.panX, panY: state.panY };
  canvas.setPointerCapture(e.pointerId);
});
canvas.addEventListener('pointermove', (e) => {
  if (!drag || !state.frame) return;
  const dx = e.clientX - drag.x;
  const dy = e.clientY - drag.y;
  if (drag.wl) {
    const f = state.frame;
    const step = f.samples === 3 ? 0.5 : Math.max(0.5, (f.max - f.min) / 500);
    setWindow(drag.center + dy * step, drag.width + dx * step, null);
  } else {
    state.panX = drag.panX + dx;
    state.panY = drag.panY + dy;
    draw();
  }
});
const endDrag = () => { drag = null; };
canvas.addEventListener('pointerup', endDrag);
canvas.addEventListener('pointercancel', endDrag);

document.addEventListener('keydown', (e) => {
  if (e.target instanceof HTMLInputElement) return; // the slider moves itself
  const steps = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
  if (e.key in steps) {
    e.preventDefault();
    show(state.index + steps[e.key]);
  } else if (e.key === 'Home') {
    show(0);
  } else if (e.key === 'End') {
    show(state.slices.length - 1);
  }
});

new ResizeObserver(() => draw()).observe($('viewport'));

if (!api) {
  notice('Open the viewer from a transfer (/viewer?job=<receive job id>) or a library study (/viewer?study=<study id>)');
  $('status').textContent = 'No transfer chosen';
} else {
  poll();
}
