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
  const vmRows = vms.vms.map((v) => el('tr', {'data-vm': v.name},
    el('td', {}, el('a', {href: '#/vm/' + encodeURIComponent(v.name)}, v.name)),
    el('td', {class: 'status'}, badge(v.status)),
    el('td', {}, v.last_backup ? timeEl(v.last_backup.time) : 'none'),
    el('td', {}, v.last && v.last.status !== 'succeeded' ? v.last.error || v.last.status : ''),
    el('td', {}, v.jobs.join(', ')),
    el('td', {}, v.connection)));
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
  const repoRows = repos.repositories.map((r) => el('tr', {},
    el('td', {}, r.name), el('td', {}, r.backups), el('td', {}, r.vms),
    el('td', {}, bytes(r.stored_bytes)), el('td', {}, bytes(r.logical_bytes)),
    el('td', {}, r.dedup_factor ? r.dedup_factor.toFixed(2) + '×' : ''),
    el('td', {}, r.last_verify ? when(r.last_verify.time) + (r.last_verify.problems ? ' — ' + r.last_verify.problems + ' problems' : ' — good') : 'never'),
    el('td', {class: 'error'}, r.error || '')));
  show(el('h1', {}, 'Dashboard'),
    section('Virtual machines', vms.vms.length ? table(['VM', 'Protection', 'Last backup', 'Last error', 'Jobs', 'Connection'], vmRows, {id: 'vms'}) : el('p', {}, 'No VM known yet: add a connection and a backup job to the configuration.'),
      el('p', {class: 'hint'}, 'fresh: a backup within its schedule; late: older than its jobs\' schedule allows; failed: the last try failed; never: no backup.')),
    section('Running', running.length ? table(['Run', 'Progress'], runRows, {id: 'running'}) : el('p', {}, 'Nothing running.')),
    section('Next scheduled runs', next.length ? table(['Job', 'Type', 'At'], next.slice(0, 10).map(([t, j]) =>
      el('tr', {}, el('td', {}, j.name), el('td', {}, j.type), el('td', {}, when(t) + ' (' + ago(t) + ')')))) : el('p', {}, 'No scheduled job.')),
    section('Repositories', table(['Repository', 'Backups', 'VMs', 'Stored', 'Logical', 'Dedup', 'Last verify', ''], repoRows, {id: 'repos'})));
  const timer = setInterval(() => { if (!document.hidden && running.length === 0) route(); }, 30000);
  cleanup.push(() => clearInterval(timer));
}

// ---- VM page ----

async function vmPage(name, before) {
  const q = '?limit=' + PAGE + (before ? '&before=' + encodeURIComponent(before) : '');
  const [vm, list, serves] = await Promise.all([
    call('GET', '/vms/' + encodeURIComponent(name)),
    call('GET', '/vms/' + encodeURIComponent(name) + '/backups' + q),
    call('GET', '/serves')]);
  const panel = el('div', {id: 'action-panel', 'aria-live': 'polite'});
  const ids = new Set(list.backups.map((b) => b.id));
  const rows = list.backups.map((b) => el('tr', {'data-backup': b.id},
    el('td', {}, el('time', {datetime: b.time}, when(b.time))),
    el('td', {}, b.short_id), el('td', {}, b.repository),
    el('td', {}, b.mode + (b.reason ? ' (' + b.reason + ')' : '')),
    el('td', {}, b.consistency || ''),
    el('td', {}, bytes(b.bytes_read)), el('td', {}, bytes(b.bytes_new)), el('td', {}, dur(b.duration_s)),
    el('td', {}, b.disks.map((d) => d.name + ' ' + bytes(d.size)).join(', ')),
    el('td', {class: 'actions'},
      can('operator') && el('button', {type: 'button', 'data-action': 'restore', onclick: () => restoreForm(panel, b)}, 'Restore…'),
      can('operator') && el('button', {type: 'button', class: 'serve', onclick: (e) => act(e.target, () => startServe(panel, b, name))}, 'Instant restore'),
      can('admin') && el('button', {type: 'button', class: 'danger', onclick: (e) => act(e.target, async () => {
        if (!confirm('Delete backup ' + b.short_id + ' of ' + name + ' from ' + b.repository + '? Its chunks are freed by the next gc.')) return;
        await call('DELETE', '/repositories/' + encodeURIComponent(b.repository) + '/backups/' + encodeURIComponent(b.id));
        toast('Backup ' + b.short_id + ' deleted');
        route();
      })}, 'Delete…'))));
  const mine = serves.serves.filter((s) => ids.has(s.backup));
  show(el('h1', {}, name, ' ', badge(vm.status)),
    el('p', {}, vm.last_backup ? ['Last backup ', timeEl(vm.last_backup.time), ' in ', vm.last_backup.repository, '. '] : 'No backup yet. ',
      vm.jobs.length ? 'Jobs: ' + vm.jobs.join(', ') + '.' : 'No backup job selects it.'),
    section('Backups', list.backups.length ? table(['Time', 'ID', 'Repository', 'Mode', 'Consistency', 'Read', 'Stored', 'Duration', 'Disks', 'Actions'], rows, {id: 'backups'}) : el('p', {}, 'No backup.'),
      el('p', {class: 'pager'},
        before && el('a', {href: '#/vm/' + encodeURIComponent(name)}, '« Newest'), ' ',
        list.next_before && el('a', {href: '#/vm/' + encodeURIComponent(name) + '?before=' + encodeURIComponent(list.next_before), id: 'older'}, 'Older »'))),
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

async function startServe(panel, b, vm) {
  const s = await call('POST', '/serves', {repository: b.repository, backup: b.id});
  panel.replaceChildren(serveBox(s));
  toast('Serving ' + s.disk + ' of ' + b.short_id);
}

function serveBox(s) {
  const snippet = 'qemu-system-x86_64 -m 1024 -drive file=' + s.uri + ',format=raw,if=virtio' + (s.writable ? '' : ',snapshot=on');
  return el('div', {class: 'box serve-box', 'data-serve': s.id},
    el('h2', {}, 'Instant restore of ' + s.disk),
    el('p', {}, 'NBD URI: ', el('code', {class: 'serve-uri'}, s.uri)),
    el('p', {}, 'Boot it (reads come from the repository' + (s.writable ? '; writes stay in the serve' : '; snapshot=on keeps writes in a temporary file') + '):'),
    el('pre', {}, snippet),
    can('operator') && el('button', {type: 'button', class: 'danger', onclick: (e) => act(e.target, async () => {
      await call('DELETE', '/serves/' + encodeURIComponent(s.id));
      toast('Instant restore stopped');
      route();
    })}, 'Stop'));
}

// ---- jobs ----

async function jobsPage() {
  const jobs = await call('GET', '/jobs');
  const rows = jobs.jobs.map((j) => el('tr', {'data-job': j.name},
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
      })}, 'Delete…'))));
  show(el('h1', {}, 'Jobs'),
    can('admin') && el('p', {}, el('a', {href: '#/jobs/new', class: 'button', id: 'new-job'}, 'New backup job')),
    jobs.jobs.length ? table(['Job', 'Type', 'Schedule', 'State', 'Next run', 'Last run', 'VMs', 'Actions'], rows, {id: 'jobs'}) : el('p', {}, 'No job.'),
    el('p', {class: 'hint'}, 'Jobs of the configuration file are edited there; jobs created here can be edited and deleted here.'));
}

