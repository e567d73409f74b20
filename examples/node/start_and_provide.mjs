#!/usr/bin/env node
// Start a session and provide the `send_email` tool its runs call, reporting what
// happens as JSON lines on stdout; runs until stdin closes, SIGINT or SIGTERM.
//
//   node start_and_provide.mjs SESSION AGENT MESSAGE_JSON [--answer N] [--delay-ms MS] [--name NAME] [--daemon WHERE]
//
// Lines: {"event": "provided"}, {"event": "sent", <SendReply>}, one {"event": "call"} per
// call received, {"event": "cancel"} when the daemon cancels one, {"event": "closed"}.
// The first N calls (--answer, default all) are answered after --delay-ms; later ones
// wait like a stalled mail server until the daemon cancels them.

import { parseArgs } from "node:util"
import { setTimeout as sleep } from "node:timers/promises"
import { Client, DeadstopError } from "./deadstop.mjs"

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: { answer: { type: "string" }, "delay-ms": { type: "string", default: "100" },
    name: { type: "string", default: "mailer" }, daemon: { type: "string" } },
})
if (positionals.length !== 3) {
  console.error("usage: start_and_provide.mjs SESSION AGENT MESSAGE_JSON [--answer N] [--delay-ms MS] [--name NAME] " +
    "[--daemon WHERE]")
  process.exit(2)
}
const [session, agent, messageText] = positionals
const answer = opts.answer === undefined ? Infinity : Number(opts.answer)
const delayMs = Number(opts["delay-ms"])
const say = (event, data = {}) => process.stdout.write(JSON.stringify({ event, ...data }) + "\n")

let client
try {
  client = new Client(opts.daemon, { name: opts.name })
  let calls = 0
  await client.provide({
    async send_email(to, body, ctx) {
      const n = ++calls
      say("call", { n, call_id: ctx.callId, run_id: ctx.runId, to })
      ctx.signal.addEventListener("abort", () => {
        say("cancel", { n, call_id: ctx.callId, reason: ctx.signal.reason.message })
      })
      // The timer rejects when the signal aborts: an abandoned call stops waiting at once.
      await sleep(n <= answer ? delayMs : 2 ** 31 - 1, undefined, { signal: ctx.signal })
      return `sent to ${to}`
    },
  })
  say("provided")
  say("sent", await client.send(session, JSON.parse(messageText), { agent }))
} catch (err) {
  await client?.close()
  console.error(err instanceof DeadstopError ? `deadstop: ${err.message} (fault ${err.fault} ${err.faultName})` : err)
  process.exit(1)
}

let closing = false
async function shutdown() {
  if (closing) return
  closing = true
  await client.close()
  say("closed")
  process.exit(0)
}
process.stdin.on("end", shutdown).resume()
process.on("SIGINT", shutdown)
process.on("SIGTERM", shutdown)
