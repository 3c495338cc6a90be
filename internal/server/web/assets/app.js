// vmshadow web interface: a small page over the REST API (/api/v1), which
// it calls with the session cookie (and the CSRF token for changes).
// No library; every element is built with el(), never from HTML strings.
'use strict';

const API = '/api/v1';
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const ROLE = document.querySelector('meta[name="vmshadow-role"]').content;
const RANK = {viewer: 1, operator: 2, admin: 3};
const can = (need) => (RANK[ROLE] || 0) >= RANK[need];
const PAGE = 20;

// cleanup holds what the current view must stop when the route changes
// (event streams, timers).
let cleanup = [];

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const k of kids.flat()) {
    if (k === undefined || k === null || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

async function call(method, path, body) {
  const opts = {method, headers: {}, credentials: 'same-origin'};
  if (method !== 'GET') opts.headers['X-CSRF-Token'] = CSRF;
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(API + path, opts);
  if (r.status === 401) {
    location.href = '/login';
    throw new Error('session ended: log in again');
  }
  if (r.status === 204) return null;
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((j.error && j.error.message) || ('HTTP ' + r.status));
  return j;
}

function toast(msg, bad) {
  const t = document.getElementById('toast');
  t.textContent = msg;
  t.className = bad ? 'show bad' : 'show';
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = ''; }, bad ? 10000 : 4000);
}

// act runs an action of a button, disabling it meanwhile and showing
// the error if it fails.
async function act(btn, f) {
  btn.disabled = true;
  try { await f(); } catch (e) { toast(e.message, true); } finally { btn.disabled = false; }
}

