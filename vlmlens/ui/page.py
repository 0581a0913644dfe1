"""What the page itself carries besides the components: its style sheet and its script.

The script does two things in the reader's browser:

* clicking a cell of the single-layer heatmap writes its "row, col" into the patch box (whose
  change shows that patch's numbers); the plot is re-drawn on every view, so the binding is renewed;
* every figure gets an "SVG" button that saves it as a vector file (plotly's camera button saves PNG);
* every figure is fitted to the width it is drawn at (a 1024-px projector or a wide screen): a
  title or message too wide for its figure is wrapped at spaces, the top margin grows to hold the
  title and a legend above the plot (which then no longer covers the title), labels that run into
  each other (small multiples' titles) are set smaller, and the text of a heatmap's cells is set
  smaller or, when even that does not fit, left to the hover. The figures themselves (what the
  library returns and the exports hold) are not changed: only what this page draws of them.
"""
from __future__ import annotations

#: a long output's logit lens is drawn wider than the page: its panel scrolls sideways; where the tabs
#: do not fit in one row (a 1024-px projector) gradio folds the rest into "•••": say what it holds; a
#: plot's label takes its own line instead of floating over the figure's title
CSS = ("#vl-logit-lens { overflow-x: auto !important; }\n"
       "#vl-tabs .overflow-menu > button::after { content: 'more tabs'; margin-left: 6px; font-size: 0.9em; }\n"
       ".block:has(.js-plotly-plot) > label[data-testid='block-label'].float { position: relative;"
       " margin-bottom: 4px; }\n"
       "th, td { word-break: normal !important; overflow-wrap: normal !important; hyphens: none; }\n"
       "[id^='vl-'] .prose:has(table) { overflow-x: auto; }\n"
       "[id^='vl-'] td a { white-space: nowrap; }\n"
       ".vl-svg { position: absolute; right: 6px; bottom: 4px; z-index: 5; font-size: 11px; padding: 1px 6px;"
       " border: 1px solid #ccc; border-radius: 4px; background: #fff; opacity: 0.75; cursor: pointer; }\n"
       ".vl-svg:hover { opacity: 1; }")

