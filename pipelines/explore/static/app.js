// curate explore: renders a catalog's pages from the data files under data/ (no framework, no server).
// Each data file is a script calling curateData(key, json): browsers load scripts from file:// URLs
// but refuse fetch() there. Image ids are strings: they are 64-bit and JS numbers hold 53 bits.
"use strict";

const cache = new Map();
const waiting = new Map();
let summary = null;

window.curateData = function (key, value) {
  cache.set(key, value);
  for (const w of waiting.get(key) || []) w.resolve(value);
  waiting.delete(key);
};

function load(key) {
  if (cache.has(key)) return Promise.resolve(cache.get(key));
  return new Promise((resolve, reject) => {
    const first = !waiting.has(key);
    if (first) waiting.set(key, []);
    waiting.get(key).push({ resolve, reject });
    if (!first) return;
    const script = document.createElement("script");
    script.src = "data/" + key + ".js";
    script.onload = () => script.remove();
    script.onerror = () => {
      script.remove();
      for (const w of waiting.get(key) || []) w.reject(new Error("missing data file data/" + key + ".js"));
      waiting.delete(key);
    };
    document.head.appendChild(script);
  });
}

// --- small DOM helpers: text goes in as text, never as HTML (URIs come from the crawl) ---
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}
const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
const pct = (n, total) => (total ? (100 * n / total).toFixed(1) + "%" : "–");
const nodeName = (level, id) => "L" + level + " · " + id;
const hasPage = (level) => level >= summary.deepest_level && level <= summary.n_levels;
function nodeLink(level, id) {
  return hasPage(level) ? el("a", { href: "#/node/" + level + "/" + id, class: "node-link" }, nodeName(level, id))
    : el("span", {}, nodeName(level, id));
}

function thumb(img, extraClass) {
  const parts = (img.p || []).map((i) => summary.parts[i].name);
  const title = img.i + "\n" + (img.u || "") + (parts.length ? "\ncurated: " + parts.join(", ") : "");
  const span = el("span", {
    class: "thumb" + (parts.length ? " curated" : "") + (img.s ? "" : " none") + (extraClass ? " " + extraClass : ""),
    "data-id": img.i, title, role: "link",
    onclick: () => { location.hash = "#/search/" + encodeURIComponent(img.i); },
  });
  if (img.s) {
    const size = summary.thumb.size, cols = summary.thumb.cols;
    span.style.backgroundImage = "url('thumbs/" + img.s + ".jpg')";
    span.style.backgroundPosition = -(img.c % cols) * size + "px " + -Math.floor(img.c / cols) * size + "px";
  }
  return span;
}
const strip = (imgs, cls) => el("div", { class: cls || "strip" }, imgs.map((img) => thumb(img)));
function figure(img, caption, cls) {
  return el("figure", { class: cls }, img ? thumb(img) : el("span", { class: "thumb none" }),
    el("figcaption", {}, caption));
}

// --- the tree: a table of nodes whose rows expand in place ---
function treeTable() {
  return el("table", { class: "tree" }, el("thead", {}, el("tr", {},
    el("th", {}, "cluster"), el("th", { class: "num" }, "pool"),
    summary.parts.map((p) => el("th", { class: "num", title: "curated images and share of the part" }, p.name)),
    el("th", { class: "num" }, "children"), el("th", {}, "closest to the centroid"))), el("tbody"));
}

function nodeRow(level, child, depth) {
  const toggle = el("button", { class: "toggle", title: "show children" }, child.n_children && hasPage(level) ? "▸" : "");
  const row = el("tr", { class: "node-row", "data-level": level, "data-id": child.id, "data-depth": depth },
    el("td", {}, el("span", { class: "indent", style: "width:" + depth * 18 + "px" }), toggle, nodeLink(level, child.id)),
    el("td", { class: "num pool" }, fmt(child.pool)),
    summary.parts.map((p, i) => el("td", { class: "num curated-count", "data-part": p.name },
      fmt(child.curated[i]) + " (" + pct(child.curated[i], p.clustered) + ")")),
    el("td", { class: "num children-count" }, fmt(child.n_children)),
    el("td", {}, strip(child.thumbs)));
  if (child.n_children && hasPage(level)) {
    toggle.addEventListener("click", () => toggleRow(row, level, child.id, depth, toggle).catch(fail));
  }
  return row;
}

