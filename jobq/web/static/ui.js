// jobq dashboard: live values by short polling (no inline script: the CSP allows only this file).
(function () {
  "use strict";
  var body = document.body;
  // Confirmation for destructive actions (the server checks the typed confirmation too).
  var forms = document.querySelectorAll("form[data-confirm]");
  for (var j = 0; j < forms.length; j++) {
    forms[j].addEventListener("submit", function (ev) {
      if (!window.confirm(this.getAttribute("data-confirm"))) { ev.preventDefault(); }
    });
  }
  var history = body.getAttribute("data-history");
  if (history) { charts(history); }
  var feed = document.querySelector("[data-feed]");
  if (feed) { followFeed(feed); }
  var live = body.getAttribute("data-live");
  if (!live) { return; }
  function update(data) {
    var cells = document.querySelectorAll("[data-k]");
    for (var i = 0; i < cells.length; i++) {
      var key = cells[i].getAttribute("data-k");
      if (Object.prototype.hasOwnProperty.call(data, key)) {
        var v = data[key];
        if (cells[i].hasAttribute("data-bar")) {
          cells[i].value = v === null ? 0 : Number(v);  // a <progress>: its value, not its text
          continue;
        }
        cells[i].textContent = v === null ? "" : String(v);
        if (cells[i].hasAttribute("data-state")) {
          cells[i].className = "state-" + String(v);
        }
      }
    }
    // Parts shown only while a value is there (the progress bar, the last error), or only while
    // it is not ("none reported"): the hidden attribute, since the CSP allows no inline style.
    toggle("data-show-if", data, false);
    toggle("data-hide-if", data, true);
  }
  function toggle(attr, data, invert) {
    var els = document.querySelectorAll("[" + attr + "]");
    for (var i = 0; i < els.length; i++) {
      var key = els[i].getAttribute(attr);
      if (!Object.prototype.hasOwnProperty.call(data, key)) { continue; }
      var present = data[key] !== null && data[key] !== "";
      els[i].hidden = invert ? present : !present;
    }
  }
  // The job page's events panel: each poll asks for the job's events after the last stream
  // entry read, and appends them (built with textContent: nothing from the data is parsed as HTML).
  var events = document.querySelector("[data-events]");
  function url() {
    if (!events) { return live; }
    return live + (live.indexOf("?") < 0 ? "?" : "&") + "after=" + encodeURIComponent(events.getAttribute("data-after"));
  }
  function addEvents(data) {
    if (!events || !data.events) { return; }
    for (var i = 0; i < data.events.length; i++) {
      var tr = document.createElement("tr"), cells = data.events[i];
      for (var j = 0; j < cells.length; j++) {
        var td = document.createElement("td");
        td.textContent = cells[j];
        if (j === 1) { td.className = "ev-" + cells[j]; }
        if (j === 2) { td.className = "num"; }
        tr.appendChild(td);
      }
      events.appendChild(tr);
    }
    events.setAttribute("data-after", data.events_after);
  }
  function poll() {
    fetch(url(), { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { update(data); addEvents(data); } })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { window.setTimeout(poll, 1000); });
  }
  window.setTimeout(poll, 1000);

  // A queue's event feed: newest first; each poll reads the events after the last one shown.
  function followFeed(tbody) {
    var src = tbody.getAttribute("data-src"), jobs = tbody.getAttribute("data-jobs");
    var keep = Number(tbody.getAttribute("data-keep")) || 30;
    function add(rows) {
      for (var i = 0; i < rows.length; i++) {
        var tr = document.createElement("tr"), cells = rows[i];
        for (var j = 0; j < cells.length; j++) {
          var td = document.createElement("td");
          if (j === 2) {  // the job id, a link to its page
            var a = document.createElement("a"), code = document.createElement("code");
            a.setAttribute("href", jobs + encodeURIComponent(cells[j]));
            code.textContent = cells[j];
            a.appendChild(code);
            td.appendChild(a);
          } else {
            td.textContent = cells[j];
          }
          if (j === 1) { td.className = "ev-" + cells[j]; }
          if (j === 4) { td.className = "num"; }
          tr.appendChild(td);
        }
        tbody.insertBefore(tr, tbody.firstChild);
      }
      while (tbody.children.length > keep) { tbody.removeChild(tbody.lastChild); }
    }
    function pollFeed() {
      fetch(src + "?after=" + encodeURIComponent(tbody.getAttribute("data-after")),
        { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (data) { add(data.events); tbody.setAttribute("data-after", data.events_after); }
        })
        .catch(function () { /* the next poll tries again */ })
        .then(function () { window.setTimeout(pollFeed, 1000); });
    }
    window.setTimeout(pollFeed, 1000);
  }

  // The overview's charts: inline SVG drawn from /api/history (no library, no inline style:
  // presentation attributes and classes only, which the CSP allows).
  function charts(url) {
    var W = 160, H = 32;
    var kinds = {
      rate: { series: ["ready_per_s", "finished_per_s"], unit: "/s", digits: 1 },
      wait: { series: ["wait_p50_ms", "wait_p95_ms"], unit: " ms", digits: 0 }
    };
    function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
    function draw(svg, cols, kind, t0, t1) {
      var NS = svg.namespaceURI;  // the SVG namespace, from the element the page rendered
      while (svg.firstChild) { svg.removeChild(svg.firstChild); }
      var spec = kinds[kind], top = 0, i, j;
      for (j = 0; j < spec.series.length; j++) {
        var vs = cols[spec.series[j]] || [];
        for (i = 0; i < vs.length; i++) { if (vs[i] !== null && vs[i] > top) { top = vs[i]; } }
      }
      top = top > 0 ? top * 1.1 : 1;
      var base = document.createElementNS(NS, "line");
      base.setAttribute("x1", "0"); base.setAttribute("x2", String(W));
      base.setAttribute("y1", String(H - 0.5)); base.setAttribute("y2", String(H - 0.5));
      base.setAttribute("class", "axis");
      svg.appendChild(base);
      var ts = cols.t_ms || [];
      for (j = 0; j < spec.series.length; j++) {
        var values = cols[spec.series[j]] || [], pts = [], segs = [];
        for (i = 0; i < ts.length; i++) {
          if (values[i] === null || values[i] === undefined) { if (pts.length) { segs.push(pts); pts = []; } continue; }
          var x = (ts[i] - t0) / (t1 - t0) * W, y = H - 1 - values[i] / top * (H - 2);
          pts.push(x.toFixed(1) + "," + y.toFixed(1));
        }
        if (pts.length) { segs.push(pts); }
        for (i = 0; i < segs.length; i++) {
          var line = document.createElementNS(NS, segs[i].length > 1 ? "polyline" : "circle");
          if (segs[i].length > 1) {
            line.setAttribute("points", segs[i].join(" "));
          } else {
            var xy = segs[i][0].split(",");
            line.setAttribute("cx", xy[0]); line.setAttribute("cy", xy[1]); line.setAttribute("r", "1.5");
          }
          line.setAttribute("class", "l" + (j + 1));
          svg.appendChild(line);
        }
      }
      var title = document.createElementNS(NS, "title");
      title.textContent = spec.series.join(" / ") + " over the last " + Math.round((t1 - t0) / 60000) +
        " min; top of the chart " + fmt(top, spec.digits) + spec.unit;
      svg.appendChild(title);
      svg.setAttribute("data-points", String(ts.length));
    }
    function update(data) {
      // The time axis: the last hour, or the time since the dashboard started sampling.
      var t1 = data.now_ms, t0 = t1, q0;
      for (q0 in data.queues) {
        if (Object.prototype.hasOwnProperty.call(data.queues, q0) && data.queues[q0].t_ms.length) {
          t0 = Math.min(t0, data.queues[q0].t_ms[0] - data.interval_s * 1000);
        }
      }
      t0 = Math.max(t0, t1 - data.window_s * 1000);
      if (t1 - t0 < 60000) { t0 = t1 - 60000; }  // at least a minute wide
      var svgs = document.querySelectorAll("svg[data-chart]");
      for (var i = 0; i < svgs.length; i++) {
        var q = svgs[i].getAttribute("data-q"), kind = svgs[i].getAttribute("data-chart");
        var cols = Object.prototype.hasOwnProperty.call(data.queues, q) ? data.queues[q] : { t_ms: [] };
        draw(svgs[i], cols, kind, t0, t1);
        var fig = svgs[i].nextElementSibling;
        if (fig) {
          var spec = kinds[kind], n = (cols.t_ms || []).length;
          fig.textContent = n ? fmt(cols[spec.series[0]][n - 1], spec.digits) + " / " +
            fmt(cols[spec.series[1]][n - 1], spec.digits) + spec.unit : "collecting…";
        }
      }
    }
    function pollHistory() {
      var every = 10000;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) { if (data) { every = Math.max(500, data.interval_s * 1000); update(data); } })
        .catch(function () { /* the next poll tries again */ })
        .then(function () { window.setTimeout(pollHistory, every); });
    }
    pollHistory();
  }
})();