JS = r"""() => {
  const bindPatchClick = () => {
    const plot = document.querySelector('#vl-heatmap .js-plotly-plot');
    if (!plot || !plot.on || plot.__vlPatch) return;
    plot.__vlPatch = true;
    plot.on('plotly_click', (ev) => {
      const p = ev && ev.points && ev.points.find((q) => q.customdata);
      const box = document.querySelector('#vl-patch textarea, #vl-patch input');
      if (!p || !box) return;
      box.value = p.customdata[2] + ', ' + p.customdata[3];
      box.dispatchEvent(new Event('input', {bubbles: true}));
    });
  };

  // ---- fitting a figure to the width it is drawn at -------------------------------------------
  const MIN_FONT = 9;
  const rect = (el) => el.getBoundingClientRect();
  const fits = (r, box) => r.left >= box.left - 1 && r.right <= box.right + 1;
  const hits = (a, b) => !(a.right <= b.left || b.right <= a.left || a.bottom <= b.top || b.bottom <= a.top);
  // wrap text at spaces into lines of at most n visible characters (a word longer than n keeps its line);
  // inline markup without spaces inside (h<sub>ℓ</sub>) travels with its word
  const visible = (t) => t.replace(/<[^>]+>/g, '').length;
  const wrapPlain = (text, n) => {
    const lines = [];
    let line = '';
    for (const w of text.split(' ')) {
      if (line && visible(line + ' ' + w) > n) { lines.push(line); line = w; } else { line = line ? line + ' ' + w : w; }
    }
    if (line) lines.push(line);
    return lines;
  };
  const wordsKeepMarkup = (seg) => !/<[^>]+>/.test(seg.replace(/<(\w+)[^>\s]*>[^<\s]*<\/\1>/g, ''));
  // a plotly label (lines joined by <br>, each perhaps wrapped whole in one tag such as <sup>) whose lines are
  // wider than maxWidth, wrapped line by line (each line's own drawn width sets its length); null: it fits
  const wrapLabel = (node, text, maxWidth) => {
    const drawn = [...node.querySelectorAll('tspan.line')];
    const segs = text.split(/<br\s*\/?>/i);
    let changed = false;
    const out = segs.map((seg, i) => {
      const w = drawn.length === segs.length ? rect(drawn[i]).width : rect(node).width;
      if (w <= maxWidth) return seg;
      const m = seg.match(/^(<(\w+)[^>]*>)([^<]*)(<\/\2>)$/);
      const plain = m ? m[3] : seg;
      if (!m && !wordsKeepMarkup(seg)) return seg;           // markup across words: left whole
      const n = Math.max(10, Math.floor(visible(plain) * maxWidth / w * 0.95));
      const lines = wrapPlain(plain, n);
      if (lines.length < 2) return seg;
      changed = true;
      return m ? lines.map((l) => m[1] + l + m[4]).join('<br>') : lines.join('<br>');
    });
    return changed ? out.join('<br>') : null;
  };
  const indexOf = (node, i) => (node.getAttribute('data-index') === null ? i : +node.getAttribute('data-index'));

  const fitPlot = (el) => {
    const lay = el._fullLayout, svg = el.querySelector('.main-svg');
    if (!lay || !svg || !window.Plotly) return;
    if (el.__vlData !== el.data) { el.__vlData = el.data; el.__vlPasses = 0; }
    if (el.__vlPasses >= 6 || el.__vlBusy) return;
    const box = rect(svg);
    if (box.width < 50) return;                          // not shown (another tab)
    const upd = {}, traceUpd = {};
    // the title and the axes' titles: wrapped to the figure's width
    const title = el.querySelector('.infolayer .gtitle');
    const ttext = lay.title && lay.title.text;
    if (title && ttext) {
      const w = wrapLabel(title, ttext, box.right - Math.max(rect(title).left, box.left) - 8);
      if (w) upd['title.text'] = w;
    }
    el.querySelectorAll('.infolayer [class^="g-x"][class$="title"] text').forEach((node) => {
      const ax = node.parentNode.getAttribute('class').slice(2, -5);       // "x", "x2", ...
      const key = (ax === 'x' ? 'xaxis' : 'xaxis' + ax.slice(1));
      const t = lay[key] && lay[key].title && lay[key].title.text;
      const dom = lay[key].domain || [0, 1], room = Math.max(80, (dom[1] - dom[0]) * lay._size.w + 24);
      if (!t || (fits(rect(node), box) && rect(node).width <= room)) return;
      const size = (lay[key].title.font && lay[key].title.font.size) || lay.font.size;
      if (size > MIN_FONT + 2) { upd[key + '.title.font.size'] = size - 1; return; }   // smaller first, then wrapped
      const w = wrapLabel(node, t, room - 24);
      if (w) { upd[key + '.title.text'] = w; upd['margin.b'] = lay.margin.b + 16 * (w.split('<br>').length - 1); }
    });
    // notes and messages (annotations) cut at an edge: wrapped; labels running into each other: smaller
    const anns = lay.annotations || [];
    const nodes = [...el.querySelectorAll('.infolayer .annotation')];
    nodes.forEach((node, i) => {
      const idx = indexOf(node, i), a = anns[idx];
      if (!a || !a.text) return;
      const r = rect(node);
      if (!fits(r, box)) {
        const w = wrapLabel(node, a.text, box.width - 24);
        if (w) upd[`annotations[${idx}].text`] = w;
        else if (r.width < box.width / 2)                       // a short label past an edge: turned inwards
          upd[`annotations[${idx}].xanchor`] = r.right > box.right ? 'right' : 'left';
        return;
      }
      for (let j = i + 1; j < nodes.length; j++) {
        if (!hits(r, rect(nodes[j]))) continue;
        for (const k of [idx, indexOf(nodes[j], j)]) {
          const size = (anns[k] && anns[k].font && anns[k].font.size) || lay.font.size, text = anns[k].text || '';
          if (size > MIN_FONT) upd[`annotations[${k}].font.size`] = size - 1;
          else if (!/<br/i.test(text) && text.includes(' '))        // as small as it gets: two lines
            upd[`annotations[${k}].text`] = wrapPlain(text, Math.ceil(visible(text) / 2) + 1).join('<br>');
        }
      }
    });
    // a legend under the plot clear of the axes' titles: moved down, the bottom margin grown to hold it
    const legend = el.querySelector('.legend');
    if (legend && lay.legend && lay.legend.y < 0 && rect(legend).width > 0) {
      const lr = rect(legend);
      let down = 0;
      el.querySelectorAll('.infolayer [class^="g-x"][class$="title"] text').forEach((n) => {
        const r = rect(n);
        if (hits(lr, r)) down = Math.max(down, r.bottom - lr.top + 4);
      });
      if (down > 0) {
        upd['legend.y'] = lay.legend.y - down / lay._size.h;
        upd['margin.b'] = Math.ceil((upd['margin.b'] || lay.margin.b) + down);
        if (lay.height) upd.height = Math.ceil(lay.height + down);
      }
    }
    // the title at the figure's top, and the top margin holding it above whatever sits at the plot's top (a
    // legend, subplot titles)
    if (title && ttext && !('title.text' in upd)) {
      const t = rect(title), tl = lay.title;
      const anchored = tl.yref === 'container' && tl.y === 1 && tl.yanchor === 'top';
      let push = 0;
      for (const n of [legend, ...nodes]) {
        if (!n || rect(n).width === 0) continue;
        const r = rect(n);
        if (r.bottom > t.top + 2 && hits(t, r)) push = Math.max(push, t.bottom - r.top + 6);
      }
      if (!anchored && (push > 0 || t.top < box.top)) {
        Object.assign(upd, {'title.yref': 'container', 'title.y': 1, 'title.yanchor': 'top', 'title.pad.t': 6});
      } else if (t.top < box.top - 1) {
        upd['title.pad.t'] = Math.ceil(((tl.pad && tl.pad.t) || 0) + box.top - t.top + 2);
      }
      if (push > 0) {
        upd['margin.t'] = Math.ceil(lay.margin.t + push);
        if (lay.height) upd.height = Math.ceil(lay.height + push);
      }
    }
    // a heatmap's cell text: smaller while the words run into each other, then left to the hover
    const cells = [...el.querySelectorAll('.heatmaplayer text, .hm text')].filter((t) => t.textContent.trim());
    let crowded = false;
    for (let i = 0; i + 1 < cells.length && !crowded; i++) {
      const a = rect(cells[i]), b = rect(cells[i + 1]);
      if (Math.abs(a.top - b.top) < 2 && b.left > a.left && a.right > b.left + 1) crowded = true;
    }
    if (crowded) {
      (el._fullData || []).forEach((tr, ti) => {
        if (tr.type !== 'heatmap' || !tr.texttemplate) return;
        const size = (tr.textfont && tr.textfont.size) || 12;
        traceUpd[ti] = size > MIN_FONT ? {'textfont.size': size - 1} : {texttemplate: ''};
      });
    }
    if (!Object.keys(upd).length && !Object.keys(traceUpd).length) return;
    el.__vlPasses += 1;
    el.__vlBusy = true;
    const done = () => { el.__vlBusy = false; };
    let chain = Promise.resolve();
    for (const [ti, u] of Object.entries(traceUpd)) chain = chain.then(() => window.Plotly.restyle(el, u, [+ti]));
    if (Object.keys(upd).length) chain = chain.then(() => window.Plotly.relayout(el, upd));
    chain.then(done, done);
  };
  // every figure: a button that saves it as SVG (vector, for papers and slides; plotly's own camera saves PNG)
  const addSvgButton = (el) => {
    const holder = el.parentElement;
    if (!holder || holder.querySelector(':scope > .vl-svg') || !window.Plotly) return;
    const b = document.createElement('button');
    b.className = 'vl-svg';
    b.type = 'button';
    b.textContent = 'SVG';
    b.title = 'Download this figure as SVG';
    b.addEventListener('click', () => {
      const plot = holder.querySelector('.js-plotly-plot');
      const owner = holder.closest('[id^="vl-"]');
      if (plot) window.Plotly.downloadImage(plot, {format: 'svg', filename: owner ? owner.id.slice(3) : 'figure'});
    });
    holder.appendChild(b);
  };
  const fitAll = () => document.querySelectorAll('.js-plotly-plot').forEach((el) => {
    try { addSvgButton(el); fitPlot(el); } catch (e) { el.__vlPasses = 99; el.__vlError = String(e); }   // never break the page over a figure
  });
  setInterval(() => { bindPatchClick(); fitAll(); }, 400);
}"""