async function toggleRow(row, level, id, depth, toggle) {
  if (row.dataset.open === "1") {
    let next = row.nextElementSibling;
    while (next && Number(next.dataset.depth) > depth) { const n = next.nextElementSibling; next.remove(); next = n; }
    row.dataset.open = "0";
    toggle.textContent = "▸";
    return;
  }
  const node = await load("nodes/l" + level + "/" + id);
  let after = row;
  for (const child of node.children) {
    const r = nodeRow(level - 1, child, depth + 1);
    after.after(r);
    after = r;
  }
  row.dataset.open = "1";
  toggle.textContent = "▾";
}

function fillTree(table, level, children, total) {
  const body = table.querySelector("tbody");
  for (const child of children) body.appendChild(nodeRow(level, child, 0));
  const more = total - children.length;
  return more > 0 ? el("p", { class: "note" }, fmt(more) + " smaller clusters not listed (max_children)") : null;
}

function showTree(main) {
  const s = summary;
  const poolImages = s.levels.length ? s.levels[0].images : 0;
  main.append(el("h1", {}, "Cluster tree"),
    el("div", { class: "stats" },
      el("span", { class: "stat" }, "clustered images ", el("b", { id: "clustered-total" }, fmt(poolImages))),
      s.levels.map((l) => el("span", { class: "stat" }, "level " + l.level + ": ", el("b", {}, fmt(l.clusters)), " clusters")),
      s.parts.map((p) => el("span", { class: "stat" }, "curated/" + p.name + ": ", el("b", {}, fmt(p.images)), " images"))),
    el("p", { class: "note" }, "Top level (" + s.n_levels + "): " + fmt(s.n_top) + " clusters, largest first. "
      + "▸ opens a cluster's children here; its name opens its page. Curated columns: images and share of the part."));
  const table = treeTable();
  main.append(table);
  const note = fillTree(table, s.n_levels, s.top, s.n_top);
  if (note) main.append(note);
}

