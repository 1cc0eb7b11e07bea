// sslens report glue: links Bokeh's plots to the page's plain HTML controls. It reads the page
// payload (#sslens-data), never evaluates it, and writes user strings only as text (textContent,
// attribute values), never as markup.
(function () {
  "use strict";
  const payload = JSON.parse(document.getElementById("sslens-data").textContent);
  const blocks = payload.blocks || {};

  function el(tag, attributes, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
    for (const child of children || []) node.append(child);
    return node;
  }

  function fmt(value) {
    return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(3);
  }

  // Sortable tables: a header click sorts the rows by that column (numbers by their mean).
  for (const table of document.querySelectorAll("table.sortable")) {
    table.querySelectorAll("thead th").forEach(function (th, column) {
      th.querySelector("button.sort").addEventListener("click", function () {
        const ascending = th.getAttribute("aria-sort") !== "ascending";
        table.querySelectorAll("thead th").forEach((other) => other.removeAttribute("aria-sort"));
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        const body = table.tBodies[0];
        const rows = Array.from(body.rows);
        const key = function (row) {
          const cell = row.cells[column];
          const sort = cell.getAttribute("data-sort");
          return sort === null ? cell.textContent : sort === "" ? NaN : Number(sort);
        };
        rows.sort(function (a, b) {
          const x = key(a), y = key(b);
          if (typeof x === "number" && typeof y === "number") {
            if (Number.isNaN(x)) return 1;  // unmeasured last, either way
            if (Number.isNaN(y)) return -1;
            return ascending ? x - y : y - x;
          }
          return ascending ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
        });
        rows.forEach((row) => body.appendChild(row));
      });
    });
  }

  // Thumbnails by image name: the explorer's points, then the drill-downs' own.
  const thumbs = Object.assign({}, payload.thumbs);
  let pinItem = null;

  // Drill-down: a row's button opens the images behind it, sorted by their value.
  for (const button of document.querySelectorAll("button.drill")) {
    button.addEventListener("click", function () {
      const drill = payload.drills[Number(button.getAttribute("data-drill"))];
      const box = button.closest("div.table");
      let gallery = box.nextElementSibling;
      if (!gallery || !gallery.classList.contains("gallery")) {
        gallery = el("div", { class: "gallery" });
        box.after(gallery);
      }
      const items = drill.items.slice().sort((a, b) => (a[1] === null) - (b[1] === null) || a[1] - b[1]);
      const figures = items.map(function ([item, value]) {
        const image = el("img", { src: thumbs[item] || "", alt: "image " + item, "data-item": item });
        image.addEventListener("click", () => pinItem && pinItem(item));
        return el("figure", {}, [image, el("figcaption", {}, ["#" + item + ": " + fmt(value)])]);
      });
      const heading = el("p", {}, [drill.title + " — " + items.length + " images, by " + drill.value +
        " (lowest first); click one to pin it in the explorer"]);
      gallery.replaceChildren(heading, ...figures);
    });
  }

  function whenBokeh(ready) {
    let tries = 0;
    const timer = setInterval(function () {
      const documents = window.Bokeh && window.Bokeh.documents;
      if (documents && documents.length) {
        clearInterval(timer);
        ready(documents[0]);
      } else if (++tries > 400) {
        clearInterval(timer);
        console.warn("sslens: the interactive plots did not load; the static figures are unaffected");
      }
    }, 25);
  }

  whenBokeh(function (doc) {
    for (const [kind, data] of Object.entries(blocks)) {
      if (data.maps) explorer(doc, kind, data);
      else tradeoff(doc, kind, data);
    }
  });

  function explorer(doc, kind, data) {
    const root = document.querySelector('[data-explorer="' + CSS.escape(kind) + '"]');
    const source = doc.get_model_by_name(data.source);
    const columns = source.data;
    const rowOf = {};
    columns.item.forEach(function (item, row) {
      rowOf[item] = row;
      if (!(item in thumbs)) thumbs[item] = columns.thumb[row];
    });
    const panel = root.querySelector("div.panel");
    const legend = root.querySelector(".legend");

    function recolor(metric) {
      const all = [];
      if (metric) for (const model of data.models) for (const v of data.metrics[metric][model] || []) if (v !== null) all.push(v);
      const low = Math.min(...all), high = Math.max(...all);
      for (const model of data.models) {
        const key = "color_" + data.columns[model];
        const values = metric ? data.metrics[metric][model] : null;
        columns[key] = columns.label.map(function (label, row) {
          if (!metric) return data.labels[label];
          const v = values ? values[row] : null;
          if (v === null || !all.length) return data.missing;
          const t = high > low ? (v - low) / (high - low) : 0.5;
          return data.palette[Math.round(t * (data.palette.length - 1))];
        });
      }
      source.change.emit();
      legend.replaceChildren(metric
        ? el("span", {}, ["low " + fmt(low) + " → high " + fmt(high) + " (viridis, one scale for every model); grey: not measured. " + (data.notes[metric] || "")])
        : "");
    }
    root.querySelector("select.color-by").addEventListener("change", (event) => recolor(event.target.value));

    function thumb(item, size) {
      return el("img", { src: thumbs[item] || "", alt: "image " + item, width: size, height: size, "data-item": item });
    }

    function pin(row) {
      const item = columns.item[row];
      const header = el("div", { class: "pinned" }, [
        el("figure", {}, [thumb(item, 96), el("figcaption", {}, [columns.label[row] + " · image " + item])]),
      ]);
      const maps = data.maps[item];
      const table = el("table", { class: "maps" });
      const kinds = [];
      if (maps) for (const model of data.models) for (const [name] of maps[model] || []) if (!kinds.includes(name)) kinds.push(name);
      table.append(el("thead", {}, [el("tr", {}, [el("th", {}, ["model"]), el("th", {}, ["nearest neighbours"]),
        ...kinds.map((name) => el("th", {}, [name])), el("th", {}, ["metrics"])])]));
      const body = el("tbody");
      for (const model of data.models) {
        const byName = {};
        for (const entry of (maps && maps[model]) || []) byName[entry[0]] = entry;
        const neighbours = (data.neighbours[model] || [])[row] || [];
        const metrics = Object.keys(data.metrics).map((m) => m + " " + fmt((data.metrics[m][model] || [])[row]));
        body.append(el("tr", {}, [
          el("th", {}, [model]),
          el("td", {}, neighbours.map((j) => thumb(columns.item[j], 32))),
          ...kinds.map(function (name) {
            const entry = byName[name];
            if (!entry) return el("td", {}, ["–"]);
            return el("td", {}, [el("img", { src: entry[1], alt: model + " " + name,
              title: name + ": raw range " + fmt(entry[2]) + " to " + fmt(entry[3]) + " (one scale for all models)" })]);
          }),
          el("td", {}, [metrics.join(" · ") || "–"]),
        ]));
      }
      table.append(body);
      const note = maps ? "Maps on one colour scale per column across models (hover a map for its raw range)."
        : "Not an explained image: only the outlined points have maps.";
      panel.replaceChildren(header, el("p", {}, [note]), el("div", { class: "table" }, [table]));
    }

    function show(rows) {
      if (rows.length === 1) return pin(rows[0]);
      if (!rows.length) return;
      const shown = rows.slice(0, 200).map(function (row) {
        const image = thumb(columns.item[row], 32);
        image.addEventListener("click", () => select([row]));
        return image;
      });
      panel.replaceChildren(el("p", {}, [rows.length + " images selected, highlighted in every plot" +
        (rows.length > 200 ? " (the first 200 shown)" : "") + "; click one to pin it."]), el("div", { class: "gallery" }, shown));
    }

    function select(rows) {
      source.selected.indices = rows;  // triggers window.sslensPin through Bokeh's js_on_change
    }

    window.sslensPin = show;
    pinItem = function (item) {
      if (item in rowOf) {
        select([rowOf[item]]);
        root.scrollIntoView({ behavior: "smooth", block: "start" });
      }
    };
  }

  function tradeoff(doc, kind, data) {
    const root = document.querySelector('[data-tradeoff="' + CSS.escape(kind) + '"]');
    const source = doc.get_model_by_name(data.source);
    const axes = data.axes.map((name) => doc.get_model_by_name(name));
    const nan = (values) => values.map((v) => (v === null ? NaN : v));
    function update() {
      const x = root.querySelector("select.axis-x").value, y = root.querySelector("select.axis-y").value;
      for (const [axis, metric] of [["x", x], ["y", y]]) {
        const m = data.metrics[metric];
        source.data[axis] = nan(m.mean);
        source.data[axis + "_lo"] = nan(m.lo);
        source.data[axis + "_hi"] = nan(m.hi);
      }
      axes[0].axis_label = x;
      axes[1].axis_label = y;
      source.change.emit();
    }
    root.querySelectorAll("select").forEach((s) => s.addEventListener("change", update));
  }
})();
