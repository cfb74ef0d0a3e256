/* streamcoord.js: follow a task's stream from a page. Dependency-free; a classic script that
 * sets window.streamcoord (load it with {% load streamcoord %}{% streamcoord_js %}).
 *
 *   const watch = streamcoord.follow(url, {
 *     events: { progress(data, msg) {}, start(data, msg) {} },  // per event type
 *     onEvent(type, data, msg) {},     // every task event, before its typed handler
 *     onReset(data, msg) {},           // the gateway's `reset` (data.reason says why)
 *     onEnd(type, data, msg) {},       // `complete`, `error` or `cancelled`; already closed
 *     onConnectionError(ev) {},        // the connection's trouble, never a task's `error`
 *     onOpen(ev) {},
 *     withCredentials: false,
 *   });
 *   watch.close(); watch.source; watch.lastEventId; watch.closed;
 *
 * What the gateway sends (README, "HTTP API"): events with `id: <epoch>-<seq>`, `event: <type>`
 * and JSON data; `reset` without an id; comments (heartbeats), which EventSource ignores. The
 * browser reconnects by itself with Last-Event-ID and gets exactly what it missed.
 *
 * Many tasks on one connection: give follow() a URL of `GET /streams` ({% streams_url tasks %}:
 * `/streams?task=app.Model:pk&task=...&token=...`). A page with one EventSource per task holds
 * one of the browser's six HTTP/1.1 connections per origin each; with this it holds one.
 *
 *   const watch = streamcoord.follow(streamsUrl, {
 *     // The options above, called for every task's events and resets; the data names the
 *     // task (`_app`, `_model`, `_task_id`): streamcoord.taskOf(data) is "app.Model:pk".
 *     // onEnd(type, data, msg) comes once per task; the connection goes on for the others.
 *     onAllEnded() {},                 // every task followed has ended; already closed
 *   });
 *   watch.tasks;       // the labels followed ("app.Model:pk"), in the URL's order
 *   watch.ended;       // the labels of those that have ended
 *   watch.add(["examples.ProgressTask:9"], tokenOrStreamsUrl);
 *   watch.remove(["examples.ProgressTask:7"]);
 *   watch.lastEventId; // the connection's composite id: `<tag>-<epoch>-<seq>` per task, by `.`
 *   watch.source;      // the current EventSource (a new one after add() or remove())
 *   watch.close(); watch.closed;
 *   streamcoord.taskEventId(msg.lastEventId, streamcoord.taskOf(data))  // "<epoch>-<seq>"
 *
 * add() and remove() change the set: the old EventSource is closed first, then a new one opened
 * on the new set, told where each task kept was (`last_event_id=`, the old id without the parts
 * of tasks no longer followed, which the gateway would refuse): no event of a task kept is lost
 * or shown twice across the switch. Tasks that ended are dropped from the set at that moment
 * (and not followed again if named in add()).
 * add() needs a token covering every task followed after it (its second argument: the token,
 * or a streams URL whose `token` it takes, from the page's server); without one the current
 * token is kept, which covers what remove() leaves. streamcoord.tag(label) is a task's part
 * name in composite ids (streamcoord.ids.task_tag).
 */
