// The Hephaestus dashboard's script: step details on click, JSON checked
// before a form is sent, confirmations, and the self-refresh of an active
// instance's page. Pages work without it (forms are plain HTML).
"use strict";

(function () {
  var selectedStep = null;
  // The main part as last served: a refresh replaces the page only when
  // the server's HTML changed (the script's own changes, a shown step or
  // an open JSON node, are not changes).
  var lastServed = null;

  function showStep(step) {
    selectedStep = step;
    document.querySelectorAll(".step-detail").forEach(function (el) {
      el.hidden = el.getAttribute("data-step") !== step;
    });
    document.querySelectorAll("svg.dag g.node").forEach(function (el) {
      el.classList.toggle("selected", el.getAttribute("data-step") === step);
    });
  }

  function checkJson(form) {
    var ok = true;
    form.querySelectorAll("textarea[data-json]").forEach(function (area) {
      var text = area.value.trim();
      var message = form.querySelector(".json-error");
      if (text === "") {
        if (message) { message.hidden = true; }
        return;
      }
      try {
        JSON.parse(text);
        if (message) { message.hidden = true; }
        area.classList.remove("invalid");
      } catch (e) {
        ok = false;
        area.classList.add("invalid");
        if (message) {
          message.textContent = area.name + " is not valid JSON: " + e.message;
          message.hidden = false;
        }
      }
    });
    return ok;
  }

  // Clicks: a DAG node shows its step.
  document.addEventListener("click", function (event) {
    var node = event.target.closest && event.target.closest("svg.dag g.node");
    if (node && document.querySelector(".step-detail")) {
      showStep(node.getAttribute("data-step"));
    }
  });
  document.addEventListener("keydown", function (event) {
    var node = event.target.closest && event.target.closest("svg.dag g.node");
    if (node && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      showStep(node.getAttribute("data-step"));
    }
  });

  // Submits: JSON fields must parse; some forms ask first.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!checkJson(form)) {
      event.preventDefault();
      return;
    }
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
  document.addEventListener("input", function (event) {
    if (event.target.matches && event.target.matches("textarea[data-json]")) {
      checkJson(event.target.form);
    }
  });

  // An active instance's page refreshes its main part until the instance
  // ends, unless the operator is filling in a form.
  function busy(main) {
    var active = document.activeElement;
    if (active && main.contains(active) && active.matches("input, textarea, select")) {
      return true;
    }
    return Array.prototype.some.call(main.querySelectorAll("textarea, input:not([type=hidden])"), function (el) {
      return el.value !== el.defaultValue;
    });
  }

  function openDetails(main) {
    var open = [];
    main.querySelectorAll("details").forEach(function (d, i) { if (d.open) { open.push(i); } });
    return open;
  }

  function schedule() {
    var main = document.getElementById("main");
    if (!main) { return; }
    var ms = parseInt(main.getAttribute("data-refresh-ms") || "", 10);
    if (!(ms > 0)) { return; }
    window.setTimeout(function () {
      if (busy(main)) { schedule(); return; }
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (text) {
          var next = new DOMParser().parseFromString(text, "text/html").getElementById("main");
          if (!next) { throw new Error("no main"); }
          if (next.innerHTML === lastServed) {
            schedule();
            return;
          }
          lastServed = next.innerHTML;
          var wasOpen = openDetails(main);
          main.innerHTML = next.innerHTML;
          var refresh = next.getAttribute("data-refresh-ms");
          if (refresh) { main.setAttribute("data-refresh-ms", refresh); } else { main.removeAttribute("data-refresh-ms"); }
          var details = main.querySelectorAll("details");
          details.forEach(function (d) { d.open = false; });
          wasOpen.forEach(function (i) { if (details[i]) { details[i].open = true; } });
          if (selectedStep) { showStep(selectedStep); }
          main.setAttribute("data-refreshed", String(Date.now()));
          schedule();
        })
        .catch(function () {
          // The server or database is away: try again later.
          window.setTimeout(schedule, ms * 2);
        });
    }, ms);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var main = document.getElementById("main");
    if (main) {
      lastServed = new DOMParser().parseFromString(document.documentElement.outerHTML, "text/html").getElementById("main").innerHTML;
    }
    var first = document.querySelector(".step-detail");
    var problem = document.querySelector("svg.dag g.node.state-failed, svg.dag g.node.state-waiting");
    if (problem) {
      showStep(problem.getAttribute("data-step"));
    } else if (first) {
      showStep(first.getAttribute("data-step"));
    }
    schedule();
  });
})();
