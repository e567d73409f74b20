// A client of `deadstop serve` over the gateway wire (docs/gateway.md), the Node
// counterpart of supervisor/client/client.py's AsyncClient.
//
//   import { Client } from "./deadstop.mjs"
//   const c = new Client()                        // finds the daemon like every client
//   await c.send("chat-42", "draft the reply", { agent: "researcher" })
//   const reply = await c.stop("chat-42")         // every run it ended, with its report
//   await c.close()
//
// `provide({ send_email: async (to, body, ctx) => ... })` makes this process the
// provider of a tool the daemon's configuration declares `provided = true`: a
// run's call arrives here, runs, and its result goes back. At the run's revoke
// the daemon cancels the call: `ctx.signal` aborts and nothing is sent back.

import { randomBytes } from "node:crypto"
import fs from "node:fs"
import path from "node:path"
import * as zmq from "zeromq"

export const VERSION = "dsg1"
const PUSH_ID = "0"
const CLIENT_KINDS = ["cli", "gateway", "console"]
const ENV_DAEMON = "DEADSTOP_DAEMON"
const FILE_NAME = "daemon.json"
const SUBSCRIBE_WAIT_MS = 5000

// docs/control.md §4; a reply names its fault itself, this table serves the faults a client raises.
export const FAULTS = {
  1: "UNKNOWN_VERB", 2: "BAD_ARGUMENTS", 3: "UNSUPPORTED_VERSION", 10: "NO_SUCH_SESSION", 11: "NO_SUCH_RUN",
  12: "NO_SUCH_AGENT", 20: "FORBIDDEN", 21: "POLICY_DENIED", 30: "NOT_RUNNING", 31: "INVALID_TARGET",
  32: "LIMIT_UNENFORCEABLE", 40: "SHUTTING_DOWN", 41: "STATE_DIR_IN_USE", 42: "UNREACHABLE", 43: "TIMED_OUT",
  50: "STOP_INCOMPLETE", 90: "FAILED",
}

/** A refused verb: `.fault` is its number, `.faultName` its name, `.detail` what the daemon attached. */
export class DeadstopError extends Error {
  constructor(fault, message, detail = null, faultName = FAULTS[fault] ?? "FAILED") {
    super(message)
    this.name = "DeadstopError"
    this.fault = fault
    this.faultName = faultName
    this.detail = detail
  }
}

// -- finding the daemon (docs/gateway.md §1) ------------------------------------------------------
// The shared base (the supervisor's own runtime directories live there too); the daemon links
// <base>/daemon.json to the connection file in its owner-only <base>/daemon/.
export function defaultRuntimeDir() {
  const xdg = process.env.XDG_RUNTIME_DIR
  if (xdg && path.isAbsolute(xdg)) return path.join(xdg, "deadstop")
  if (process.geteuid() === 0) return "/run/deadstop"
  return `/tmp/deadstop-${process.geteuid()}`
}

/** The daemon's connection file (or one made up for a bare endpoint); throws UNREACHABLE (42) if there is none. */
export function locate(daemon) {
  let origin, value
  if (daemon) [origin, value] = ["the daemon argument", daemon]
  else if (process.env[ENV_DAEMON]) [origin, value] = [`$${ENV_DAEMON}`, process.env[ENV_DAEMON]]
  else [origin, value] = ["the well-known path", path.join(defaultRuntimeDir(), FILE_NAME)]
  if (value.startsWith("ipc://") || value.startsWith("tcp://")) {
    return { version: VERSION, control: [value], events: [], server_key: null, pid: 0, started: 0, state_dir: "" }
  }
  const file = isDirectory(value) ? path.join(value, FILE_NAME) : value
  let found
  try {
    found = JSON.parse(fs.readFileSync(file, "utf8"))
  } catch (err) {
    if (err.code === "ENOENT") {
      throw new DeadstopError(42, `no deadstop daemon: ${file} does not exist (looked at ${origin}; start one with ` +
        `\`deadstop serve\`, or point the daemon argument / $${ENV_DAEMON} at its connection file)`)
    }
    throw new DeadstopError(42, `no deadstop daemon: cannot read ${file} (${origin}): ${err.message}`)
  }
  if (!Array.isArray(found?.control) || found.control.length === 0) {
    throw new DeadstopError(42, `no deadstop daemon: ${file} (${origin}) names no control endpoint`)
  }
  // A daemon that died leaves its file behind: say so instead of waiting for a reply that cannot come.
  if (found.pid && !isAlive(found.pid)) {
    throw new DeadstopError(42, `no deadstop daemon: ${file} (${origin}) names pid ${found.pid}, which is not running`)
  }
  return { events: [], ...found }
}

