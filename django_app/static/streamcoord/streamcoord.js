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

  global.streamcoord = {
    follow: follow,
    TERMINAL_EVENTS: TERMINAL_EVENTS,
    RESTART_REASONS: RESTART_REASONS,
  };
})(typeof window !== "undefined" ? window : globalThis);