(function (global) {
  "use strict";

  // The events that end a run (streamcoord.taskstate.TERMINAL_EVENTS): the gateway ends the
  // response after one, and the helper closes the EventSource so that it never reconnects.
  const TERMINAL_EVENTS = ["complete", "error", "cancelled"];
  // What the gateway sends when history the page has, or lacks, is gone
  // (streamcoord.resets.RESET_EVENT); it is no task event.
  const RESET_EVENT = "reset";
  // EventSource hands a named event only to listeners of that name: there is no "any type"
  // listener. These are listened to always: the example tasks' and the worker's own types
  // (`attempt`: a re-run after a lost worker), and `message` (an event without a type).
  const COMMON_EVENTS = ["start", "progress", "attempt", "message"];
  // The reset reasons after which the stream starts over from its beginning: what the page
  // showed is to be cleared (`trimmed` and `expired` go on after a gap instead).
  const RESTART_REASONS = ["epoch", "position", "lost"];

  function follow(url, options) {
    if (isStreamsUrl(url)) return followMany(url, options || {});
    const opts = options || {};
    const typed = opts.events || {};
    const source = new EventSource(url, { withCredentials: Boolean(opts.withCredentials) });
    const watch = {
      source: source,
      lastEventId: "",
      close: function () { source.close(); },
      get closed() { return source.readyState === EventSource.CLOSED; },
    };

    function call(handler, args) {
      if (typeof handler === "function") handler.apply(watch, args);
    }

    function taskEvent(type, msg) {
      const data = JSON.parse(msg.data);
      if (msg.lastEventId) watch.lastEventId = msg.lastEventId;
      const ends = TERMINAL_EVENTS.indexOf(type) >= 0;
      // Closed before any handler runs: the response ends after a terminal event, and an open
      // EventSource would reconnect (and get 204) as soon as it does.
      if (ends) source.close();
      call(opts.onEvent, [type, data, msg]);
      call(typed[type], [data, msg]);
      if (ends) call(opts.onEnd, [type, data, msg]);
    }

    const types = new Set(COMMON_EVENTS.concat(TERMINAL_EVENTS, Object.keys(typed), opts.types || []));
    types.delete(RESET_EVENT);
    types.delete("error"); // below: the name is shared with the connection's errors
    types.forEach(function (type) {
      source.addEventListener(type, function (msg) { taskEvent(type, msg); });
    });

    source.addEventListener(RESET_EVENT, function (msg) {
      // A reset has no id: EventSource keeps the last one it saw, and so does watch.lastEventId.
      call(opts.onReset, [JSON.parse(msg.data), msg]);
    });

    // "error" names two things: a task's terminal `error` event, a MessageEvent that carries
    // data, and EventSource's own connection error, a plain Event without data. While the
    // browser reconnects by itself, readyState is CONNECTING; a response that is not a 200
    // event stream (401: the token expired; 204: the task had already ended) fails the
    // connection for good, and readyState is CLOSED (watch.closed).
    source.addEventListener("error", function (ev) {
      if (typeof ev.data === "string") taskEvent("error", ev);
      else call(opts.onConnectionError, [ev]);
    });
    source.addEventListener("open", function (ev) { call(opts.onOpen, [ev]); });
    return watch;
  }

  // -- many tasks on one connection (GET /streams) ---------------------------------------------

  // Composite ids (streamcoord.ids): a part per task, `<tag>-<epoch>-<seq>`, joined by ".".
  const PART_SEPARATOR = ".";
  const TAG_CHARS = 7;

  function baseUrl() {
    return global.location ? global.location.href : "http://localhost/";
  }

  function isStreamsUrl(url) {
    let path;
    try {
      path = new URL(url, baseUrl()).pathname;
    } catch (e) {
      return false; // not a URL here: EventSource says so, as it always did
    }
    return /\/streams\/?$/.test(path);
  }

  // FNV-1a (32 bits) of the label's UTF-8 bytes, in base 36, zero-padded to 7 characters: the
  // gateway's name for the task in composite ids. Math.imul multiplies modulo 2^32 as C would.
  function tag(label) {
    let hash = 0x811c9dc5;
    new TextEncoder().encode(label).forEach(function (byte) {
      hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
    });
    return hash.toString(36).padStart(TAG_CHARS, "0");
  }

  // The task an event (or a reset) belongs to, as the gateway's data names it.
  function taskOf(data) {
    return data._app + "." + data._model + ":" + data._task_id;
  }

  // The parts of a composite id, by tag: { tag: "<epoch>-<seq>" }.
  function parts(compositeId) {
    const found = {};
    (compositeId || "").split(PART_SEPARATOR).forEach(function (part) {
      const at = part.indexOf("-");
      if (at === TAG_CHARS) found[part.slice(0, at)] = part.slice(at + 1);
    });
    return found;
  }

  // One task's last event in a connection's composite id, "<epoch>-<seq>" ("" if none yet).
  function taskEventId(compositeId, label) {
    return parts(compositeId)[tag(label)] || "";
  }

  // The composite id with only the parts of the tasks `labels`: where a new connection
  // following those tasks starts (the gateway refuses an id naming a task it does not follow).
  function keepParts(compositeId, labels) {
    const kept = new Set(labels.map(tag));
    return (compositeId || "").split(PART_SEPARATOR).filter(function (part) {
      return part && kept.has(part.slice(0, TAG_CHARS));
    }).join(PART_SEPARATOR);
  }

  // The token of a streams URL, or the argument itself when it is no URL (a token: it has
  // neither "/" nor "?").
  function tokenFrom(tokenOrUrl) {
    if (!/[/?]/.test(tokenOrUrl)) return tokenOrUrl;
    return new URL(tokenOrUrl, baseUrl()).searchParams.get("token");
  }

  function followMany(url, opts) {
    const typed = opts.events || {};
    const first = new URL(url, baseUrl());
    // What stays the same across add() and remove(): the gateway's address, and extra
    // parameters a page put in the URL; task=, token= and last_event_id= are the watch's.
    const base = new URL(first.href);
    ["task", "token", "last_event_id"].forEach(function (name) { base.searchParams.delete(name); });
    let tasks = Array.from(new Set(first.searchParams.getAll("task")));
    let token = first.searchParams.get("token");
    let ended = new Set();
    let source = null;

    const watch = {
      lastEventId: first.searchParams.get("last_event_id") || "",
      get source() { return source; },
      get tasks() { return tasks.slice(); },
      get ended() { return Array.from(ended); },
      get closed() { return source === null || source.readyState === EventSource.CLOSED; },
      close: function () { if (source) source.close(); },
      add: function (labels, tokenOrUrl) {
        if (tokenOrUrl) token = tokenFrom(tokenOrUrl);
        switchTo(tasks.concat(labels));
      },
      remove: function (labels) {
        const dropped = new Set(labels);
        switchTo(tasks.filter(function (label) { return !dropped.has(label); }));
      },
    };

    function call(handler, args) {
      if (typeof handler === "function") handler.apply(watch, args);
    }

    function urlOf(labels, position) {
      const next = new URL(base.href);
      labels.forEach(function (label) { next.searchParams.append("task", label); });
      if (token) next.searchParams.set("token", token);
      if (position) next.searchParams.set("last_event_id", position);
      return next.href;
    }

    // Close first, then open: an event the old connection received but did not dispatch yet is
    // never dispatched once it is closed, so watch.lastEventId is exactly what the page was
    // handed, and the new connection starts each task right after it.
    function switchTo(labels) {
      if (source) source.close();
      tasks = Array.from(new Set(labels)).filter(function (label) { return !ended.has(label); });
      ended = new Set();
      watch.lastEventId = keepParts(watch.lastEventId, tasks);
      source = null;
      if (tasks.length) open(urlOf(tasks, watch.lastEventId));
    }

    function open(streamUrl) {
      const mine = new EventSource(streamUrl, { withCredentials: Boolean(opts.withCredentials) });
      source = mine;

      function taskEvent(type, msg) {
        if (mine !== source) return; // a closed connection's (never dispatched, per the spec)
        const data = JSON.parse(msg.data);
        if (msg.lastEventId) watch.lastEventId = msg.lastEventId;
        const ends = TERMINAL_EVENTS.indexOf(type) >= 0;
        if (ends) ended.add(taskOf(data));
        const allEnded = tasks.every(function (label) { return ended.has(label); });
        // As for one task: closed before any handler runs, once the response is about to end.
        if (allEnded) mine.close();
        call(opts.onEvent, [type, data, msg]);
        call(typed[type], [data, msg]);
        if (ends) call(opts.onEnd, [type, data, msg]);
        if (allEnded) call(opts.onAllEnded, []);
      }

      const types = new Set(COMMON_EVENTS.concat(TERMINAL_EVENTS, Object.keys(typed), opts.types || []));
      types.delete(RESET_EVENT);
      types.delete("error");
      types.forEach(function (type) {
        mine.addEventListener(type, function (msg) { taskEvent(type, msg); });
      });
      mine.addEventListener(RESET_EVENT, function (msg) {
        // No id, and the composite id is kept: the gateway resets that task again if its part
        // still names history that is gone; the other tasks go on.
        if (mine === source) call(opts.onReset, [JSON.parse(msg.data), msg]);
      });
      mine.addEventListener("error", function (ev) {
        if (mine !== source) return;
        if (typeof ev.data === "string") taskEvent("error", ev);
        else call(opts.onConnectionError, [ev]);
      });
      mine.addEventListener("open", function (ev) { if (mine === source) call(opts.onOpen, [ev]); });
    }

    open(urlOf(tasks, watch.lastEventId));
    return watch;
  }

  global.streamcoord = {
    follow: follow,
    tag: tag,
    taskOf: taskOf,
    taskEventId: taskEventId,
    TERMINAL_EVENTS: TERMINAL_EVENTS,
    RESTART_REASONS: RESTART_REASONS,
  };
})(typeof window !== "undefined" ? window : globalThis);