function isDirectory(p) {
  try {
    return fs.statSync(p).isDirectory()
  } catch {
    return false
  }
}

function isAlive(pid) {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return err.code === "EPERM" // someone else's process, but alive
  }
}

function routingId(kind, name) {
  if (!CLIENT_KINDS.includes(kind)) throw new TypeError(`client kind must be one of ${CLIENT_KINDS}, not ${kind}`)
  const label = (name || `pid${process.pid}`).replaceAll("/", "_").slice(0, 64)
  return `${kind}/${label}/${randomBytes(4).toString("hex")}`
}

// Unset arguments are left out: the daemon refuses fields it does not know, so a
// newer client stays compatible with an older daemon as long as it sends no more.
function body(verb, args) {
  const request = { verb }
  for (const [k, v] of Object.entries(args)) if (v !== undefined && v !== null) request[k] = v
  return JSON.stringify(request)
}

// -- the client -----------------------------------------------------------------------------------
export class Client {
  /**
   * @param {string} [daemon] a connection file, a runtime directory holding one, or an `ipc://` endpoint
   * @param {{kind?: string, name?: string, timeoutMs?: number|null}} [options] `timeoutMs` bounds each
   *   call (TIMED_OUT, 43, after it; null waits for ever); `kind` and `name` make the routing id, which
   *   names who stopped a run in its report
   */
  constructor(daemon, { kind = "gateway", name, timeoutMs = 60_000 } = {}) {
    this.where = locate(daemon)
    // tcp:// endpoints take CURVE keys, which this client does not hold: it uses the owner-only ipc:// ones.
    const local = (endpoints) => endpoints.filter((e) => !e.startsWith("tcp://"))
    if (local(this.where.control).length === 0) {
      throw new DeadstopError(42, `the daemon at ${this.where.control.join(", ")} has no ipc:// endpoint, and this ` +
        "client does not speak CURVE, which tcp:// needs")
    }
    this.endpoint = local(this.where.control)[0]
    this._eventEndpoints = local(this.where.events)
    this.timeoutMs = timeoutMs
    this.routingId = routingId(kind, name)
    this._sock = new zmq.Dealer({ routingId: this.routingId, linger: 0 })
    this._sock.connect(this.endpoint)
    this._ids = 0
    this._pending = new Map() // request id -> {verb, resolve, reject, timer}
    this._tools = new Map() // tool name -> function
    this._calls = new Map() // call id -> AbortController of a tool call in flight
    this._sending = Promise.resolve()
    this._closed = false
    this._reader = this._read()
  }

  /** One verb with its arguments: the verb's result, or a DeadstopError. */
  call(verb, args = {}) {
    if (this._closed) return Promise.reject(new DeadstopError(42, `${verb}: the client is closed`))
    let frames
    try {
      frames = [VERSION, String(++this._ids), body(verb, args)]
    } catch (err) { // a BigInt, a cycle: not JSON
      return Promise.reject(new DeadstopError(2, `${verb}: the arguments are not JSON: ${err.message}`))
    }
    return new Promise((resolve, reject) => {
      const entry = { verb, resolve, reject, timer: null }
      if (this.timeoutMs !== null) {
        entry.timer = setTimeout(() => {
          this._pending.delete(frames[1])
          reject(new DeadstopError(43, `${verb}: no reply from the daemon at ${this.endpoint} within ` +
            `${this.timeoutMs} ms (the verb may still have run)`))
        }, this.timeoutMs)
      }
      this._pending.set(frames[1], entry)
      this._send(frames).catch((err) => this._settle(frames[1], null, err))
    })
  }