// --- a cluster page ---
async function showNode(main, level, id) {
  const n = await load("nodes/l" + level + "/" + id);
  const crumbs = [el("a", { href: "#/" }, "top")];
  n.path.forEach((ancestor, i) => crumbs.push(" › ", nodeLink(summary.n_levels - i, ancestor)));
  main.append(el("div", { class: "breadcrumb" }, crumbs),
    el("h1", {}, "Cluster " + nodeName(level, id)),
    el("div", { class: "stats" },
      el("span", { class: "stat" }, "pool ", el("b", { id: "node-pool" }, fmt(n.pool))),
      summary.parts.map((p, i) => el("span", { class: "stat" }, "curated/" + p.name + " ",
        el("b", { class: "node-curated", "data-part": p.name }, fmt(n.curated[i])),
        " (" + pct(n.curated[i], p.clustered) + " of the part, " + pct(n.curated[i], n.pool) + " of the cluster)")),
      el("span", { class: "stat" }, "duplicates removed ", el("b", { id: "node-dups" }, fmt(n.dups))),
      el("span", { class: "stat" }, "children ", el("b", {}, fmt(n.n_children)))));
  main.append(el("h2", {}, "Closest to the centroid"), strip(n.strip, "strip central"),
    el("h2", {}, "Random members"), n.random.length ? strip(n.random, "strip random") : el("p", { class: "note" }, "none besides the above"));
  if (n.n_children) {
    const table = treeTable();
    main.append(el("h2", {}, "Children (level " + (level - 1) + "), largest first"), table);
    const note = fillTree(table, level - 1, n.children, n.n_children);
    if (note) main.append(note);
  }
  const curated = n.members.filter((m) => m.p.length), other = n.members.filter((m) => !m.p.length);
  main.append(el("h2", {}, "Members"),
    el("p", { class: "legend note" }, el("span", {}, el("span", { class: "sw" }), "curated (in a part)"),
      el("span", {}, "a random sample of each kind, at most " + summary.config.members)),
    el("div", { class: "group" }, el("div", { class: "group-head" }, "curated: " + curated.length + " shown"), strip(curated, "grid members-curated")),
    el("div", { class: "group" }, el("div", { class: "group-head" }, "not curated: " + other.length + " shown"), strip(other, "grid members-other")));
  main.append(el("h2", {}, "Duplicates removed in favour of its members"));
  if (!n.duplicates.length) main.append(el("p", { class: "note" }, "none"));
  for (const d of n.duplicates) {
    main.append(el("div", { class: "group node-dup" }, el("div", { class: "strip" },
      figure(d.kept, "kept", "kept"), figure(d.removed, d.reason + (d.similarity === null ? "" : " " + d.similarity.toFixed(3)), "removed"))));
  }
  main.append(el("h2", {}, "Neighbours at level " + level));
  main.append(n.neighbours.length ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "cluster"), el("th", { class: "num" }, "pool"), el("th", { class: "num" }, "centroid cosine"))),
    el("tbody", {}, n.neighbours.map((b) => el("tr", { class: "neighbour" }, el("td", {}, nodeLink(level, b.id)),
      el("td", { class: "num" }, fmt(b.pool)), el("td", { class: "num" }, b.similarity.toFixed(3)))))) : el("p", { class: "note" }, "none"));
}

// --- duplicates ---
async function showDuplicates(main, page) {
  const d = summary.duplicates;
  main.append(el("h1", {}, "Duplicates"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "reason"), el("th", { class: "num" }, "removed"), el("th", { class: "num" }, "groups"))),
      el("tbody", {}, d.totals.map((t) => el("tr", { class: "dup-total", "data-reason": t.reason }, el("td", {}, t.reason),
        el("td", { class: "num removed" }, fmt(t.removed)), el("td", { class: "num" }, fmt(t.groups)))))));
  if (!d.pages) { main.append(el("p", { class: "note" }, "no duplicates in this catalog")); return; }
  const pager = el("div", { class: "pager" }, "pages: ", Array.from({ length: d.pages }, (_, p) =>
    p === page ? el("span", {}, String(p + 1)) : el("a", { href: "#/duplicates/" + p }, String(p + 1))));
  main.append(el("p", { class: "note" }, "Each group: the kept image first, then the removed ones with their similarity. "
    + fmt(d.groups) + " largest groups listed."), pager);
  const groups = await load("dups/" + page);
  for (const g of groups) {
    const kept = g.kept ? figure(g.kept, "kept", "kept") : figure(null, "no kept image", "kept");
    main.append(el("div", { class: "group dup-group", "data-kept": g.kept ? g.kept.i : "", "data-reason": g.reason },
      el("div", { class: "group-head" }, g.reason + ": " + fmt(g.n) + " removed"),
      el("div", { class: "strip" }, kept, g.removed.map((r) =>
        figure(r.img, r.similarity === null ? "–" : r.similarity.toFixed(3), "removed")))));
  }
}