function field(id, label, input, hint) {
  input.id = id;
  return el('div', {class: 'field'}, el('label', {for: id}, label), input, hint && el('small', {}, hint));
}

async function newJobPage() {
  const [vms, repos] = await Promise.all([call('GET', '/vms'), call('GET', '/repositories')]);
  const conns = [...new Set(vms.vms.map((v) => v.connection).filter((c) => c))];
  const name = el('input', {required: true, pattern: '[A-Za-z0-9._-]+'});
  const conn = el('select', {required: true}, conns.map((c) => el('option', {value: c}, c)));
  const sel = el('input', {placeholder: 'web-*, db1 (empty: every VM of the connection)'});
  const repo = el('select', {required: true}, repos.repositories.map((r) => el('option', {value: r.name}, r.name)));
  const sched = el('input', {placeholder: '@daily, 0 2 * * *, @every 6h (empty: only run by hand)'});
  const keep = el('input', {type: 'number', min: 1, placeholder: 'e.g. 14'});
  const hooks = el('input', {placeholder: '/etc/vmshadow/hooks/db.sh (optional)'});
  const preview = el('p', {id: 'job-preview', 'aria-live': 'polite'});
  const update = () => {
    const globs = sel.value.split(',').map((s) => s.trim()).filter((s) => s);
    const re = globs.map((g) => new RegExp('^' + g.replace(/[.+^${}()|\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.') + '$'));
    const m = vms.vms.filter((v) => v.connection === conn.value && (!re.length || re.some((r) => r.test(v.name)))).map((v) => v.name);
    preview.textContent = 'Selects now: ' + (m.length ? m.join(', ') : 'no VM');
  };
  sel.addEventListener('input', update);
  conn.addEventListener('change', update);
  const form = el('form', {class: 'box', id: 'job-form', onsubmit: (e) => {
    e.preventDefault();
    act(form.querySelector('button[type=submit]'), async () => {
      const spec = {name: name.value, type: 'backup', repository: repo.value, vms: [{connection: conn.value}]};
      const globs = sel.value.split(',').map((s) => s.trim()).filter((s) => s);
      if (globs.length) spec.vms[0].vms = globs;
      if (sched.value.trim()) spec.schedule = sched.value.trim();
      if (keep.value) spec.retention = {keep_last: parseInt(keep.value, 10)};
      const hs = hooks.value.split(',').map((s) => s.trim()).filter((s) => s);
      if (hs.length) spec.writers = {hooks: hs};
      const j = await call('POST', '/jobs', spec);
      toast('Job ' + j.name + ' created');
      location.hash = '#/jobs';
    });
  }},
  field('job-name', 'Name', name),
  field('job-connection', 'Connection', conn),
  field('job-vms', 'VMs (names or globs, comma-separated)', sel),
  preview,
  field('job-repository', 'Repository', repo),
  field('job-schedule', 'Schedule', sched, 'cron (5 fields), @hourly/@daily/@weekly, or @every DURATION; see docs/server-config.md'),
  field('job-keep-last', 'Keep the last N backups (retention)', keep),
  field('job-hooks', 'Host hooks around the freeze (absolute paths, comma-separated)', hooks),
  el('button', {type: 'submit'}, 'Create job'));
  show(el('h1', {}, 'New backup job'), form);
  update();
  name.focus();
}

async function editJobPage(jname) {
  const j = await call('GET', '/jobs/' + encodeURIComponent(jname));
  const ta = el('textarea', {rows: 14, spellcheck: 'false'}, JSON.stringify(j.spec, null, 2));
  const form = el('form', {class: 'box', id: 'edit-form', onsubmit: (e) => {
    e.preventDefault();
    act(form.querySelector('button[type=submit]'), async () => {
      let spec;
      try { spec = JSON.parse(ta.value); } catch (err) { throw new Error('The settings are not valid JSON: ' + err.message); }
      await call('PUT', '/jobs/' + encodeURIComponent(jname), spec);
      toast('Job ' + jname + ' saved');
      location.hash = '#/jobs';
    });
  }}, field('job-spec', 'Settings (the keys of the configuration file, as JSON)', ta), el('button', {type: 'submit'}, 'Save'));
  show(el('h1', {}, 'Edit job ' + jname), form);
}

// ---- runs ----

async function runsPage(params) {
  const job = params.get('job') || '';
  const before = params.get('before') || '';
  const status = params.get('status') || '';
  let q = '?limit=' + PAGE + (job ? '&job=' + encodeURIComponent(job) : '') + (before ? '&before=' + encodeURIComponent(before) : '');
  const [runs, jobs] = await Promise.all([call('GET', '/runs' + q), call('GET', '/jobs')]);
  const list = runs.runs.filter((r) => !status || r.status === status);
  const jobSel = el('select', {name: 'job', id: 'filter-job'}, el('option', {value: ''}, 'all jobs'), jobs.jobs.map((j) => el('option', {value: j.name, selected: j.name === job}, j.name)));
  const stSel = el('select', {name: 'status', id: 'filter-status'}, ['', 'running', 'succeeded', 'partial', 'failed', 'cancelled', 'interrupted', 'skipped'].map((s) => el('option', {value: s, selected: s === status}, s || 'any status')));
  const filter = el('form', {class: 'filters', onsubmit: (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    if (jobSel.value) p.set('job', jobSel.value);
    if (stSel.value) p.set('status', stSel.value);
    location.hash = '#/runs?' + p;
  }}, el('label', {for: 'filter-job'}, 'Job'), jobSel, el('label', {for: 'filter-status'}, 'Status'), stSel, el('button', {type: 'submit'}, 'Filter'),
  status && el('small', {}, 'The status filter applies to the runs of this page.'));
  const rows = list.map((r) => el('tr', {'data-run': r.id},
    el('td', {}, el('a', {href: '#/run/' + r.id}, '#' + r.id)), el('td', {}, r.job), el('td', {}, r.kind), el('td', {}, r.trigger),
    el('td', {}, badge(r.status)), el('td', {}, when(r.started)),
    el('td', {}, isZero(r.ended) ? '' : dur((new Date(r.ended) - new Date(r.started)) / 1000)),
    el('td', {class: 'error'}, r.error || '')));
  const more = new URLSearchParams(params);
  if (runs.next_before) more.set('before', runs.next_before);
  show(el('h1', {}, 'Runs'), filter,
    list.length ? table(['Run', 'Job', 'Type', 'Trigger', 'Status', 'Started', 'Duration', 'Error'], rows, {id: 'runs'}) : el('p', {}, 'No run on this page.'),
    el('p', {class: 'pager'}, before && el('a', {href: '#/runs' + (job ? '?job=' + encodeURIComponent(job) : '')}, '« Newest'), ' ',
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
    a.classList.toggle('current', a.getAttribute('href') === '#/' + (parts[0] || ''));
  }
  try {
    if (parts.length === 0) await dashboard();
    else if (parts[0] === 'vm' && parts[1]) await vmPage(parts[1], params.get('before'));
    else if (parts[0] === 'jobs' && parts[1] === 'new') await newJobPage();
    else if (parts[0] === 'jobs' && parts[1] === 'edit' && parts[2]) await editJobPage(parts[2]);
    else if (parts[0] === 'jobs') await jobsPage();
    else if (parts[0] === 'runs') await runsPage(params);
    else if (parts[0] === 'run' && /^\d+$/.test(parts[1] || '')) await runPage(parts[1]);
    else show(el('h1', {}, 'Not found'), el('p', {}, el('a', {href: '#/'}, 'Back to the dashboard')));
  } catch (e) {
    show(el('h1', {}, 'Error'), el('p', {class: 'error', role: 'alert'}, e.message));
  }
}

window.addEventListener('hashchange', route);
route();