  // zeromq allows one send in progress per socket: sends take turns.
  _send(frames) {
    const sent = this._sending.then(() => this._sock.send(frames))
    this._sending = sent.catch(() => {})
    return sent
  }

  _settle(id, reply, err) {
    const entry = this._pending.get(id)
    if (entry === undefined) return // timed out, or not ours: dropped
    this._pending.delete(id)
    clearTimeout(entry.timer)
    if (err) entry.reject(err instanceof DeadstopError ? err : new DeadstopError(42, `${entry.verb}: ${err.message}`))
    else if (reply.ok) entry.resolve(reply.result ?? null)
    else {
      const fault = Number.isInteger(reply.fault) ? reply.fault : 90
      const name = reply.name ?? FAULTS[fault]
      entry.reject(new DeadstopError(fault, reply.message ?? "refused", reply.detail ?? null, name))
    }
  }

  async _read() {
    try {
      for await (const frames of this._sock) {
        if (frames.length !== 3 || frames[0].toString() !== VERSION) continue
        let message
        try {
          message = JSON.parse(frames[2].toString())
        } catch {
          continue
        }
        if (frames[1].toString() === PUSH_ID) this._push(message)
        else this._settle(frames[1].toString(), message, null)
      }
    } catch (err) {
      if (this._closed) return
      // No reply can come any more: fail what waits for one now rather than at its timeout.
      this._closed = true
      for (const id of [...this._pending.keys()]) {
        this._settle(id, null, new DeadstopError(42, `the control socket failed: ${err.message}`))
      }
    }
  }

  // -- the session and run verbs (docs/control.md §2) ---------------------------------------------
  sessions({ active, minTokens, agent, olderThan } = {}) {
    return this.call("sessions.list", { active, min_tokens: minTokens, agent, older_than: olderThan })
  }

  session(key) {
    return this.call("sessions.show", { key })
  }

  send(key, message, { agent, idempotencyKey } = {}) {
    return this.call("sessions.send", { key, message, agent, idempotency_key: idempotencyKey })
  }

  /** Stop a session's tree: its StopReply, with the report of every run it ended. `grace` is in seconds. */
  stop(key, { grace, wait } = {}) {
    return this.call("sessions.stop", { key, grace, wait })
  }

  kill(key) {
    return this.call("sessions.kill", { key })
  }

  /** Every session with something running or queued, in one step (sessions.stop_all): a StopAllReply. */
  stopAll({ grace, wait, kill } = {}) {
    return this.call("sessions.stop_all", { grace, wait, kill })
  }

  pause(key) {
    return this.call("sessions.pause", { key })
  }

  resume(key) {
    return this.call("sessions.resume", { key })
  }

  cleanup({ olderThan, dryRun } = {}) {
    return this.call("sessions.cleanup", { older_than: olderThan, dry_run: dryRun })
  }

  runs({ session, active, limit } = {}) {
    return this.call("runs.list", { session, active, limit })
  }

  run(runId) {
    return this.call("runs.show", { run_id: runId })
  }

  stopRun(runId, { grace } = {}) {
    return this.call("runs.stop", { run_id: runId, grace })
  }

  killRun(runId) {
    return this.call("runs.kill", { run_id: runId })
  }

  agents() {
    return this.call("agents.list")
  }

  health() {
    return this.call("health")
  }

  info() {
    return this.call("daemon.info")
  }

  // -- providing tools (docs/gateway.md §6) -------------------------------------------------------
  /**
   * Provide these tools to the daemon's runs. Each is called as `fn(...args, ctx)`, with
   * `ctx = {signal, kwargs, callId, runId, session, tool}`; `ctx.signal` aborts when the daemon
   * cancels the call (its run was revoked), and then nothing goes back.
   */
  async provide(tools) {
    for (const [name, fn] of Object.entries(tools)) this._tools.set(name, fn)
    return this.call("tools.provide", { names: Object.keys(tools).sort() })
  }

