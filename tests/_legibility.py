"""What a reader of the dashboard would find unreadable, measured in the page (for the browser tests).

``PROBLEMS`` is a script for ``page.evaluate``; it returns one line per problem among what is visible:

* text of a figure cut at the figure's edge (its title, axis titles, notes, legend entries);
* a figure's labels running into each other (title, axis titles, notes, legend) or the legend over the title;
* a message or table wider than its box (unless the box scrolls sideways) or beyond the window's edge;
* a word of a table cell broken across lines inside the word (a break at a hyphen or a space is fine).
"""

PROBLEMS = r"""() => {
  // problems a reader would see: clipped text, a legend or a label over a title, words broken mid-word
  const out = [];
  const vis = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0 && el.offsetParent !== null; };
  const name = (el) => { const p = el.closest('[id^="vl-"]'); return p ? p.id : el.tagName; };
  const overlap = (a, b, pad) => !(a.right <= b.left + pad || b.right <= a.left + pad || a.bottom <= b.top + pad || b.bottom <= a.top + pad);
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    if (!vis(plot)) continue;
    const svg = plot.querySelector('.main-svg'); if (!svg) continue;
    const box = svg.getBoundingClientRect();
    const texts = [...plot.querySelectorAll('.infolayer .gtitle, .infolayer .g-gtitle text, .annotation-text, .legend .legendtext, [class^="g-x"][class$="title"] text, [class^="g-y"][class$="title"] text')]
      .filter(t => t.textContent.trim() && t.getBoundingClientRect().width > 0);
    for (const t of texts) {
      const r = t.getBoundingClientRect();
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
        out.push(`${name(plot)}: text cut at the figure's edge: "${t.textContent.slice(0, 50)}" ${JSON.stringify([r.left, r.right, r.top, r.bottom].map(Math.round))} in ${JSON.stringify([box.left, box.right, box.top, box.bottom].map(Math.round))}`);
    }
    const title = plot.querySelector('.infolayer .gtitle');
    const legend = plot.querySelector('.legend .bg');
    if (title && legend && title.textContent.trim()) {
      if (overlap(title.getBoundingClientRect(), legend.getBoundingClientRect(), 1))
        out.push(`${name(plot)}: the legend covers the title`);
    }
    const labels = [...plot.querySelectorAll('.infolayer .gtitle, .infolayer [class^="g-x"][class$="title"] text, .infolayer [class^="g-y"][class$="title"] text, .infolayer .annotation, .legend .bg')]
      .filter(n => n.getBoundingClientRect().width > 0 && (n.classList.contains('bg') || n.textContent.trim()));
    for (let i = 0; i < labels.length; i++)
      for (let j = i + 1; j < labels.length; j++)
        if (overlap(labels[i].getBoundingClientRect(), labels[j].getBoundingClientRect(), 1))
          out.push(`${name(plot)}: labels run into each other: "${labels[i].textContent.slice(0, 30) || 'legend'}" / "${labels[j].textContent.slice(0, 30) || 'legend'}"`);
    const ann = [...plot.querySelectorAll('.annotation')].filter(a => a.getBoundingClientRect().width > 0 && a.textContent.trim());
    const heads = title ? [title] : [];
    for (let i = 0; i < ann.length; i++) {
      for (let j = i + 1; j < ann.length; j++)
        if (overlap(ann[i].getBoundingClientRect(), ann[j].getBoundingClientRect(), 0))
          out.push(`${name(plot)}: labels overlap: "${ann[i].textContent.slice(0, 30)}" / "${ann[j].textContent.slice(0, 30)}"`);
      for (const h of heads)
        if (overlap(ann[i].getBoundingClientRect(), h.getBoundingClientRect(), 2))
          out.push(`${name(plot)}: a label sits on the title: "${ann[i].textContent.slice(0, 30)}"`);
    }
  }
  // markdown / html messages wider than their box (clipped on either side)
  for (const el of document.querySelectorAll('.prose, .md, [id^="vl-"] .html-container')) {
    if (!vis(el)) continue;
    if (el.scrollWidth > el.clientWidth + 2 && getComputedStyle(el).overflowX !== 'auto' && getComputedStyle(el).overflowX !== 'scroll')
      out.push(`${name(el)}: a message wider than its box (${el.scrollWidth} > ${el.clientWidth})`);
    const r = el.getBoundingClientRect();
    if (r.left < -1 || r.right > window.innerWidth + 1)
      out.push(`${name(el)}: a message beyond the window's edge`);
  }
  // table headers and cells broken inside a word
  for (const cell of document.querySelectorAll('th, td')) {
    if (!vis(cell)) continue;
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    let node;
    while ((node = walker.nextNode())) {
      const re = /[^\s-]+/g; let m;
      while ((m = re.exec(node.textContent))) {
        if (m[0].length < 3) continue;
        const rg = document.createRange(); rg.setStart(node, m.index); rg.setEnd(node, m.index + m[0].length);
        const tops = new Set([...rg.getClientRects()].filter(x => x.width > 0).map(x => Math.round(x.top)));
        if (tops.size > 1) { out.push(`${name(cell)}: "${m[0]}" broken across lines`); }
      }
    }
  }
  return [...new Set(out)];
}"""