// --- retrieval ---
async function showRetrieval(main, index) {
  main.append(el("h1", {}, "Retrieval"));
  if (!summary.seeds.length) { main.append(el("p", { class: "note" }, "no seed has been retrieved for (curate retrieve)")); return; }
  main.append(el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "seed"), el("th", { class: "num" }, "retrieved"), el("th", { class: "num" }, "seed images with results"))),
    el("tbody", {}, summary.seeds.map((s) => el("tr", { class: "seed-row" }, el("td", {}, el("a", { href: "#/retrieval/" + s.page }, s.seed)),
      el("td", { class: "num" }, fmt(s.retrieved)), el("td", { class: "num" }, fmt(s.seed_images)))))));
  if (index === null) return;
  const seed = summary.seeds[index];
  main.append(el("h2", {}, "Seed " + seed.seed + ": seed image first, then what it retrieved (rank, cosine)"));
  for (const g of await load("retrieval/" + index)) {
    const head = g.seed ? figure(g.seed, "seed", "kept")
      : g.cluster === null ? figure(null, "seed image (no URI)", "kept")
        : el("div", { class: "group-head" }, "cluster mode, from pool cluster ", nodeLink(1, g.cluster));
    main.append(el("div", { class: "group retrieval-group" }, el("div", { class: "group-head" }, fmt(g.n) + " retrieved"),
      el("div", { class: "strip" }, head, g.retrieved.map((r) =>
        figure(r.img, "#" + r.rank + (r.similarity === null ? "" : " " + r.similarity.toFixed(3)))))));
  }
}

// --- errors and runs ---
async function showErrors(main) {
  const e = await load("errors");
  main.append(el("h1", {}, "Errors"), el("p", { class: "note" }, fmt(summary.errors) + " files could not be used"),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "stage"), el("th", {}, "reason"), el("th", { class: "num" }, "files"))),
      el("tbody", {}, e.counts.map((c) => el("tr", { class: "error-count", "data-reason": c.reason }, el("td", {}, c.stage),
        el("td", {}, c.reason), el("td", { class: "num" }, fmt(c.n)))))));
  for (const group of e.examples) {
    main.append(el("h2", {}, group.reason), el("table", {}, el("tbody", {}, group.examples.map((x) =>
      el("tr", {}, el("td", { class: "mono" }, x.uri), el("td", {}, x.stage), el("td", { class: "mono" }, x.message || ""))))));
  }
}

async function showRuns(main) {
  const runs = await load("runs");
  main.append(el("h1", {}, "Runs"), el("p", { class: "note" }, runs.length + " stage runs (manifests), oldest first"));
  if (!runs.length) return;
  const t0 = Date.parse(runs[0].started);
  const t1 = Math.max(...runs.map((r) => Date.parse(r.started) + 1000 * (r.wall_seconds || 0)));
  const span = Math.max(t1 - t0, 1);
  const rows = (r, k) => (r.rows && r.rows[k] !== undefined ? fmt(r.rows[k]) : "–");
  main.append(el("table", {}, el("thead", {}, el("tr", {}, ["stage", "started", "timeline", "wall s", "cpu s", "peak MiB", "in", "out", "errored", "status"]
    .map((h) => el("th", {}, h)))), el("tbody", {}, runs.map((r) => {
    const left = 100 * (Date.parse(r.started) - t0) / span, width = 100 * 1000 * (r.wall_seconds || 0) / span;
    return el("tr", { class: "run" }, el("td", {}, r.stage), el("td", { class: "mono" }, r.started),
      el("td", { class: "bar-cell" }, el("div", { class: "bar" }, el("span", { style: "left:" + left + "%;width:" + width + "%" }))),
      el("td", { class: "num" }, fmt(r.wall_seconds)), el("td", { class: "num" }, fmt(r.cpu_seconds)),
      el("td", { class: "num" }, fmt(r.peak_memory_mb)), el("td", { class: "num" }, rows(r, "in")),
      el("td", { class: "num" }, rows(r, "out")), el("td", { class: "num" }, rows(r, "errored")), el("td", {}, r.status));
  }))));
}

// --- search: by id (one shard, found with BigInt) or by URI substring (shards scanned in batches) ---
const SCAN_BATCH = 6, MAX_RESULTS = 50;

function shardOf(id) {
  const n = BigInt(summary.search.shards);
  return Number(((BigInt(id) % n) + n) % n);
}