  _push(push) {
    if (push.push === "tool.call") {
      const controller = new AbortController()
      this._calls.set(push.call_id, controller)
      this._serve(push, controller.signal).finally(() => this._calls.delete(push.call_id))
    } else if (push.push === "tool.cancel") {
      const controller = this._calls.get(push.call_id)
      this._calls.delete(push.call_id)
      controller?.abort(new DeadstopError(30, push.reason ?? "cancelled by the daemon"))
    } // "ping", and pushes a newer daemon may add: nothing to do
  }

  async _serve(call, signal) {
    const fn = this._tools.get(call.tool)
    let answer
    try {
      if (fn === undefined) throw new Error(`this client provides no tool ${JSON.stringify(call.tool)}`)
      const ctx = { signal, kwargs: call.kwargs ?? {}, callId: call.call_id, runId: call.run_id, session: call.session,
        tool: call.tool }
      const value = (await fn(...(call.args ?? []), ctx)) ?? null
      JSON.stringify(value) // a value that is not JSON fails the call here, where the run learns why
      answer = { call_id: call.call_id, ok: true, value }
    } catch (err) {
      answer = { call_id: call.call_id, ok: false, error: `${err?.name ?? "Error"}: ${err?.message ?? err}` }
    }
    if (signal.aborted || this._closed) return // cancelled: its result would be refused, and reaches no one
    // Refused as late (the run was revoked meanwhile) or the client closed: either way no one is waiting.
    await this.call("tools.result", answer).catch(() => {})
  }

  // -- events (docs/gateway.md §7) ----------------------------------------------------------------
  /**
   * Follow the event stream of one session (or of all): an async iterable of event bodies
   * (`{seq, session, run_id, kind, data, t_ns, generation}`), subscribed once this resolves, so nothing
   * published afterwards is missed. Close it with `close()`.
   */
  async events({ session } = {}) {
    const endpoints = this._eventEndpoints
    if (endpoints.length === 0) {
      throw new DeadstopError(42, "no ipc:// events endpoint known (a bare control endpoint names none)")
    }
    const sub = new zmq.Subscriber({ linger: 0 })
    // The trailing NUL keeps `chat` from matching `chat-42`.
    sub.subscribe(session === undefined || session === null ? "s:" : `s:${session}\0`)
    const up = new Promise((resolve) => {
      let seen = 0
      const timer = setTimeout(resolve, SUBSCRIBE_WAIT_MS)
      sub.events.on("handshake", () => {
        if (++seen === endpoints.length) {
          clearTimeout(timer)
          resolve()
        }
      })
    })
    for (const endpoint of endpoints) sub.connect(endpoint)
    await up
    // In place once a ping of ours comes through: ask for one (again, until it does), drop what precedes it.
    const token = randomBytes(8).toString("hex")
    const iterator = sub[Symbol.asyncIterator]()
    const deadline = Date.now() + SUBSCRIBE_WAIT_MS
    let pending = iterator.next() // one receive in flight at a time
    for (let marked = false; !marked;) {
      if (Date.now() > deadline) throw new DeadstopError(43, "the event stream did not come up in time")
      await this.call("events.ping", { token, session: session ?? null })
      const got = await Promise.race([pending, new Promise((resolve) => setTimeout(() => resolve(null), 100))])
      if (got === null) continue // not yet: ping again, the same receive still waits
      pending = iterator.next()
      const event = JSON.parse(got.value[1].toString())
      marked = event.kind === "stream.ping" && event.data?.token === token
    }
    return {
      async *[Symbol.asyncIterator]() {
        try {
          for (;;) {
            const { value, done } = await pending
            pending = iterator.next()
            if (done) return
            const event = JSON.parse(value[1].toString())
            if (event.kind !== "stream.ping") yield event // another subscriber's marker
          }
        } catch (err) {
          if (!sub.closed) throw err
        }
      },
      close: () => sub.close(),
    }
  }

  /** Fail what is pending, abandon tool calls in flight, close the socket. */
  async close() {
    this._closed = true
    for (const controller of this._calls.values()) controller.abort(new DeadstopError(42, "client closed"))
    this._calls.clear()
    for (const id of [...this._pending.keys()]) this._settle(id, null, new DeadstopError(42, "client closed"))
    if (!this._sock.closed) this._sock.close()
    await this._reader
  }
}
