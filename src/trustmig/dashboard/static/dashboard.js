// Live refresh without a build step: fetch the server-rendered state and swap it in.
// A refresh is skipped while keyboard focus is inside the live region, so it never steals it.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var stamp = document.getElementById("updated");
  if (!live) { return; }
  var interval = parseInt(live.getAttribute("data-interval"), 10) || 2000;
  function refresh() {
    if (live.contains(document.activeElement) && document.activeElement !== live) {
      return;
    }
    fetch("/fragment", { cache: "no-store", credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); })
      .then(function (html) {
        live.innerHTML = html;
        if (stamp) { stamp.textContent = "updated " + new Date().toLocaleTimeString(); }
      })
      .catch(function (e) { if (stamp) { stamp.textContent = "update failed: " + e.message; } });
  }
  window.setInterval(refresh, interval);
})();
