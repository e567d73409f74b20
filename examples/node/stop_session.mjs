#!/usr/bin/env node
// Stop (or kill) a session and print the daemon's reply, a StopReply with the report of
// every run it ended, as one JSON line.
//
//   node stop_session.mjs SESSION [--grace SECONDS] [--kill] [--name NAME] [--daemon WHERE]
//
// Exit status 0 when every run was ended with no survivor (or nothing was running), 1 otherwise.

import { parseArgs } from "node:util"
import { Client, DeadstopError } from "./deadstop.mjs"

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: { grace: { type: "string" }, kill: { type: "boolean", default: false },
    name: { type: "string", default: "operator" }, daemon: { type: "string" } },
})
if (positionals.length !== 1) {
  console.error("usage: stop_session.mjs SESSION [--grace SECONDS] [--kill] [--name NAME] [--daemon WHERE]")
  process.exit(2)
}
const [session] = positionals

let client
try {
  client = new Client(opts.daemon, { name: opts.name })
  const reply = opts.kill
    ? await client.kill(session)
    : await client.stop(session, { grace: opts.grace === undefined ? undefined : Number(opts.grace) })
  console.log(JSON.stringify(reply))
  process.exitCode = reply.reports.every((r) => r.survivors === 0) ? 0 : 1
} catch (err) {
  console.error(err instanceof DeadstopError ? `deadstop: ${err.message} (fault ${err.fault} ${err.faultName})` : err)
  process.exitCode = 1
} finally {
  await client?.close()
}
