"""The page `mmn-edge serve` shows at ``/``: a patient form generated from the bundle's manifest (one section
per modality, any may stay empty), the probability per task and the per-step explanation chart (the paper's
cumulative prediction: the prediction after the prior and after each encoder step). One self-contained HTML
document: inline CSS and JS, no external resource (the Content-Security-Policy forbids any).

The script builds the form from the model's description (``Service.info()`` minus the drift statistics). Without
an access token it is embedded in the page. With one, the page holds nothing about the model: it asks for the
token, fetches ``/info`` with it (``Authorization: Bearer``) and sends it with every ``/predict``.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any

_CSS = """
*{box-sizing:border-box}body{font:16px/1.45 system-ui,sans-serif;margin:0;color:#1d2733;background:#f5f7fa}
header{background:#1f3b57;color:#fff;padding:.8rem 1rem}header h1{font-size:1.2rem;margin:0}
header p{margin:.2rem 0 0;font-size:.9rem;opacity:.85}main{max-width:70rem;margin:auto;padding:1rem;
display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:1rem}
@media (max-width:900px){main{grid-template-columns:1fr}}
fieldset{border:1px solid #c9d3de;border-radius:.5rem;background:#fff;margin:0 0 .8rem;padding:.6rem .8rem}
legend{font-weight:600;padding:0 .3rem}.fields{display:grid;grid-template-columns:repeat(auto-fill,minmax(11rem,1fr));
gap:.5rem .8rem}label{display:flex;flex-direction:column;font-size:.85rem;color:#435466}
input,select,button{font:inherit;padding:.55rem;border:1px solid #9fb0c2;border-radius:.4rem;min-height:2.6rem;
background:#fff}button{background:#1f6fb2;color:#fff;border:0;padding:.6rem 1.4rem;cursor:pointer}
button.secondary{background:#e3e9f0;color:#1d2733}.actions{display:flex;gap:.6rem;flex-wrap:wrap}
section.out{background:#fff;border:1px solid #c9d3de;border-radius:.5rem;padding:.8rem}
.task{font-size:1.1rem;margin:.3rem 0}.task b{font-size:1.4rem}.err{color:#a4161a;white-space:pre-wrap}
.muted{color:#66788a;font-size:.85rem}svg{width:100%;max-width:28rem;height:auto;display:block}svg text{font-size:11px;fill:#1d2733}
.card dt{font-weight:600}.card dd{margin:0 0 .4rem}
"""

_JS = r"""
let INFO = null;
const form = document.getElementById('patient');
const out = document.getElementById('results');
const errBox = document.getElementById('error');
const tok = document.getElementById('token');
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function headers() {
  const h = {'Content-Type': 'application/json'};
  if (tok && tok.value) h['Authorization'] = 'Bearer ' + tok.value.trim();
  return h;
}
function field(c, spec) {
  const label = el('label', {}, c);
  let f;
  if (spec.kind === 'numeric') {
    f = el('input', {type: 'number', step: 'any', inputmode: 'decimal', name: c, 'data-column': c,
      'data-kind': 'numeric', placeholder: 'mean ' + Number(spec.mean.toPrecision(4))});
  } else {
    f = el('select', {name: c, 'data-column': c, 'data-kind': 'categorical'});
    f.appendChild(el('option', {value: ''}, ''));
    for (const k of spec.categories) f.appendChild(el('option', {value: String(k)}, String(k)));
  }
  label.appendChild(f);
  return label;
}
function build(info) {
  INFO = info;
  document.title = `mmn-edge · ${info.model_id}`;
  document.getElementById('model-line').textContent =
    `model ${info.model_id} · release ${info.release} · fill any modalities; empty ones are skipped`;
  const sections = document.getElementById('sections');
  sections.replaceChildren();
  for (const x of info.order) {
    const fs = el('fieldset', {'data-modality': x});
    fs.appendChild(el('legend', {}, x));
    const d = el('div', {class: 'fields'});
    for (const c of info.modalities[x].columns) d.appendChild(field(c, info.columns[c]));
    fs.appendChild(d);
    sections.appendChild(fs);
  }
  const card = info.model_card;
  if (card && typeof card === 'object' && Object.keys(card).length) {
    const sec = el('section', {class: 'out card', id: 'model-card'});
    sec.appendChild(el('h2', {}, 'Model card'));
    const dl = el('dl');
    for (const k in card) {
      dl.appendChild(el('dt', {}, k));
      dl.appendChild(el('dd', {}, typeof card[k] === 'string' ? card[k] : JSON.stringify(card[k])));
    }
    sec.appendChild(dl);
    document.getElementById('side').appendChild(sec);
  }
  form.hidden = false;
}
function patient() {
  const p = {};
  for (const f of form.querySelectorAll('[data-column]')) {
    if (f.value === '') continue;
    p[f.dataset.column] = f.dataset.kind === 'numeric' ? Number(f.value) : f.value;
  }
  return p;
}
// the value plotted for a task at one step: p(1), the value, or (multiclass) p(final predicted class)
function scalar(task, v, cls) { return INFO.tasks[task].kind === 'multiclass' ? v[cls] : v; }
function chart(task, steps, cls) {
  const W = 360, H = 190, L = 40, B = 40, n = steps.length, bw = (W - L - 10) / n;
  const vals = steps.map(s => scalar(task, s[task], cls));
  const reg = INFO.tasks[task].kind === 'regression';
  const lo = reg ? Math.min(0, ...vals) : 0, hi = reg ? Math.max(...vals, 1e-9) : 1;
  const y = v => 10 + (H - B - 10) * (1 - (v - lo) / ((hi - lo) || 1));
  const s = svg('svg', {viewBox: `0 0 ${W} ${H}`, role: 'img', 'data-task': task,
    'aria-label': `${task}: prediction after each step`});
  s.appendChild(svg('line', {x1: L, y1: y(lo), x2: W - 5, y2: y(lo), stroke: '#9fb0c2'}));
  s.appendChild(svg('text', {x: 2, y: y(hi) + 4}, reg ? hi.toPrecision(3) : '1'));
  s.appendChild(svg('text', {x: 2, y: y(lo)}, reg ? lo.toPrecision(3) : '0'));
  steps.forEach((st, k) => {
    const g = svg('g', {class: 'step', 'data-step': st.step, 'data-value': String(vals[k])});
    const x = L + k * bw + bw * 0.15, top = y(Math.max(vals[k], lo));
    g.appendChild(svg('rect', {x, y: top, width: bw * 0.7, height: Math.max(1, y(lo) - top),
      fill: k === 0 ? '#9fb0c2' : '#1f6fb2'}));
    g.appendChild(svg('text', {x: x, y: top - 3}, reg ? vals[k].toPrecision(3) : vals[k].toFixed(2)));
    g.appendChild(svg('text', {x: x, y: H - B + 14}, st.step));
    g.appendChild(svg('title', {}, `${st.step}: ${vals[k]}`));
    s.appendChild(g);
  });
  return s;
}
function show(res) {
  out.replaceChildren();
  const r = res.results[0];
  out.appendChild(el('p', {class: 'muted', id: 'model'}, `model ${res.model_id} release ${res.release}`));
  if (!r.ok) { out.appendChild(el('p', {class: 'err', id: 'reason'}, r.reason)); return; }
  out.appendChild(el('p', {class: 'muted'}, 'modalities used: ' + r.modalities.join(', ')));
  for (const w of r.warnings) out.appendChild(el('p', {class: 'muted warning'}, 'warning: ' + w));
  for (const task in INFO.tasks) {
    const spec = INFO.tasks[task], v = r.predictions[task];
    const d = el('div', {class: 'task', 'data-task': task});
    let cls = null;
    if (spec.kind === 'multiclass') {
      cls = spec.classes.reduce((a, c) => v[c] > v[a] ? c : a, spec.classes[0]);
      d.dataset.value = String(v[cls]); d.dataset.class = cls;
      d.append(`${task}: `, el('b', {}, cls), ` (p = ${v[cls].toFixed(3)})`);
    } else {
      d.dataset.value = String(v);
      d.append(`${task}: `, el('b', {}, spec.kind === 'binary' ? `p = ${v.toFixed(3)}` : v.toPrecision(4)));
    }
    out.appendChild(d);
    if (r.explanation) {
      out.appendChild(el('p', {class: 'muted'}, 'after each step' + (cls !== null ? ` (p of ${cls})` : '') + ':'));
      out.appendChild(chart(task, r.explanation, cls));
    }
  }
}
form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  errBox.textContent = ''; out.setAttribute('aria-busy', 'true');
  try {
    const resp = await fetch('predict', {method: 'POST', headers: headers(),
      body: JSON.stringify({patient: patient(), explain: true})});
    const res = await resp.json();
    if (!resp.ok) { errBox.textContent = res.error; out.replaceChildren(); }
    else show(res);
  } catch (e) { errBox.textContent = 'request failed: ' + e; }
  out.setAttribute('aria-busy', 'false'); out.dataset.done = String(Date.now());
});
document.getElementById('clear').addEventListener('click', () => { form.reset(); out.replaceChildren(); });
const access = document.getElementById('access');
if (access) {
  access.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    errBox.textContent = '';
    try {
      const resp = await fetch('info', {headers: headers()});
      const res = await resp.json();
      if (!resp.ok) { errBox.textContent = res.error; return; }
      build(res);
      document.getElementById('unlock').hidden = true;
    } catch (e) { errBox.textContent = 'request failed: ' + e; }
  });
} else {
  build(JSON.parse(document.getElementById('info').textContent));
}
"""


def page(info: dict[str, Any] | None) -> str:
    """The HTML page. ``info`` (``Service.info()``) is embedded when no token is configured; ``None`` (a token
    is configured) gives a page that holds nothing about the model and asks for the token first."""
    if info is None:
        access = ('<form id="access" autocomplete="off"><fieldset><legend>access</legend><label>access token'
                  '<input type="password" id="token" autocomplete="off" required></label></fieldset>'
                  '<div class="actions"><button type="submit" id="unlock">Unlock</button></div></form>')
        data, title, line = "", "mmn-edge", "enter the access token to load the model"
    else:
        access = ""
        shown = {k: info[k] for k in ("model_id", "release", "order", "modalities", "tasks", "columns",
                                      "model_card")}
        # '<' escaped so the JSON cannot close the script element
        data = ('<script type="application/json" id="info">'
                + json.dumps(finite(shown), allow_nan=False).replace("<", "\\u003c") + "</script>")
        title = f"mmn-edge · {info['model_id']}"
        line = f"model {info['model_id']} · release {info['release']} · fill any modalities; empty ones are skipped"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(str(title))}</title><style>{_CSS}</style></head>
<body><header><h1>MultiModN prediction</h1>
<p id="model-line">{html.escape(line)}</p></header>
<main><div>{access}<form id="patient" autocomplete="off" hidden><div id="sections"></div>
<div class="actions"><button type="submit" id="submit">Predict</button>
<button type="button" class="secondary" id="clear">Clear</button></div></form></div>
<div id="side"><section class="out" aria-live="polite"><h2>Prediction</h2><p class="err" id="error"></p>
<div id="results"><p class="muted">No prediction yet. Values stay in this page and the local service;
nothing is stored.</p></div></section></div></main>
{data}<script>{_JS}</script></body></html>
"""


def finite(obj: Any) -> Any:
    """JSON has no inf or NaN: such numbers are reported as null (a statistic that cannot be computed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
