/* collisions-book: filter and sort the atlas table (chapters/11_atlas), offline, no library.
   A table.atlas-table gets: click a header to sort (numbers by data-value, again to reverse);
   type in its input.atlas-filter to keep the rows whose text contains every word typed. */
(function () {
  function cellKey(td) {
    var v = td.getAttribute("data-value");
    return v === null ? td.textContent.toLowerCase() : parseFloat(v);
  }
  function setup(table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var texts = rows.map(function (r) { return r.textContent.toLowerCase(); });
    var count = document.querySelector('.atlas-count[data-table="' + table.id + '"]');
    var filter = document.querySelector('.atlas-filter[data-table="' + table.id + '"]');
    function show(n) { if (count) count.textContent = " " + n + " of " + rows.length + " architectures"; }
    show(rows.length);
    if (filter) {
      filter.addEventListener("input", function () {
        var words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
        var n = 0;
        rows.forEach(function (r, i) {
          var keep = words.every(function (w) { return texts[i].indexOf(w) >= 0; });
          r.style.display = keep ? "" : "none";
          if (keep) n++;
        });
        show(n);
      });
    }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.style.cursor = "pointer";
      th.title = "sort";
      th.addEventListener("click", function () {
        var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
        Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("data-dir"); });
        th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
        var order = rows.map(function (r, i) { return i; });
        order.sort(function (a, b) {
          var x = cellKey(rows[a].cells[col]), y = cellKey(rows[b].cells[col]);
          if (typeof x !== typeof y) return typeof x === "number" ? -dir : dir;
          return x < y ? -dir : x > y ? dir : a - b;
        });
        order.forEach(function (i) { body.appendChild(rows[i]); });
      });
    });
  }
  function init() { document.querySelectorAll("table.atlas-table").forEach(setup); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
