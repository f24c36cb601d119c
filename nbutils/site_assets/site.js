// The atlas site: one page, routed by the URL's hash (#L2N317 is layer 2, neuron 317; anything else is the
// overview). Data files in data/ are scripts that call NE.data(name, value); they are loaded on demand by a
// <script> tag, which works from file:// (where fetch is refused) and from any static server.
(function () {
  "use strict";

  const NE = (window.NE = { store: {}, pending: {} });
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"];
  const SVG = "http://www.w3.org/2000/svg";
  let renderId = 0;

  NE.data = function (name, value) {
    NE.store[name] = value;
    if (name === "overview") start();
  };

  // One data file, once: resolves with its value.
  function load(name, src) {
    if (name in NE.store) return Promise.resolve(NE.store[name]);
    if (!NE.pending[name]) {
      NE.pending[name] = new Promise(function (resolve, reject) {
        const tag = document.createElement("script");
        tag.src = src;
        tag.onload = function () {
          if (name in NE.store) resolve(NE.store[name]);
          else reject(new Error(src + " did not define " + name));
        };
        tag.onerror = function () {
          delete NE.pending[name];
          reject(new Error("could not load " + src));
        };
        document.head.appendChild(tag);
      });
    }
    return NE.pending[name];
  }

  // DOM helpers: text always goes through textContent (labels hold quotes, angle brackets, anything).
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const key in attrs || {}) {
      if (key === "text") node.textContent = attrs[key];
      else node.setAttribute(key, attrs[key]);
    }
    for (const child of children || []) if (child != null) node.append(child);
    return node;
  }
  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const key in attrs) node.setAttribute(key, attrs[key]);
    if (text != null) node.textContent = text;
    return node;
  }
  function fmt(x, digits) {
    return x == null ? "–" : Number(x).toFixed(digits == null ? 2 : digits);
  }
  function neuronHref(layer, neuron) {
    return "#L" + layer + "N" + neuron;
  }
  function show(tokenText) {
    return tokenText.replace(/\n/g, "⏎").replace(/\t/g, "⇥");
  }

  // Tokens coloured by activation (orange; the data holds each token's activation in % of the neuron's max `top`),
  // the activating token outlined.
  function tokens(span, pos, top, extra) {
    const start = span[0], ids = span[1], pcts = span[2];
    const vocab = NE.store.vocab;
    const box = el("span", Object.assign({ class: "ne-tokens" }, extra || {}));
    ids.forEach(function (id, i) {
      const alpha = Math.max(0, Math.min(100, pcts[i])) / 100;
      const t = el("span", { title: "activation ≈ " + fmt((pcts[i] * top) / 100, 2) + " (" + pcts[i] + "% of max)",
        text: show(vocab[id]) });
      t.style.backgroundColor = "rgba(255,140,0," + alpha.toFixed(2) + ")";
      if (start + i === pos) t.className = "ne-at";
      box.append(t);
    });
    return box;
  }

  // ---------------------------------------------------------------- figures (SVG)

  function histogram(h, title) {
    const W = 480, H = 190, L = 46, B = 36, T = 22, R = 10;
    const svg = svgEl("svg", { width: W, height: H, role: "img", "aria-label": title });
    const n = h.counts.length, max = Math.max(1, Math.max.apply(null, h.counts));
    const bw = (W - L - R) / n;
    svg.append(svgEl("text", { x: W / 2, y: 14, "text-anchor": "middle", "font-weight": "bold" }, title));
    h.counts.forEach(function (c, i) {
      const bh = ((H - T - B) * c) / max;
      const rect = svgEl("rect", { x: L + i * bw + 1, y: H - B - bh, width: bw - 2, height: bh, fill: "#4c78a8" });
      rect.append(svgEl("title", {}, h.edges[i] + "–" + h.edges[i + 1] + ": " + c + " neurons"));
      svg.append(rect);
      if (i % 2 === 0) svg.append(svgEl("text", { x: L + i * bw, y: H - B + 13, "text-anchor": "middle" }, h.edges[i]));
    });
    svg.append(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#333" }));
    svg.append(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#333" }));
    svg.append(svgEl("text", { x: L - 4, y: T + 4, "text-anchor": "end" }, max));
    svg.append(svgEl("text", { x: L - 4, y: H - B, "text-anchor": "end" }, 0));
    svg.append(svgEl("text", { x: (W + L) / 2, y: H - 4, "text-anchor": "middle" }, "effective number of clusters"));
    svg.append(svgEl("text", { x: 12, y: (H - B + T) / 2, "text-anchor": "middle",
      transform: "rotate(-90 12 " + (H - B + T) / 2 + ")" }, "neurons"));
    return svg;
  }

  function map(m, title) {
    const W = 520, H = 360, P = 40;
    const xs = m[0].filter((v) => v != null), ys = m[1].filter((v) => v != null);
    const svg = svgEl("svg", { width: W, height: H, role: "img", "aria-label": title, class: "ne-map" });
    svg.append(svgEl("text", { x: W / 2, y: 14, "text-anchor": "middle", "font-weight": "bold" }, title));
    if (!xs.length) return svg;
    const x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs) || 1;
    const y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys) || 1;
    const sx = (v) => P + ((v - x0) / (x1 - x0 || 1)) * (W - 2 * P);
    const sy = (v) => H - P - ((v - y0) / (y1 - y0 || 1)) * (H - 2 * P);
    const sizes = {};
    m[2].forEach((c) => (sizes[c] = (sizes[c] || 0) + 1));
    const order = [];
    m[0].forEach(function (_, i) { order.push(i); });
    order.sort((a, b) => m[3][a] - m[3][b]);  // central examples drawn last, on top
    order.forEach(function (i) {
      if (m[0][i] == null || m[1][i] == null) return;
      const c = m[2][i];
      const colour = sizes[c] > 1 && c < COLOURS.length ? COLOURS[c] : "#bbb";
      const central = m[3][i] === 1;
      const dot = svgEl("circle", { cx: sx(m[0][i]).toFixed(1), cy: sy(m[1][i]).toFixed(1), r: central ? 6 : 3,
        fill: colour, stroke: central ? "#000" : "none", "fill-opacity": central ? 1 : 0.7 });
      dot.append(svgEl("title", {}, "cluster " + c + (central ? " (central example)" : "")));
      svg.append(dot);
    });
    svg.append(svgEl("rect", { x: P, y: P, width: W - 2 * P, height: H - 2 * P, fill: "none", stroke: "#999" }));
    svg.append(svgEl("text", { x: W / 2, y: H - 12, "text-anchor": "middle" }, "PC 1 of the unit neuron embeddings"));
    svg.append(svgEl("text", { x: 14, y: H / 2, "text-anchor": "middle", transform: "rotate(-90 14 " + H / 2 + ")" },
      "PC 2"));
    return svg;
  }

  // ---------------------------------------------------------------- pages

  function overviewPage() {
    const o = NE.store.overview;
    const page = el("div", { class: "ne-overview" }, [
      el("h1", { text: "Feature atlas of " + o.model }),
      el("p", { text: o.n_layers + " layers × " + o.d_mlp + " neurons; corpus: " + o.corpus.source + ", " +
        o.corpus.n_windows + " windows × " + o.corpus.window + " tokens; up to " + o.settings.k +
        " examples per neuron, clustered as " + (o.settings.space || "h ⊙ w") + " with " + o.settings.method +
        " at " + o.settings.threshold + "." }),
      el("p", { class: "ne-muted", text: "Per layer: how many effective clusters the neurons' examples form (1: " +
        "one behaviour; " + o.polysemantic_min + " or more: polysemantic), and the most polysemantic neurons. " +
        "Click a neuron, or search a token or label text above." }),
    ]);
    const grid = el("div", { class: "ne-layers" });
    o.per_layer.forEach(function (l) {
      const rows = l.top.map((r) => el("tr", {}, [
        el("td", {}, [el("a", { href: neuronHref(l.layer, r[0]), text: "L" + l.layer + "N" + r[0] })]),
        el("td", { text: fmt(r[1]) }), el("td", { text: fmt(r[2]) }), el("td", { text: r[3] }),
        el("td", { class: "ne-label", text: r[4] }),
      ]));
      grid.append(el("section", { class: "ne-layer", "data-layer": l.layer }, [
        el("h2", { text: "Layer " + l.layer }),
        el("p", { class: "ne-muted", text: l.live + " of " + l.neurons + " neurons have examples; " + l.polysemantic +
          " are polysemantic." }),
        histogram(l.histogram, "Layer " + l.layer + ": effective clusters per neuron"),
        el("h3", { text: "Most polysemantic neurons" }),
        el("table", { class: "ne-top" }, [el("tr", {}, ["neuron", "eff. clusters", "monosem.", "examples", "label"]
          .map((h) => el("th", { text: h })))].concat(rows)),
      ]));
    });
    page.append(grid);
    page.append(el("h2", { text: "Downloads" }));
    page.append(el("p", { class: "ne-muted", text: "The atlas's parquet tables (snappy), with its manifest; " +
      "row counts and sha256 checksums are in site.json." }));
    page.append(el("table", { class: "ne-downloads" }, [el("tr", {}, ["file", "rows", "MB"].map((h) => el("th", { text: h })))]
      .concat(o.tables.map((t) => el("tr", {}, [el("td", {}, [el("a", { href: t[0], download: "", text: t[0] })]),
        el("td", { text: t[2] == null ? "" : t[2] }), el("td", { text: fmt(t[1] / 1e6) })])))));
    return page;
  }

  function exampleLine(top, act, pos, span, attrs) {
    return el("div", Object.assign({ class: "ne-example" }, attrs || {}), [el("span", { class: "ne-act", text: fmt(act, 2) }),
      tokens(span, pos, top)]);
  }

  function neuronPage(layer, n, rec) {
    const o = NE.store.overview;
    const top = rec.max_act;
    const title = "Layer " + layer + ", neuron " + n;
    const nav = el("p", { class: "ne-nav" }, [
      n > 0 ? el("a", { href: neuronHref(layer, n - 1), text: "← neuron " + (n - 1) }) : null,
      n + 1 < o.d_mlp ? el("a", { href: neuronHref(layer, n + 1), text: "neuron " + (n + 1) + " →" }) : null,
      el("a", { href: "#", text: "overview" }),
    ]);
    const page = el("div", { class: "ne-neuron", "data-layer": layer, "data-neuron": n }, [
      el("h1", { text: title }), el("p", { class: "ne-label ne-neuron-label", text: rec.label || "(no examples)" }), nav,
      el("table", { class: "ne-numbers" }, [
        ["max activation", fmt(rec.max_act, 3)], ["examples", rec.n_examples],
        ["clusters (singletons)", rec.n_clusters + " (" + rec.n_singletons + ")"],
        ["effective clusters", fmt(rec.effective_clusters)], ["monosemanticity", fmt(rec.monosemanticity)],
      ].map((r) => el("tr", {}, [el("td", { text: r[0] }), el("td", { text: r[1] })]))),
    ]);
    if (rec.dead || !rec.n_examples) {
      page.append(el("p", { text: "This neuron never fires above zero on the corpus: it has no examples." }));
      return page;
    }
    const feats = rec.features || [];
    page.append(el("h2", { text: "Feature clusters (" + feats.length + ")" }));
    if (feats.length) {
      page.append(el("table", { class: "ne-features" }, [el("tr", {}, ["cluster", "size", "mean act.", "label",
        "central example", "similar features"].map((h) => el("th", { text: h })))].concat(feats.map(function (f) {
        return el("tr", { class: "ne-feature", "data-cluster": f.cluster }, [
          el("td", { text: f.cluster }), el("td", { text: f.size }), el("td", { text: fmt(f.mean_act) }),
          el("td", { class: "ne-label ne-feature-label", text: f.label }),
          el("td", {}, [tokens(f.central, f.pos, top, { class: "ne-tokens ne-central", "data-window": f.win,
            "data-pos": f.pos })]),
          el("td", { class: "ne-similar" }, f.similar.map((s) => el("a", { href: neuronHref(s[0], s[1]),
            class: "ne-similar-link", "data-key": s[0] + "/" + s[1] + "/" + s[2],
            title: s[5] + " (" + s[3] + " examples)", text: "L" + s[0] + "N" + s[1] + " c" + s[2] + " " + fmt(s[4]) }))),
        ]);
      }))));
    } else {
      page.append(el("p", { class: "ne-muted", text: "No cluster has enough examples to be a feature." }));
    }
    if (rec.map) page.append(map(rec.map, title + ": examples in 2-D, coloured by cluster (ringed: central)"));

    page.append(el("h2", { text: "Examples by cluster" }));
    page.append(el("p", { class: "ne-muted", text: "Tokens shaded by the neuron's activation (full colour: its max, " +
      fmt(top, 3) + "); the activating token outlined; hover for the value." }));
    const byCluster = {};
    (rec.examples || []).forEach(function (e) {
      const key = e[1] > 1 ? e[0] : "singletons";
      (byCluster[key] = byCluster[key] || []).push(e);
    });
    const labels = {};
    feats.forEach((f) => (labels[f.cluster] = f.label));
    Object.keys(byCluster).sort(function (a, b) {
      if (a === "singletons" || b === "singletons") return a === "singletons" ? 1 : -1;
      return byCluster[b][0][1] - byCluster[a][0][1] || a - b;
    }).forEach(function (key) {
      const rows = byCluster[key];
      const head = key === "singletons" ? "Singletons (" + rec.n_singletons + ")"
        : "Cluster " + key + " · " + rows[0][1] + " examples" + (labels[key] ? " · " + labels[key] : "");
      page.append(el("h3", { text: head }));
      rows.forEach((e) => page.append(exampleLine(top, e[3], e[4], e.slice(5), e[2] ? { class: "ne-example ne-is-central" } : {})));
    });
    if (rec.bands && rec.bands.length) {
      page.append(el("h2", { text: "Below the top: examples sampled by activation band" }));
      let band = null;
      rec.bands.forEach(function (b) {
        if (b[0] !== band) {
          band = b[0];
          page.append(el("h3", { text: "Band " + band }));
        }
        page.append(exampleLine(top, b[1], b[2], b.slice(3)));
      });
    }
    return page;
  }

  // ---------------------------------------------------------------- routing

  function setMain(node, title) {
    const main = document.getElementById("ne-main");
    main.replaceChildren(node);
    document.title = title;
  }

  function route() {
    const id = ++renderId, started = performance.now();
    const o = NE.store.overview;
    const m = /^#L(\d+)N(\d+)$/.exec(location.hash);
    if (!m) {
      setMain(overviewPage(), "Feature atlas · " + o.model);
      return;
    }
    const layer = Number(m[1]), n = Number(m[2]);
    if (o.layers.indexOf(layer) < 0 || n >= o.d_mlp) {
      setMain(el("p", { class: "ne-error", text: "No neuron L" + layer + "N" + n + " in this atlas (layers " +
        o.layers.join(", ") + "; neurons 0.." + (o.d_mlp - 1) + ")." }), "Feature atlas");
      return;
    }
    const block = Math.floor(n / o.block), name = "L" + layer + "B" + block;
    Promise.all([load("vocab", "data/vocab.js"), load(name, "data/L" + layer + "/B" + block + ".js")])
      .then(function (found) {
        if (id !== renderId) return;  // a later hash change won
        setMain(neuronPage(layer, n, found[1][n - block * o.block]), "L" + layer + "N" + n + " · feature atlas");
        window.scrollTo(0, 0);
        NE.shown = { hash: location.hash, ms: performance.now() - started };  // how long the page took (benchmarks)
      })
      .catch(function (err) {
        if (id === renderId) setMain(el("p", { class: "ne-error", text: String(err.message || err) }), "Feature atlas");
      });
  }

  // ---------------------------------------------------------------- search

  function search(query) {
    const box = document.getElementById("ne-results");
    const q = query.trim().toLowerCase();
    if (!q) {
      box.hidden = true;
      return;
    }
    const jump = /^l(\d+)n(\d+)$/.exec(q);
    load("search", "data/search.js").then(function (index) {
      if (document.getElementById("ne-query").value.trim().toLowerCase() !== q) return;  // typed on
      const d = NE.store.overview.d_mlp;
      const link = (g) => el("a", { href: neuronHref(Math.floor(g / d), g % d), class: "ne-result" }, [
        "L" + Math.floor(g / d) + "N" + (g % d) + " ", el("span", { class: "ne-label", text: index.labels[g] })]);
      const out = [];
      if (jump) out.push(el("a", { href: "#L" + jump[1] + "N" + jump[2], text: "go to L" + jump[1] + "N" + jump[2] }));
      const byToken = index.tokens[q] || [];
      out.push(el("h3", { text: "Activating token “" + q + "”: " + byToken.length + " neurons" +
        (byToken.length === index.per_token ? " (those with the most such examples)" : "") }));
      byToken.forEach((g) => out.push(link(g)));
      const byLabel = [];
      for (let g = 0; g < index.labels.length && byLabel.length < 30; g++) {
        if (index.labels[g] && index.labels[g].toLowerCase().indexOf(q) >= 0) byLabel.push(g);
      }
      out.push(el("h3", { text: "Labels containing “" + q + "”" + (byLabel.length === 30 ? " (first 30)" : ": " + byLabel.length) }));
      byLabel.forEach((g) => out.push(link(g)));
      box.replaceChildren.apply(box, out);
      box.hidden = false;
    }).catch(function (err) {
      box.replaceChildren(el("p", { class: "ne-error", text: String(err.message || err) }));
      box.hidden = false;
    });
  }

  function start() {
    const o = NE.store.overview;
    document.querySelector(".ne-model").textContent = o.model + " · " + o.n_layers + " layers × " + o.d_mlp + " neurons";
    const input = document.getElementById("ne-query");
    let timer = null;
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(() => search(input.value), 150);
    });
    document.getElementById("ne-results").addEventListener("click", function (event) {
      if (event.target.closest("a")) event.currentTarget.hidden = true;
    });
    window.addEventListener("hashchange", route);
    route();
  }
})();