function resultRow(row) {
  const c = Object.fromEntries(summary.search.columns.map((name, i) => [name, row[i]]));
  const img = { i: c.id, u: c.uri, s: c.sheet, c: c.cell, p: c.parts || [] };
  const where = c.clusters ? c.clusters.map((id, i) => nodeLink(i + 1, id)).reverse() : [];
  const facts = [el("div", { class: "mono result-id" }, c.id), el("div", { class: "mono" }, c.uri), el("div", {}, "status: " + c.status)];
  if (where.length) facts.push(el("div", {}, "clusters: ", where.flatMap((w, i) => (i ? [" › ", w] : [w]))));
  if (img.p.length) facts.push(el("div", {}, "curated: " + img.p.map((i) => summary.parts[i].name).join(", ")));
  if (c.dup_reason) facts.push(el("div", {}, "removed (" + c.dup_reason + ")" + (c.kept_id !== "-1" ? ", kept: " : ""),
    c.kept_id !== "-1" ? el("a", { href: "#/search/" + c.kept_id }, c.kept_id) : null));
  return el("div", { class: "result search-result", "data-id": c.id }, thumb(img), el("div", {}, facts));
}

async function showSearch(main, query) {
  const input = document.getElementById("search-input");
  input.value = query;
  main.append(el("h1", {}, "Search"));
  const list = el("div", { id: "search-results" }), status = el("p", { class: "note search-status" });
  main.append(status, list);
  if (/^-?\d+$/.test(query)) {
    const shard = await load("search/" + shardOf(query));
    const hit = shard.find((row) => row[0] === query);
    if (hit) { list.append(resultRow(hit)); status.textContent = "image " + query; return; }
  }
  const needle = query.toLowerCase();
  let next = 0, found = 0;
  async function scan() {
    const stop = Math.min(next + SCAN_BATCH, summary.search.shards);
    for (; next < stop && found < MAX_RESULTS; next++) {
      for (const row of await load("search/" + next)) {
        if (found < MAX_RESULTS && (row[0] === query || (row[1] || "").toLowerCase().includes(needle))) {
          list.append(resultRow(row));
          found++;
        }
      }
    }
    status.textContent = found + " found in " + fmt(next) + " of "
      + fmt(summary.search.shards) + " index shards (" + fmt(summary.search.rows) + " pool images)";
    if (next < summary.search.shards && found < MAX_RESULTS) {
      status.append(" ", el("button", { onclick: () => { status.textContent = "searching…"; scan().catch(fail); } }, "search further"));
    }
  }
  await scan();
}

// --- routing ---
function fail(err) {
  const main = document.getElementById("main");
  main.append(el("p", { class: "error" }, String(err && err.message ? err.message : err)));
  console.error(err);
}

async function route() {
  const main = document.getElementById("main");
  main.replaceChildren();
  main.removeAttribute("data-ready");
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const [page, a, b] = parts;
  if (page === "node") await showNode(main, Number(a), b);
  else if (page === "duplicates") await showDuplicates(main, Number(a || 0));
  else if (page === "retrieval") await showRetrieval(main, a === undefined || a === "" ? null : Number(a));
  else if (page === "errors") await showErrors(main);
  else if (page === "runs") await showRuns(main);
  else if (page === "search") await showSearch(main, parts.slice(1).join("/"));
  else showTree(main);
  main.setAttribute("data-ready", location.hash || "#/");
  window.scrollTo(0, 0);
}

async function start() {
  summary = await load("summary");
  document.documentElement.style.setProperty("--thumb", summary.thumb.size + "px");
  document.getElementById("footer").textContent = "catalog " + summary.catalog + " · built " + summary.built;
  document.getElementById("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = document.getElementById("search-input").value.trim();
    if (q) location.hash = "#/search/" + encodeURIComponent(q);
  });
  window.addEventListener("hashchange", () => route().catch(fail));
  await route();
}

start().catch(fail);
