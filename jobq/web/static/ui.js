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
  var live = body.getAttribute("data-live");
  if (!live) { return; }
  function update(data) {
    var cells = document.querySelectorAll("[data-k]");
    for (var i = 0; i < cells.length; i++) {
      var key = cells[i].getAttribute("data-k");
      if (Object.prototype.hasOwnProperty.call(data, key)) {
        var v = data[key];
        cells[i].textContent = v === null ? "" : String(v);
        if (cells[i].hasAttribute("data-state")) {
          cells[i].className = "state-" + String(v);
        }
      }
    }
  }
  function poll() {
    fetch(live, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) { if (data) { update(data); } })
      .catch(function () { /* the next poll tries again */ })
      .then(function () { window.setTimeout(poll, 1000); });
  }
  window.setTimeout(poll, 1000);
})();
