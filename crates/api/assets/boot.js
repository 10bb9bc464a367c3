// The only script served without the token. It moves the token from the
// URL fragment (which browsers never send) into an HttpOnly, SameSite=Strict
// cookie, removes it from the address bar, and opens the page.
(function () {
  var token = location.hash.slice(1);
  if (!token) { location.replace("/app"); return; }
  history.replaceState(null, "", "/");
  fetch("/session", { method: "POST", headers: { "X-Sandpen-Token": token } })
    .then(function (r) {
      if (r.ok) { location.replace("/app"); return; }
      document.getElementById("msg").textContent =
        "This link is not valid any more: open the address that `sandpen ui` printed.";
    });
})();
