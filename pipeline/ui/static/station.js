// The operator station's only script: live updates over one EventSource (/events) and the
// heat-map toggles. Parts of a page marked data-fragment="/fragments/..." data-on="alert ..."
// are fetched again (rendered by the server, escaped there) when an update of those kinds
// comes, at most every REFRESH_MS; frames only swap image sources.
"use strict";
(function () {
  const REFRESH_MS = 300;
  const RETRY_MS = 5000;
  const page = document.body.dataset.page;
  if (!page || page === "login" || page === "error") {
    return;
  }
  const conn = document.getElementById("conn");
  const timers = new Map();

  function setConn(text, cls) {
    if (conn) {
      conn.textContent = text;
      conn.className = "conn " + cls;
    }
  }

  function refresh(el) {
    fetch(el.dataset.fragment, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.status === 401) {
          window.location.reload(); // the login has expired: the page sends us to log in
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null) {
          el.innerHTML = html;
        }
      })
      .catch(function () {
        /* the server is away; the next update or reconnect refreshes again */
      });
  }

  function schedule(el) {
    if (timers.has(el)) {
      return;
    }
    timers.set(el, setTimeout(function () {
      timers.delete(el);
      refresh(el);
    }, REFRESH_MS));
  }

  function touched(kind) {
    document.querySelectorAll("[data-fragment]").forEach(function (el) {
      if ((el.dataset.on || "").split(" ").indexOf(kind) >= 0) {
        schedule(el);
      }
    });
  }

  function cardOf(camera) {
    const cards = document.querySelectorAll(".frame[data-camera]");
    for (let i = 0; i < cards.length; i++) {
      if (cards[i].dataset.camera === camera) {
        return cards[i];
      }
    }
    return null;
  }

  function overlayOn(camera) {
    return window.localStorage.getItem("overlay:" + camera) === "on";
  }

  function showFrame(card) {
    const camera = card.dataset.camera;
    const id = card.dataset.frame;
    const base = "/camera/" + encodeURIComponent(camera);
    const view = card.querySelector(".frame-view");
    const preview = card.querySelector("img.preview");
    const overlay = card.querySelector("img.overlay");
    const button = card.querySelector("[data-toggle-overlay]");
    const legend = card.querySelector(".legend");
    const hasMap = card.dataset.map === "yes";
    const on = hasMap && overlayOn(camera);
    if (id) {
      const placeholder = view.querySelector(".placeholder");
      if (placeholder) {
        placeholder.remove();
      }
      preview.hidden = false;
      // Without a preview the map itself is the picture (the overlay toggle then does nothing new).
      const src = card.dataset.preview === "yes" ? base + "/preview.jpg?f=" + id : base + "/overlay.png?f=" + id;
      if (preview.getAttribute("src") !== src) {
        preview.setAttribute("src", src);
      }
      if (on && card.dataset.preview === "yes") {
        const osrc = base + "/overlay.png?f=" + id;
        if (overlay.getAttribute("src") !== osrc) {
          overlay.setAttribute("src", osrc);
        }
      }
    }
    view.classList.toggle("show-overlay", on && card.dataset.preview === "yes");
    if (button) {
      button.disabled = !hasMap;
      button.setAttribute("aria-pressed", on ? "true" : "false");
      button.textContent = on ? "Heat map: on" : "Heat map: off";
    }
    if (legend) {
      legend.hidden = !on;
    }
  }

  function onFrame(d) {
    const card = cardOf(d.camera);
    if (!card) {
      return;
    }
    card.dataset.frame = String(d.frame_id);
    card.dataset.preview = d.preview ? "yes" : "no";
    card.dataset.map = d.map ? "yes" : "no";
    const fields = { frame_id: String(d.frame_id), max_score: d.max_score.toFixed(2), threshold: d.threshold.toFixed(2) };
    Object.keys(fields).forEach(function (k) {
      const el = card.querySelector('[data-field="' + k + '"]');
      if (el) {
        el.textContent = fields[k];
      }
    });
    showFrame(card);
  }

  document.addEventListener("click", function (e) {
    const button = e.target.closest("[data-toggle-overlay]");
    if (!button) {
      return;
    }
    const camera = button.dataset.toggleOverlay;
    window.localStorage.setItem("overlay:" + camera, overlayOn(camera) ? "off" : "on");
    const card = cardOf(camera);
    if (card) {
      showFrame(card);
    }
  });
  document.querySelectorAll(".frame[data-camera]").forEach(showFrame);

  function connect() {
    const es = new EventSource("/events");
    es.onopen = function () {
      setConn("live", "ok");
    };
    es.onerror = function () {
      if (es.readyState === EventSource.CLOSED) {
        // Refused (the login expired) or the server is gone: find out which, then retry.
        es.close();
        setConn("offline", "down");
        setTimeout(probe, RETRY_MS);
      } else {
        setConn("reconnecting…", "down");
      }
    };
    ["alert", "camera", "coil"].forEach(function (kind) {
      es.addEventListener(kind, function () {
        touched(kind);
      });
    });
    es.addEventListener("frame", function (e) {
      onFrame(JSON.parse(e.data));
      touched("frame");
    });
    es.addEventListener("lost", function () {
      // Updates were dropped for this browser: take every live part again.
      document.querySelectorAll("[data-fragment]").forEach(refresh);
    });
  }

  function probe() {
    fetch("/fragments/cameras", { credentials: "same-origin" })
      .then(function (r) {
        if (r.status === 401) {
          window.location.reload();
        } else {
          document.querySelectorAll("[data-fragment]").forEach(refresh);
          connect();
        }
      })
      .catch(function () {
        setTimeout(probe, RETRY_MS);
      });
  }

  connect();
})();