function bytes(n) {
  if (n === undefined || n === null) return '';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

function dur(s) {
  if (s === undefined || s === null || isNaN(s)) return '';
  s = Math.round(s);
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor(s % 3600 / 60) + ' min';
  return Math.floor(s / 86400) + ' d ' + Math.floor(s % 86400 / 3600) + ' h';
}

const isZero = (t) => !t || t.startsWith('0001-');
function when(t) {
  if (isZero(t)) return '';
  return new Date(t).toLocaleString();
}
function ago(t) {
  if (isZero(t)) return '';
  const s = (Date.now() - new Date(t).getTime()) / 1000;
  return s >= 0 ? dur(s) + ' ago' : 'in ' + dur(-s);
}
const timeEl = (t) => el('time', {datetime: t, title: when(t)}, ago(t));

function badge(status) {
  return el('span', {class: 'badge s-' + status}, status);
}

const SVGNS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v);
  }
  for (const k of kids.flat()) {
    if (k === undefined || k === null || k === false) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

const dedup = (p) => p.stored_bytes > 0 ? (p.logical_bytes / p.stored_bytes).toFixed(2) + '×' : '';
const shortDate = (ms) => new Date(ms).toLocaleDateString(undefined, {month: 'short', day: 'numeric'});

// usageChart draws a repository's stored and logical bytes over time
// (oldest point first) on a logarithmic scale: the two differ by the
// deduplication factor, often by orders of magnitude. Each point has a
// title with its figures; the table beside it is the accessible version.
function usageChart(repo, points) {
  const W = 600, H = 170, L = 70, R = 12, T = 10, B = 26;
  if (!points.length) return el('p', {class: 'hint usage', 'data-repo': repo}, 'No usage recorded yet: the server records it after each job and every hour.');
  const ts = points.map((p) => new Date(p.time).getTime());
  let t1 = Math.max(ts[ts.length - 1], Date.now());
  let t0 = Math.min(ts[0], t1 - 86400000);
  const vals = points.flatMap((p) => [p.stored_bytes, p.logical_bytes]).filter((v) => v > 0);
  let lo = 1, hi = 1024;
  if (vals.length) {
    lo = Math.pow(1024, Math.floor(Math.log(Math.min(...vals)) / Math.log(1024)));
    hi = Math.pow(1024, Math.ceil(Math.log(Math.max(...vals)) / Math.log(1024)));
    if (hi <= lo) hi = lo * 1024;
  }
  const x = (t) => L + (W - L - R) * (t - t0) / (t1 - t0);
  const y = (v) => T + (H - T - B) * (1 - (Math.log(Math.max(v, lo)) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)));
  const grid = [];
  for (let v = lo; v <= hi; v *= 1024) {
    grid.push(svg('line', {x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid'}),
      svg('text', {x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'axis'}, bytes(v)));
  }
  const line = (key, cls) => svg('polyline', {class: cls, fill: 'none', points: points.map((p, i) => x(ts[i]).toFixed(1) + ',' + y(p[key]).toFixed(1)).join(' ')});
  const dots = points.map((p, i) => svg('circle', {class: 'pt', cx: x(ts[i]).toFixed(1), cy: y(p.stored_bytes).toFixed(1), r: 3, 'data-stored': p.stored_bytes},
    svg('title', {}, when(p.time) + ': stored ' + bytes(p.stored_bytes) + ', logical ' + bytes(p.logical_bytes) + ' (' + dedup(p) + '), ' + p.backups + ' backups')));
  const ldots = points.map((p, i) => svg('circle', {class: 'pt-l', cx: x(ts[i]).toFixed(1), cy: y(p.logical_bytes).toFixed(1), r: 2.5}));
  const last = points[points.length - 1];
  const chart = svg('svg', {viewBox: '0 0 ' + W + ' ' + H, class: 'chart', role: 'img',
    'aria-label': 'Usage of repository ' + repo + ' over time: now ' + bytes(last.stored_bytes) + ' stored for ' + bytes(last.logical_bytes) + ' logical'},
  grid, svg('line', {x1: L, x2: W - R, y1: H - B, y2: H - B, class: 'axis-line'}),
  svg('text', {x: L, y: H - 8, class: 'axis'}, shortDate(t0)), svg('text', {x: W - R, y: H - 8, 'text-anchor': 'end', class: 'axis'}, shortDate(t1)),
  line('logical_bytes', 'logical'), line('stored_bytes', 'stored'), ldots, dots);
  return el('figure', {class: 'usage', 'data-repo': repo}, chart,
    el('figcaption', {}, el('span', {class: 'key stored'}, 'stored'), ' ', el('span', {class: 'key logical'}, 'logical'),
      ' — now ' + bytes(last.stored_bytes) + ' stored for ' + bytes(last.logical_bytes) + ' of backups: deduplication ' + dedup(last) + ' (' + points.length + (points.length === 1 ? ' point)' : ' points)')));
}

// pager shows items n at a time with Previous / Next buttons (lists held
// whole by the page, such as a retention preview).
function pager(items, row, head, attrs, n) {
  n = n || PAGE;
  const body = el('tbody', {});
  const info = el('span', {class: 'hint'});
  let at = 0;
  const prev = el('button', {type: 'button', class: 'prev', onclick: () => { at = Math.max(0, at - n); draw(); }}, '« Previous');
  const next = el('button', {type: 'button', class: 'next', onclick: () => { at += n; draw(); }}, 'Next »');
  const draw = () => {
    body.replaceChildren(...items.slice(at, at + n).map(row));
    info.textContent = items.length ? (at + 1) + '–' + Math.min(at + n, items.length) + ' of ' + items.length : 'none';
    prev.disabled = at === 0;
    next.disabled = at + n >= items.length;
  };
  draw();
  return el('div', {}, table(head, body, attrs), items.length > n && el('p', {class: 'pager'}, prev, info, next));
}

// previewTable shows a retention's verdicts: what it removes and why.
function previewTable(p, id) {
  const row = (d) => el('tr', {'data-backup': d.id, class: d.keep ? 'keep' : 'remove'},
    el('td', {}, d.vm), el('td', {}, when(d.time)), el('td', {}, d.short_id),
    el('td', {}, d.keep ? badge('keep') : el('span', {class: 'badge s-failed'}, 'remove')),
    el('td', {}, d.keep ? 'kept by ' + d.reasons.join(', ') : (d.reasons.length ? d.reasons.join(', ') : 'no rule keeps it')));
  // What goes first: that is what the preview is for.
  const sorted = [...p.backups].sort((a, b) => (a.keep === b.keep) ? 0 : (a.keep ? 1 : -1));
  return el('div', {id: id, class: 'preview'},
    el('p', {class: 'summary'}, 'Would remove ' + p.removed + ' and keep ' + p.kept + ' backups' + (p.vms.length ? ' of ' + p.vms.join(', ') : '') + ' in ' + p.repository + '.'),
    p.backups.length ? pager(sorted, row, ['VM', 'Time', 'ID', 'Verdict', 'Why'], {class: 'verdicts'}) : el('p', {}, 'No backup to decide on.'));
}

// table makes a table with the column heads and the rows (or a tbody
// that a view fills later).
function table(head, rows, attrs) {
  const body = rows instanceof HTMLTableSectionElement ? rows : el('tbody', {}, rows);
  return el('div', {class: 'scroll'}, el('table', attrs || {},
    el('thead', {}, el('tr', {}, head.map((h) => el('th', {scope: 'col'}, h)))), body));
}

function show(...kids) {
  const m = document.getElementById('main');
  m.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
}

function section(title, ...kids) {
  return el('section', {}, el('h2', {}, title), ...kids);
}

// progressBar shows done of total.
function progressBar(p) {
  const pct = p.total > 0 ? Math.min(100, Math.round(100 * p.done / p.total)) : 0;
  return el('progress', {max: 100, value: pct, 'aria-label': (p.vm || 'run') + ' progress'}, pct + '%');
}

// watch opens the run's event stream, calls on(type, data) for each
// event, and closes it at the run's end or when the view changes.
function watch(id, on) {
  const es = new EventSource(API + '/runs/' + id + '/events');
  for (const t of ['progress', 'log', 'vm', 'end']) {
    es.addEventListener(t, (ev) => {
      on(t, JSON.parse(ev.data));
      if (t === 'end') es.close();
    });
  }
  cleanup.push(() => es.close());
  return es;
}

// ---- dashboard ----

async function dashboard() {
  const [vms, jobs, repos] = await Promise.all([call('GET', '/vms'), call('GET', '/jobs'), call('GET', '/repositories')]);
  // The VMs that need attention first, then by name; a page at a time.
  const severity = {failed: 0, late: 1, never: 2, fresh: 3};
  const fleet = [...vms.vms].sort((a, b) => (severity[a.status] - severity[b.status]) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const vmRow = (v) => el('tr', {'data-vm': v.name},
    el('td', {}, el('a', {href: '#/vm/' + encodeURIComponent(v.name)}, v.name)),
    el('td', {class: 'status'}, badge(v.status)),
    el('td', {}, v.last_backup ? timeEl(v.last_backup.time) : 'none'),
    el('td', {}, v.last && v.last.status !== 'succeeded' ? v.last.error || v.last.status : ''),
    el('td', {}, v.jobs.join(', ')),
    el('td', {}, v.connection));
  const counts = {};
  for (const v of vms.vms) counts[v.status] = (counts[v.status] || 0) + 1;
  const running = jobs.jobs.filter((j) => j.running);
  const runRows = running.map((j) => {
    const cell = el('td', {class: 'live'}, 'starting…');
    watch(j.running, (t, d) => {
      if (t === 'progress') cell.replaceChildren(progressBar(d), ' ', (d.vm ? d.vm + ': ' : '') + d.phase + ' ' + bytes(d.done) + ' of ' + bytes(d.total));
      if (t === 'end') cell.replaceChildren(badge(d.status));
    });
    return el('tr', {}, el('td', {}, el('a', {href: '#/run/' + j.running}, j.name + ' #' + j.running)), cell);
  });
  const next = [];
  for (const j of jobs.jobs) if (j.enabled && j.next && j.next.length) next.push([j.next[0], j]);
  next.sort((a, b) => a[0] < b[0] ? -1 : 1);
  const usage = await Promise.all(repos.repositories.map((r) => call('GET', '/repositories/' + encodeURIComponent(r.name) + '/usage').catch(() => ({points: []}))));
  const repoRows = repos.repositories.map((r) => el('tr', {'data-repo': r.name},
    el('td', {}, el('a', {href: '#/repo/' + encodeURIComponent(r.name)}, r.name)), el('td', {}, r.backups), el('td', {}, r.vms),
    el('td', {}, bytes(r.stored_bytes)), el('td', {}, bytes(r.logical_bytes)),
    el('td', {}, r.dedup_factor ? r.dedup_factor.toFixed(2) + '×' : ''),
    el('td', {}, r.last_verify ? when(r.last_verify.time) + (r.last_verify.problems ? ' — ' + r.last_verify.problems + ' problems' : ' — good') : 'never'),
    el('td', {class: 'error'}, r.error || '')));
  show(el('h1', {}, 'Dashboard'),
    section('Virtual machines', vms.vms.length ? [el('p', {id: 'fleet'}, ['failed', 'late', 'never', 'fresh'].filter((k) => counts[k]).flatMap((k) => [badge(k), ' ' + counts[k] + ' ']), '— ' + vms.vms.length + ' VMs'),
      pager(fleet, vmRow, ['VM', 'Protection', 'Last backup', 'Last error', 'Jobs', 'Connection'], {id: 'vms'})] : el('p', {}, 'No VM known yet: add a connection and a backup job to the configuration.'),
      el('p', {class: 'hint'}, 'fresh: a backup within its schedule; late: older than its jobs\' schedule allows; failed: the last try failed; never: no backup.')),
    section('Running', running.length ? table(['Run', 'Progress'], runRows, {id: 'running'}) : el('p', {}, 'Nothing running.')),
    section('Next scheduled runs', next.length ? table(['Job', 'Type', 'At'], next.slice(0, 10).map(([t, j]) =>
      el('tr', {}, el('td', {}, j.name), el('td', {}, j.type), el('td', {}, when(t) + ' (' + ago(t) + ')')))) : el('p', {}, 'No scheduled job.')),
    section('Repositories', table(['Repository', 'Backups', 'VMs', 'Stored', 'Logical', 'Dedup', 'Last verify', ''], repoRows, {id: 'repos'}),
      repos.repositories.map((r, i) => el('div', {class: 'usage-box'}, el('h3', {}, 'Usage of ', r.name, ' (90 days)'), usageChart(r.name, usage[i].points)))));
  const timer = setInterval(() => { if (!document.hidden && running.length === 0) route(); }, 30000);
  cleanup.push(() => clearInterval(timer));
}

// ---- VM page ----

// timeline draws a VM's backups (coloured by consistency) and its tries
// that stored none (failed; cancelled or interrupted) on a time strip;
// each mark has a title. The table below it is the accessible version.
function timeline(backups, failed) {
  const W = 600, H = 54, L = 10, R = 10, Y = 22;
  const marks = backups.map((b) => ({t: new Date(b.time).getTime(), b}))
    .concat(failed.map((r) => ({t: new Date(r.started).getTime(), r})));
  const nFailed = failed.filter((r) => r.status === 'failed').length;
  if (!marks.length) return null;
  const ts = marks.map((m) => m.t);
  let t0 = Math.min(...ts), t1 = Math.max(...ts);
  if (t1 - t0 < 3600000) { t0 -= 1800000; t1 += 1800000; }
  const pad = (t1 - t0) * 0.03;
  t0 -= pad; t1 += pad;
  const x = (t) => (L + (W - L - R) * (t - t0) / (t1 - t0)).toFixed(1);
  const cls = (b) => 'c-' + (['application', 'crash'].includes(b.consistency) ? b.consistency : 'other');
  return el('figure', {class: 'timeline'}, svg('svg', {viewBox: '0 0 ' + W + ' ' + H, class: 'chart', role: 'img',
    'aria-label': backups.length + ' backups, ' + nFailed + ' failed and ' + (failed.length - nFailed) + ' cancelled or interrupted tries from ' + new Date(t0).toLocaleString() + ' to ' + new Date(t1).toLocaleString()},
  svg('line', {x1: L, x2: W - R, y1: Y, y2: Y, class: 'axis-line'}),
  svg('text', {x: L, y: H - 6, class: 'axis'}, new Date(t0).toLocaleString()),
  svg('text', {x: W - R, y: H - 6, 'text-anchor': 'end', class: 'axis'}, new Date(t1).toLocaleString()),
  marks.map((m) => m.b
    ? svg('circle', {cx: x(m.t), cy: Y, r: 6, class: 'mark ' + cls(m.b), 'data-backup': m.b.id},
      svg('title', {}, when(m.b.time) + ': ' + m.b.short_id + ', ' + m.b.mode + ', ' + (m.b.consistency || 'unknown') + ' consistent, ' + bytes(m.b.bytes_new) + ' stored'))
    : svg('rect', {x: (x(m.t) - 5).toFixed(1), y: Y - 5, width: 10, height: 10, class: 'mark ' + (m.r.status === 'failed' ? 'c-failed' : 'c-stopped'), 'data-run': m.r.run},
      svg('title', {}, when(m.r.started) + ': ' + m.r.status + ' in run #' + m.r.run + (m.r.error ? ': ' + m.r.error : ''))))),
  el('figcaption', {}, el('span', {class: 'key c-application'}, 'application-consistent'), ' ', el('span', {class: 'key c-crash'}, 'crash-consistent'), ' ',
    el('span', {class: 'key c-other'}, 'other'), ' ', el('span', {class: 'key c-failed'}, 'failed'), ' ', el('span', {class: 'key c-stopped'}, 'cancelled or interrupted')));
}

async function vmPage(name, before) {
  const q = '?limit=' + PAGE + (before ? '&before=' + encodeURIComponent(before) : '');
  const enc = encodeURIComponent(name);
  const [vm, list, serves, failed, conns] = await Promise.all([
    call('GET', '/vms/' + enc),
    call('GET', '/vms/' + enc + '/backups' + q),
    call('GET', '/serves'),
    call('GET', '/vms/' + enc + '/results?limit=' + PAGE),
    call('GET', '/connections')]);
  const libvirt = conns.connections.filter((c) => c.type === 'libvirt');
  const pools = conns.connections.filter((c) => c.type === 'xapi');
  const panel = el('div', {id: 'action-panel', 'aria-live': 'polite'});
  const ids = new Set(list.backups.map((b) => b.id));
  // The tries that stored no backup within the time the page's backups
  // span (all of the newest results on the newest page).
  const oldest = list.backups.length ? new Date(list.backups[list.backups.length - 1].time).getTime() : 0;
  const newest = before ? new Date(before).getTime() : Infinity;
  const fails = failed.results.filter((r) => {
    const t = new Date(r.started).getTime();
    return ['failed', 'cancelled', 'interrupted'].includes(r.status) && (!list.next_before || t >= oldest) && t < newest;
  });
  const rows = list.backups.map((b) => el('tr', {'data-backup': b.id},
    el('td', {}, el('time', {datetime: b.time}, when(b.time)), el('br'), el('small', {}, b.disks.map((d) => d.name + ' ' + bytes(d.size)).join(', '))),
    el('td', {}, b.short_id), el('td', {}, b.repository),
    el('td', {}, b.mode, b.reason && el('br'), b.reason && el('small', {}, b.reason)),
    el('td', {}, b.consistency || ''),
    el('td', {class: 'freeze'}, b.freeze_ms ? b.freeze_ms + ' ms' : ''),
    el('td', {}, bytes(b.bytes_read)), el('td', {}, bytes(b.bytes_new)), el('td', {}, dur(b.duration_s)),
    el('td', {class: 'verified'}, isZero(b.verified) ? 'no' : timeEl(b.verified)),
    el('td', {class: 'actions'},
      can('operator') && el('button', {type: 'button', 'data-action': 'restore', onclick: () => restoreForm(panel, b)}, 'Restore…'),
      can('operator') && el('button', {type: 'button', class: 'serve', onclick: (e) => act(e.target, () => startServe(panel, b, name))}, 'Instant restore'),
      can('operator') && libvirt.length > 0 && el('button', {type: 'button', 'data-action': 'libvirt', onclick: () => libvirtForm(panel, b, libvirt)}, 'Into libvirt…'),
      can('operator') && pools.length > 0 && el('button', {type: 'button', 'data-action': 'xapi', onclick: () => xapiForm(panel, b, pools)}, 'Into XenServer…'),
      can('admin') && el('button', {type: 'button', class: 'danger', onclick: (e) => act(e.target, async () => {
        if (!confirm('Delete backup ' + b.short_id + ' of ' + name + ' from ' + b.repository + '? Its chunks are freed by the next gc.')) return;
        await call('DELETE', '/repositories/' + encodeURIComponent(b.repository) + '/backups/' + encodeURIComponent(b.id));
        toast('Backup ' + b.short_id + ' deleted');
        route();
      })}, 'Delete…'))));
  const mine = serves.serves.filter((s) => ids.has(s.backup));
  show(el('h1', {}, name, ' ', badge(vm.status)),
    el('p', {}, vm.last_backup ? ['Last backup ', timeEl(vm.last_backup.time), ' in ', vm.last_backup.repository, '. '] : 'No backup yet. ',
      vm.jobs.length ? 'Jobs: ' + vm.jobs.join(', ') + '.' : 'No backup job selects it.', ' ',
      el('a', {href: '#/runs?vm=' + enc}, 'Its runs')),
    section('Backups', timeline(list.backups, fails),
      list.backups.length ? table(['Time (disks)', 'ID', 'Repository', 'Mode', 'Consistency', 'Freeze', 'Read', 'Stored', 'Duration', 'Verified', 'Actions'], rows, {id: 'backups'}) : el('p', {}, 'No backup.'),
      el('p', {class: 'pager'},
        before && el('a', {href: '#/vm/' + enc}, '« Newest'), ' ',
        list.next_before && el('a', {href: '#/vm/' + enc + '?before=' + encodeURIComponent(list.next_before), id: 'older'}, 'Older »'))),
    panel,
    mine.length ? section('Instant restores running', mine.map((s) => serveBox(s))) : null);
}

function restoreForm(panel, b) {
  const dir = el('input', {id: 'restore-to', name: 'to', required: true, placeholder: '/var/lib/vmshadow/restore/' + b.vm});
  const fmt = el('select', {id: 'restore-format', name: 'format'}, el('option', {value: 'raw'}, 'raw'), el('option', {value: 'qcow2'}, 'qcow2'));
  const out = el('div', {});
  const form = el('form', {class: 'box', onsubmit: (e) => {
    e.preventDefault();
    act(form.querySelector('button[type=submit]'), async () => {
      const r = await call('POST', '/restore', {repository: b.repository, backup: b.id, to: dir.value, format: fmt.value});
      out.replaceChildren(el('p', {}, 'Restored:'), el('ul', {id: 'restored'}, r.files.map((f) => el('li', {}, el('code', {}, f.path), ' (' + (f.disk || 'definition') + ', ' + bytes(f.size) + ')'))));
    });
  }},
  el('h2', {}, 'Restore ' + b.short_id + ' to files on the server'),
  el('label', {for: 'restore-to'}, 'Directory on the server (absolute; created; no file is overwritten)'), dir,
  el('label', {for: 'restore-format'}, 'Format'), fmt,
  el('button', {type: 'submit'}, 'Restore'), out);
  panel.replaceChildren(form);
  dir.focus();
}

// libvirtForm restores a backup into new volumes of a storage pool and a
// new domain, through one of the server's libvirt connections.
function libvirtForm(panel, b, conns) {
  const conn = el('select', {id: 'libvirt-connection'}, conns.map((c) => el('option', {value: c.name}, c.name)));
  const pool = el('input', {id: 'libvirt-pool', required: true, placeholder: 'default'});
  const vmName = el('input', {id: 'libvirt-name', placeholder: b.vm + '-restored'});
  const start = el('input', {id: 'libvirt-start', type: 'checkbox'});
  const out = el('div', {});
  const form = el('form', {class: 'box', id: 'libvirt-form', onsubmit: (e) => {
    e.preventDefault();
    act(form.querySelector('button[type=submit]'), async () => {
      const target = {connection: conn.value, pool: pool.value.trim(), start: start.checked};
      if (vmName.value.trim()) target.vm_name = vmName.value.trim();
      const r = await call('POST', '/restore', {repository: b.repository, backup: b.id, libvirt: target});
      const l = r.libvirt;
      out.replaceChildren(el('p', {id: 'libvirt-done'}, 'Domain ', el('code', {class: 'domain'}, l.domain), ' ' + (l.started ? 'started' : 'defined') + ' from the ' + l.definition + ' definition:'),
        el('ul', {}, l.volumes.map((v) => el('li', {}, v.name + ' → volume ', el('code', {}, v.volume), ' (' + v.format + ') of pool ' + l.pool))));
      toast('Restored ' + b.short_id + ' into libvirt as ' + l.domain);
    });
  }},
  el('h2', {}, 'Restore ' + b.short_id + ' into libvirt'),
  el('label', {for: 'libvirt-connection'}, 'Connection'), conn,
  el('label', {for: 'libvirt-pool'}, 'Storage pool of the new volumes'), pool,
  el('label', {for: 'libvirt-name'}, 'Name of the new domain'), vmName,
  el('label', {for: 'libvirt-start', class: 'check'}, start, ' Start it'),
  el('button', {type: 'submit'}, 'Restore'), out);
  panel.replaceChildren(form);
  pool.focus();
}

// xapiForm restores a backup into new VDIs of a XenServer / XCP-ng pool
// (and a new halted VM), through one of the server's xapi connections.
function xapiForm(panel, b, conns) {
  const conn = el('select', {id: 'xapi-connection'}, conns.map((c) => el('option', {value: c.name}, c.name)));
  const sr = el('input', {id: 'xapi-sr', required: true, placeholder: 'Local storage (name-label or UUID)'});
  const vmName = el('input', {id: 'xapi-name', placeholder: b.vm + ' restored (empty: the disks only)'});
  const out = el('div', {});
  const form = el('form', {class: 'box', id: 'xapi-form', onsubmit: (e) => {
    e.preventDefault();
    act(form.querySelector('button[type=submit]'), async () => {
      const target = {connection: conn.value, sr: sr.value.trim()};
      if (vmName.value.trim()) target.vm_name = vmName.value.trim();
      const r = await call('POST', '/restore', {repository: b.repository, backup: b.id, xapi: target});
      const x = r.xapi;
      out.replaceChildren(el('p', {id: 'xapi-done'}, x.vm_uuid ? ['Halted VM ', el('code', {class: 'vm-uuid'}, x.vm_uuid), ' created with the disks:'] : 'Disks restored:'),
        el('ul', {}, x.disks.map((d) => el('li', {}, d.name + ' → VDI ', el('code', {class: 'vdi'}, d.vdi), ' (' + bytes(d.size) + ') on SR ' + x.sr))));
      toast('Restored ' + b.short_id + ' into the pool of ' + x.connection);
    });
  }},
  el('h2', {}, 'Restore ' + b.short_id + ' into a XenServer pool'),
  el('label', {for: 'xapi-connection'}, 'Connection'), conn,
  el('label', {for: 'xapi-sr'}, 'Storage repository of the new VDIs'), sr,
  el('label', {for: 'xapi-name'}, 'Name of a new halted VM with the disks'), vmName,
  el('button', {type: 'submit'}, 'Restore'), out);
  panel.replaceChildren(form);
  sr.focus();
}

async function startServe(panel, b, vm) {
  const s = await call('POST', '/serves', {repository: b.repository, backup: b.id});
  panel.replaceChildren(serveBox(s));
  toast('Serving ' + s.disk + ' of ' + b.short_id);
}

// domainXML is a libvirt domain that boots from a served disk over NBD
// (a unix socket): the URI's export name and socket.
function domainXML(s) {
  const u = s.uri.match(/^nbd\+unix:\/\/\/([^?]*)\?socket=(.*)$/);
  const exp = u ? decodeURIComponent(u[1]) : s.disk;
  const sock = u ? decodeURIComponent(u[2]) : '';
  const x = (t) => t.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/'/g, '&apos;');
  return "<domain type='kvm'>\n" +
    '  <name>' + x(s.disk) + '-instant-' + x(s.id) + '</name>\n' +
    "  <memory unit='MiB'>1024</memory>\n  <vcpu>1</vcpu>\n" +
    "  <os><type arch='x86_64'>hvm</type></os>\n" +
    '  <devices>\n' +
    '    <!-- ' + x(s.uri) + ' -->\n' +
    "    <disk type='network' device='disk'>\n" +
    "      <driver name='qemu' type='raw'/>\n" +
    "      <source protocol='nbd' name='" + x(exp) + "'>\n" +
    "        <host transport='unix' socket='" + x(sock) + "'/>\n" +
    '      </source>\n' +
    "      <target dev='vda' bus='virtio'/>\n" +
    (s.writable ? '' : '      <readonly/>\n') +
    '    </disk>\n' +
    "    <graphics type='vnc'/>\n" +
    '  </devices>\n</domain>\n';
}

function serveBox(s) {
  const snippet = 'qemu-system-x86_64 -m 1024 -drive file=' + s.uri + ',format=raw,if=virtio' + (s.writable ? '' : ',snapshot=on');
  const file = s.disk + '-instant.xml';
  return el('div', {class: 'box serve-box', 'data-serve': s.id},
    el('h2', {}, 'Instant restore of ' + s.disk),
    el('p', {}, 'NBD URI: ', el('code', {class: 'serve-uri'}, s.uri)),
    el('p', {}, 'Boot it with QEMU (reads come from the repository' + (s.writable ? '; writes stay in the serve' : '; snapshot=on keeps writes in a temporary file') + '):'),
    el('pre', {class: 'qemu'}, snippet),
    el('p', {}, 'Or with libvirt: save this as ', el('code', {}, file), ' and run ', el('code', {class: 'virsh-cmd'}, 'virsh create ' + file),
      s.writable ? '' : ' (the serve is read-only: the guest sees a read-only disk; start a writable instant restore through the API to boot it read-write)', ':'),
    el('pre', {class: 'virsh'}, domainXML(s)),
    can('operator') && el('button', {type: 'button', class: 'danger', onclick: (e) => act(e.target, async () => {
      await call('DELETE', '/serves/' + encodeURIComponent(s.id));
      toast('Instant restore stopped');
      route();
    })}, 'Stop'));
}

// ---- repositories ----

function repoRow(r) {
  return el('tr', {'data-repo': r.name},
    el('td', {}, el('a', {href: '#/repo/' + encodeURIComponent(r.name)}, r.name)), el('td', {}, r.location),
    el('td', {}, r.backups), el('td', {}, bytes(r.stored_bytes)), el('td', {}, bytes(r.logical_bytes)),
    el('td', {}, r.dedup_factor ? r.dedup_factor.toFixed(2) + '×' : ''), el('td', {class: 'error'}, r.error || ''));
}

async function reposPage() {
  const repos = await call('GET', '/repositories');
  show(el('h1', {}, 'Repositories'),
    table(['Repository', 'Location', 'Backups', 'Stored', 'Logical', 'Dedup', ''], repos.repositories.map(repoRow), {id: 'repo-list'}));
}

// retention is a job's rules as the API gives them in its spec.
const hasRetention = (j) => j.type === 'prune' || (j.type === 'backup' && j.spec && j.spec.retention && Object.keys(j.spec.retention).length > 0);

async function repoPage(name, params) {
  const before = params.get('before') || '';
  const enc = encodeURIComponent(name);
  const [repos, usage, verifies, jobs] = await Promise.all([call('GET', '/repositories'), call('GET', '/repositories/' + enc + '/usage?since=1970-01-01T00:00:00Z'),
    call('GET', '/repositories/' + enc + '/verifies?limit=' + PAGE + (before ? '&before=' + encodeURIComponent(before) : '')), call('GET', '/jobs')]);
  const r = repos.repositories.find((x) => x.name === name);
  if (!r) throw new Error('No repository ' + name + ' in the configuration.');
  const vrows = verifies.verifies.map((v) => el('tr', {'data-verify': v.id},
    el('td', {}, when(v.time)), el('td', {}, v.run ? el('a', {href: '#/run/' + v.run}, '#' + v.run) : ''),
    el('td', {}, v.backups), el('td', {}, v.chunks),
    el('td', {}, v.problems ? el('span', {class: 'badge s-failed'}, v.problems + ' problems') : badge('good')),
    el('td', {class: 'findings'}, v.findings.length ? el('ul', {}, v.findings.map((f) => el('li', {class: 'error'}, f.vm ? '[' + f.vm + '] ' : '', f.message))) : '',
      v.findings_total > v.findings.length ? el('a', {href: '#/run/' + v.run}, (v.findings_total - v.findings.length) + ' more in the run\'s log') : '')));
  const rjobs = jobs.jobs.filter((j) => hasRetention(j) && j.spec.repository === name);
  const out = el('div', {id: 'prune-preview', 'aria-live': 'polite'});
  const gcOut = el('div', {id: 'gc-preview', 'aria-live': 'polite'});
  show(el('h1', {}, 'Repository ' + name),
    el('p', {}, el('code', {}, r.location), ' — ' + r.backups + ' backups of ' + r.vms + ' VMs; ' + bytes(r.stored_bytes) + ' stored for ' + bytes(r.logical_bytes) +
      (r.dedup_factor ? ' (deduplication ' + r.dedup_factor.toFixed(2) + '×)' : '') + (r.stats_time ? ', counted ' + ago(r.stats_time) : ''), r.error ? el('span', {class: 'error'}, ' — ' + r.error) : ''),
    section('Size over time', usageChart(name, usage.points)),
    section('Verify runs', verifies.verifies.length ? table(['Time', 'Run', 'Backups', 'Chunks', 'Result', 'Findings'], vrows, {id: 'verifies'}) : el('p', {}, 'Never verified: add a verify job.'),
      el('p', {class: 'pager'}, before && el('a', {href: '#/repo/' + enc}, '« Newest'), ' ',
        verifies.next_before && el('a', {href: '#/repo/' + enc + '?before=' + verifies.next_before, id: 'older'}, 'Older »'))),
    section('Prune preview', el('p', {class: 'hint'}, 'What each job\'s retention would remove now, and why (a dry run: nothing is removed).'),
      rjobs.length ? el('p', {}, rjobs.map((j) => el('button', {type: 'button', 'data-job': j.name, class: 'preview-job', onclick: (e) => act(e.target, async () => {
        const p = await call('GET', '/jobs/' + encodeURIComponent(j.name) + '/prune-preview');
        out.replaceChildren(el('h3', {}, 'Retention of job ' + j.name), previewTable(p, 'job-preview-' + j.name));
      })}, 'Preview ' + j.name))) : el('p', {}, 'No job with a retention uses this repository.'), out),
    can('operator') && section('Garbage collection preview', el('p', {class: 'hint'}, 'What gc would delete now: chunks and indexes no backup references (a dry run; it reads every index).'),
      el('button', {type: 'button', id: 'gc-preview-button', onclick: (e) => act(e.target, async () => {
        const g = await call('GET', '/repositories/' + enc + '/gc-preview');
        gcOut.replaceChildren(el('dl', {class: 'facts'},
          el('dt', {}, 'Would delete'), el('dd', {id: 'gc-would'}, g.chunks_deleted + ' chunks and ' + g.indexes_deleted + ' indexes (' + bytes(g.bytes_deleted) + ')'),
          el('dt', {}, 'Referenced'), el('dd', {}, g.chunks_referenced + ' chunks by ' + g.backups + ' backups'),
          el('dt', {}, 'Kept for the grace period (' + dur(g.grace_s) + ')'), el('dd', {}, g.chunks_in_grace + ' chunks, ' + g.indexes_in_grace + ' indexes')));
      })}, 'Preview gc'), gcOut));
}

// ---- jobs ----

async function jobsPage() {
  const jobs = await call('GET', '/jobs');
  const jobRow = (j) => el('tr', {'data-job': j.name},
    el('td', {}, j.name), el('td', {}, j.type), el('td', {}, j.schedule || 'manual'),
    el('td', {}, j.enabled ? 'enabled' : 'disabled'),
    el('td', {}, j.enabled && j.next && j.next.length ? el('details', {}, el('summary', {}, when(j.next[0])),
      el('ol', {class: 'next'}, j.next.map((n) => el('li', {}, when(n))))) : ''),
    el('td', {}, j.running ? el('a', {href: '#/run/' + j.running}, 'running #' + j.running) : j.last_run ? [badge(j.last_run.status), ' ', el('a', {href: '#/run/' + j.last_run.id}, '#' + j.last_run.id)] : 'never run'),
    el('td', {}, (j.vms || []).join(', ')),
    el('td', {class: 'actions'},
      can('operator') && el('button', {type: 'button', class: 'run', disabled: !!j.running, onclick: (e) => act(e.target, async () => {
        const r = await call('POST', '/jobs/' + encodeURIComponent(j.name) + '/run');
        location.hash = '#/run/' + r.id;
      })}, 'Run now'),
      can('operator') && el('button', {type: 'button', 'data-action': 'toggle', onclick: (e) => act(e.target, async () => {
        await call('POST', '/jobs/' + encodeURIComponent(j.name) + (j.enabled ? '/disable' : '/enable'));
        route();
      })}, j.enabled ? 'Disable' : 'Enable'),
      can('admin') && j.source === 'api' && el('a', {href: '#/jobs/edit/' + encodeURIComponent(j.name), class: 'button'}, 'Edit'),
      can('admin') && j.source === 'api' && el('button', {type: 'button', class: 'danger', onclick: (e) => act(e.target, async () => {
        if (!confirm('Delete job ' + j.name + '? Its runs stay in the history; its backups stay.')) return;
        await call('DELETE', '/jobs/' + encodeURIComponent(j.name));
        route();
      })}, 'Delete…')));
  show(el('h1', {}, 'Jobs'),
    can('admin') && el('p', {}, el('a', {href: '#/jobs/new', class: 'button', id: 'new-job'}, 'New backup job')),
    jobs.jobs.length ? pager(jobs.jobs, jobRow, ['Job', 'Type', 'Schedule', 'State', 'Next run', 'Last run', 'VMs', 'Actions'], {id: 'jobs'}) : el('p', {}, 'No job.'),
    el('p', {class: 'hint'}, 'Jobs of the configuration file are edited there; jobs created here can be edited and deleted here.'));
}

function field(id, label, input, hint) {
  input.id = id;
  return el('div', {class: 'field'}, el('label', {for: id}, label), input, hint && el('small', {}, hint));
}

// later makes f run 300 ms after the last call (typing stopped); f gets
// current(), false once a newer call came (its answer is then dropped),
// and the call's arguments.
function later(f) {
  let t, n = 0;
  return (...args) => {
    clearTimeout(t);
    const mine = ++n;
    t = setTimeout(() => f(() => mine === n, ...args), 300);
  };
}

// jobPreviews shows what a job's settings (its spec: the keys of the
// configuration file) would do, each computed by the server: the VMs its
// selectors pick now, its schedule's next five times, and what its
// retention would remove from those VMs' backups and why. update(spec)
// refreshes the parts whose settings changed.
function jobPreviews() {
  const sel = el('p', {id: 'job-preview', 'aria-live': 'polite'});
  const selProblems = el('ul', {id: 'job-selection-problems', class: 'error'});
  const sched = el('div', {id: 'schedule-preview', 'aria-live': 'polite'});
  const keep = el('div', {id: 'retention-box', 'aria-live': 'polite'});
  let matched = [];
  let spec = {};
  const doSchedule = later(async (current) => {
    const s = typeof spec.schedule === 'string' ? spec.schedule.trim() : '';
    if (!s) { sched.replaceChildren(el('p', {class: 'hint'}, 'No schedule: the job runs only when started by hand.')); return; }
    try {
      const p = await call('GET', '/schedule-preview?schedule=' + encodeURIComponent(s) + (spec.timezone ? '&timezone=' + encodeURIComponent(spec.timezone) : ''));
      if (!current()) return;
      sched.replaceChildren(el('p', {}, 'Next runs (' + p.timezone + '):'), el('ol', {class: 'next'}, p.next.map((t) => el('li', {}, el('time', {datetime: t}, when(t) + ' (' + ago(t) + ')')))));
    } catch (e) {
      if (current()) sched.replaceChildren(el('p', {class: 'error', id: 'schedule-error'}, e.message));
    }
  });
  const doRetention = later(async (current) => {
    const p = spec.retention && typeof spec.retention === 'object' ? spec.retention : {};
    const all = spec.type === 'prune'; // a prune job: every VM of its repository
    if (!Object.keys(p).length) { keep.replaceChildren(el('p', {class: 'hint'}, 'No retention: every backup is kept (until a prune job removes some).')); return; }
    if (!all && !matched.length) { keep.replaceChildren(el('p', {class: 'hint'}, 'The selection matches no VM: nothing to remove.')); return; }
    if (!spec.repository) { keep.replaceChildren(el('p', {class: 'hint'}, 'Choose a repository.')); return; }
    try {
      const r = await call('POST', '/repositories/' + encodeURIComponent(spec.repository) + '/prune-preview', all ? {retention: p} : {vms: matched, retention: p});
      if (current()) keep.replaceChildren(previewTable(r, 'retention-preview'));
    } catch (e) {
      if (current()) keep.replaceChildren(el('p', {class: 'error'}, e.message));
    }
  });
  // The server matches the selection as a run would (its connections
  // listed now).
  const doSelection = later(async (current) => {
    const vms = Array.isArray(spec.vms) ? spec.vms : [];
    try {
      const r = vms.length ? await call('POST', '/selection-preview', {vms}) : {vms: [], problems: ['Choose a connection.']};
      if (!current()) return;
      matched = r.vms.map((v) => v.name);
      sel.textContent = 'Selects now: ' + (matched.length ? matched.join(', ') : 'no VM');
      selProblems.replaceChildren(...r.problems.map((p) => el('li', {}, p)));
    } catch (e) {
      if (!current()) return;
      matched = [];
      sel.textContent = 'Selects now: no VM';
      selProblems.replaceChildren(el('li', {}, e.message));
    }
    doRetention();
  });
  const key = (x) => JSON.stringify(x === undefined ? null : x);
  let last = null;
  return {sel, selProblems, sched, keep, update(next) {
    const prev = last || {};
    spec = next;
    last = {vms: key(next.vms), sched: key([next.schedule, next.timezone]), keep: key([next.retention, next.repository, next.type])};
    if (last.vms !== prev.vms && next.type !== 'prune') doSelection();
    else if (last.keep !== prev.keep) doRetention();
    if (last.sched !== prev.sched) doSchedule();
  }};
}

async function newJobPage() {
  const [vms, repos] = await Promise.all([call('GET', '/vms'), call('GET', '/repositories')]);
  const conns = [...new Set(vms.vms.map((v) => v.connection).filter((c) => c))];
  const name = el('input', {required: true, pattern: '[A-Za-z0-9._-]+'});
  const conn = el('select', {required: true}, conns.map((c) => el('option', {value: c}, c)));
  const sel = el('input', {placeholder: 'web-*, db1 (empty: every VM of the connection)'});
  const repo = el('select', {required: true}, repos.repositories.map((r) => el('option', {value: r.name}, r.name)));
  const sched = el('input', {placeholder: '@daily, 0 2 * * *, @every 6h (empty: only run by hand)'});
  const tz = el('input', {placeholder: 'Europe/Berlin (empty: the server\'s timezone setting)'});
  const keep = el('input', {type: 'number', min: 1, placeholder: 'e.g. 14'});
  const keepDaily = el('input', {type: 'number', min: 1, placeholder: 'e.g. 7'});
  const keepWeekly = el('input', {type: 'number', min: 1, placeholder: 'e.g. 4'});
  const keepMonthly = el('input', {type: 'number', min: 1, placeholder: 'e.g. 6'});
  const hooks = el('input', {placeholder: '/etc/vmshadow/hooks/db.sh (optional)'});
  const pv = jobPreviews();
  const toSpec = () => {
    const spec = {name: name.value, type: 'backup', repository: repo.value, vms: conn.value ? [{connection: conn.value}] : []};
    const globs = sel.value.split(',').map((s) => s.trim()).filter((s) => s);
    if (globs.length && spec.vms.length) spec.vms[0].vms = globs;
    if (sched.value.trim()) spec.schedule = sched.value.trim();
    if (tz.value.trim()) spec.timezone = tz.value.trim();
    const p = {};
    for (const [k, i] of [['keep_last', keep], ['keep_daily', keepDaily], ['keep_weekly', keepWeekly], ['keep_monthly', keepMonthly]]) {
      if (i.value) p[k] = parseInt(i.value, 10);
    }
    if (Object.keys(p).length) spec.retention = p;
    const hs = hooks.value.split(',').map((s) => s.trim()).filter((s) => s);
    if (hs.length) spec.writers = {hooks: hs};
    return spec;
  };
  const form = el('form', {class: 'box', id: 'job-form', oninput: () => pv.update(toSpec()), onchange: () => pv.update(toSpec()), onsubmit: (e) => {
    e.preventDefault();
    act(form.querySelector('button[type=submit]'), async () => {
      const j = await call('POST', '/jobs', toSpec());
      toast('Job ' + j.name + ' created');
      location.hash = '#/jobs';
    });
  }},
  field('job-name', 'Name', name),
  field('job-connection', 'Connection', conn),
  field('job-vms', 'VMs (names or globs, comma-separated)', sel),
  pv.sel, pv.selProblems,
  field('job-repository', 'Repository', repo),
  field('job-schedule', 'Schedule', sched, 'cron (5 fields), @hourly/@daily/@weekly, or @every DURATION; see docs/server-config.md'),
  field('job-timezone', 'Time zone of the schedule and retention', tz),
  pv.sched,
  el('fieldset', {class: 'keep'}, el('legend', {}, 'Retention (after each run; empty: off)'),
    field('job-keep-last', 'Keep the last N backups', keep),
    field('job-keep-daily', 'Keep one a day for N days', keepDaily),
    field('job-keep-weekly', 'Keep one a week for N weeks', keepWeekly),
    field('job-keep-monthly', 'Keep one a month for N months', keepMonthly)),
  pv.keep,
  field('job-hooks', 'Host hooks around the freeze (absolute paths, comma-separated)', hooks),
  el('button', {type: 'submit'}, 'Create job'));
  show(el('h1', {}, 'New backup job'), form);
  pv.update(toSpec());
  name.focus();
}

async function editJobPage(jname) {
  const j = await call('GET', '/jobs/' + encodeURIComponent(jname));
  const ta = el('textarea', {rows: 14, spellcheck: 'false'}, JSON.stringify(j.spec, null, 2));
  const pv = jobPreviews();
  const bad = el('p', {class: 'error', id: 'spec-error', 'aria-live': 'polite'});
  const parse = () => {
    try {
      const spec = JSON.parse(ta.value);
      bad.textContent = '';
      return spec && typeof spec === 'object' && !Array.isArray(spec) ? spec : null;
    } catch (err) {
      bad.textContent = 'The settings are not valid JSON: ' + err.message;
      return null;
    }
  };
  const refresh = later(() => { const spec = parse(); if (spec) pv.update(spec); });
  ta.addEventListener('input', () => refresh());
  const form = el('form', {class: 'box', id: 'edit-form', onsubmit: (e) => {
    e.preventDefault();
    act(form.querySelector('button[type=submit]'), async () => {
      let spec;
      try { spec = JSON.parse(ta.value); } catch (err) { throw new Error('The settings are not valid JSON: ' + err.message); }
      await call('PUT', '/jobs/' + encodeURIComponent(jname), spec);
      toast('Job ' + jname + ' saved');
      location.hash = '#/jobs';
    });
  }}, field('job-spec', 'Settings (the keys of the configuration file, as JSON)', ta), bad,
  el('h2', {}, 'What these settings do now'),
  j.type === 'backup' && [pv.sel, pv.selProblems], pv.sched, (j.type === 'backup' || j.type === 'prune') && pv.keep,
  el('button', {type: 'submit'}, 'Save'));
  show(el('h1', {}, 'Edit job ' + jname), form);
  pv.update(parse() || {});
}

// ---- runs ----

async function runsPage(params) {
  const job = params.get('job') || '';
  const before = params.get('before') || '';
  const status = params.get('status') || '';
  const vm = params.get('vm') || '';
  const filters = new URLSearchParams();
  if (job) filters.set('job', job);
  if (status) filters.set('status', status);
  if (vm) filters.set('vm', vm);
  const q = new URLSearchParams(filters);
  q.set('limit', PAGE);
  if (before) q.set('before', before);
  const [runs, jobs, vms] = await Promise.all([call('GET', '/runs?' + q), call('GET', '/jobs'), call('GET', '/vms')]);
  const jobSel = el('select', {name: 'job', id: 'filter-job'}, el('option', {value: ''}, 'all jobs'), jobs.jobs.map((j) => el('option', {value: j.name, selected: j.name === job}, j.name)));
  const stSel = el('select', {name: 'status', id: 'filter-status'}, ['', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted', 'skipped'].map((s) => el('option', {value: s, selected: s === status}, s || 'any status')));
  const vmNames = vms.vms.map((v) => v.name);
  if (vm && !vmNames.includes(vm)) vmNames.push(vm);
  const vmSel = el('select', {name: 'vm', id: 'filter-vm'}, el('option', {value: ''}, 'any VM'), vmNames.map((n) => el('option', {value: n, selected: n === vm}, n)));
  const filter = el('form', {class: 'filters', onsubmit: (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    if (jobSel.value) p.set('job', jobSel.value);
    if (stSel.value) p.set('status', stSel.value);
    if (vmSel.value) p.set('vm', vmSel.value);
    location.hash = '#/runs' + (p.toString() ? '?' + p : '');
  }}, el('label', {for: 'filter-job'}, 'Job'), jobSel, el('label', {for: 'filter-status'}, 'Status'), stSel,
  el('label', {for: 'filter-vm'}, 'VM'), vmSel, el('button', {type: 'submit'}, 'Filter'));
  const rows = runs.runs.map((r) => el('tr', {'data-run': r.id},
    el('td', {}, el('a', {href: '#/run/' + r.id}, '#' + r.id)), el('td', {}, r.job), el('td', {}, r.kind), el('td', {}, r.trigger),
    el('td', {}, badge(r.status)), el('td', {}, when(r.started)),
    el('td', {}, isZero(r.ended) ? '' : dur((new Date(r.ended) - new Date(r.started)) / 1000)),
    el('td', {class: 'error'}, r.error || '')));
  const more = new URLSearchParams(filters);
  if (runs.next_before) more.set('before', runs.next_before);
  show(el('h1', {}, 'Runs'), filter,
    runs.runs.length ? table(['Run', 'Job', 'Type', 'Trigger', 'Status', 'Started', 'Duration', 'Error'], rows, {id: 'runs'}) : el('p', {id: 'no-runs'}, 'No run matches.'),
    el('p', {class: 'pager'}, before && el('a', {href: '#/runs' + (filters.toString() ? '?' + filters : '')}, '« Newest'), ' ',
      runs.next_before && el('a', {href: '#/runs?' + more, id: 'older'}, 'Older »')));
}

async function runPage(id) {
  const r = await call('GET', '/runs/' + id);
  const status = el('span', {id: 'run-status'}, badge(r.status));
  const prog = el('tbody', {});
  const progRows = {};
  const vmBody = el('tbody', {});
  const log = el('ol', {class: 'log', id: 'log'});
  const seen = new Set();
  const addLog = (l) => {
    if (seen.has(l.id)) return;
    seen.add(l.id);
    log.append(el('li', {class: 'l-' + l.level}, el('time', {datetime: l.time}, new Date(l.time).toLocaleTimeString()), ' ', l.vm ? '[' + l.vm + '] ' : '', l.message));
  };
  const vmRow = (v) => el('tr', {'data-vm': v.vm},
    el('td', {}, el('a', {href: '#/vm/' + encodeURIComponent(v.vm)}, v.vm)), el('td', {}, badge(v.status)),
    el('td', {}, v.mode || ''), el('td', {}, v.consistency || ''), el('td', {}, bytes(v.bytes_read)), el('td', {}, bytes(v.bytes_new)),
    el('td', {}, v.freeze_ms ? v.freeze_ms + ' ms' : ''), el('td', {}, v.backup_id ? v.backup_id.slice(0, 8) : ''), el('td', {class: 'error'}, v.error || ''));
  const setVMs = (vms) => vmBody.replaceChildren(...vms.map(vmRow));
  setVMs(r.vms);
  const cancel = can('operator') && r.status === 'running' && el('button', {type: 'button', class: 'danger', id: 'cancel', onclick: (e) => act(e.target, async () => {
    if (!confirm('Cancel run #' + id + '? Its snapshot sets are released; the repository stays valid.')) return;
    await call('POST', '/runs/' + id + '/cancel');
    toast('Cancelling run #' + id);
  })}, 'Cancel run');
  show(el('h1', {}, 'Run #' + id + ' of ', el('a', {href: '#/runs?job=' + encodeURIComponent(r.job)}, r.job), ' ', status),
    el('p', {}, r.kind + ', ' + r.trigger + ', started ' + when(r.started), isZero(r.ended) ? '' : ', ended ' + when(r.ended), r.error ? el('span', {class: 'error'}, ' — ' + r.error) : ''),
    cancel,
    section('Progress', table(['VM', 'Phase', 'Progress', 'Done', 'Rate', 'ETA'], prog, {id: 'progress'})),
    section('VMs', table(['VM', 'Result', 'Mode', 'Consistency', 'Read', 'Stored', 'Freeze', 'Backup', 'Error'], vmBody, {id: 'run-vms'})),
    section('Log', log));
  if (r.status === 'running') {
    watch(id, (t, d) => {
      if (t === 'log') addLog(d);
      if (t === 'progress') {
        const k = d.vm || '';
        const row = el('tr', {'data-vm': k}, el('td', {}, k || r.job), el('td', {class: 'phase'}, d.phase), el('td', {}, progressBar(d)),
          el('td', {}, bytes(d.done) + ' of ' + bytes(d.total)), el('td', {}, d.rate_bytes_per_s ? bytes(d.rate_bytes_per_s) + '/s' : ''), el('td', {}, d.eta_s ? dur(d.eta_s) : ''));
        if (progRows[k]) progRows[k].replaceWith(row); else prog.append(row);
        progRows[k] = row;
      }
      if (t === 'vm') {
        const old = vmBody.querySelector('tr[data-vm="' + CSS.escape(d.vm) + '"]');
        if (old) old.replaceWith(vmRow(d)); else vmBody.append(vmRow(d));
      }
      if (t === 'end') {
        status.replaceChildren(badge(d.status));
        if (cancel) cancel.remove();
        call('GET', '/runs/' + id).then((x) => setVMs(x.vms)).catch((e) => toast(e.message, true));
      }
    });
  }
  let after = 0;
  for (;;) {
    const page = await call('GET', '/runs/' + id + '/log?after=' + after + '&limit=1000');
    page.lines.forEach(addLog);
    if (page.lines.length < 1000) break;
    after = page.next_after;
  }
}

// ---- routing ----

async function route() {
  for (const f of cleanup) f();
  cleanup = [];
  const h = location.hash.replace(/^#/, '') || '/';
  const [path, query] = h.split('?');
  const params = new URLSearchParams(query || '');
  const parts = path.split('/').filter((p) => p).map(decodeURIComponent);
  for (const a of document.querySelectorAll('nav a:not(.brand)')) {
    const top = {vm: '', run: 'runs', repo: 'repos'}[parts[0]];
    a.classList.toggle('current', a.getAttribute('href') === '#/' + (top !== undefined ? top : (parts[0] || '')));
  }
  try {
    if (parts.length === 0) await dashboard();
    else if (parts[0] === 'vm' && parts[1]) await vmPage(parts[1], params.get('before'));
    else if (parts[0] === 'jobs' && parts[1] === 'new') await newJobPage();
    else if (parts[0] === 'jobs' && parts[1] === 'edit' && parts[2]) await editJobPage(parts[2]);
    else if (parts[0] === 'jobs') await jobsPage();
    else if (parts[0] === 'runs') await runsPage(params);
    else if (parts[0] === 'repos') await reposPage();
    else if (parts[0] === 'repo' && parts[1]) await repoPage(parts[1], params);
    else if (parts[0] === 'run' && /^\d+$/.test(parts[1] || '')) await runPage(parts[1]);
    else show(el('h1', {}, 'Not found'), el('p', {}, el('a', {href: '#/'}, 'Back to the dashboard')));
  } catch (e) {
    show(el('h1', {}, 'Error'), el('p', {class: 'error', role: 'alert'}, e.message));
  }
}

window.addEventListener('hashchange', route);
route();
