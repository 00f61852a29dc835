#!/usr/bin/env node
// A client of the homelabarr-supervisor API, written the way the HomelabARR backend
// talks to it: Node's own `http.request({ socketPath })`, nothing else.
//
// It lists the containers once, then follows /v1/events for ever. When the stream
// breaks (the supervisor restarts, the connection is cut, the subscriber fell behind)
// it reconnects with `since` = the last revision it has seen, so it gets exactly the
// changes it missed, or a fresh snapshot when the supervisor can no longer tell.
//
// Usage: node client.js [SOCKET]   (default: $SUPERVISOR_SOCKET or
//                                    /run/homelabarr/supervisor.sock)
// Prints one line per event on stdout, as `TYPE key=value ...`.

'use strict';

const http = require('node:http');

const socketPath =
  process.argv[2] || process.env.SUPERVISOR_SOCKET || '/run/homelabarr/supervisor.sock';
const RETRY_MIN_MS = 100;
const RETRY_MAX_MS = 5000;

// The last revision we have fully applied: where to resume from.
let lastRevision = null;

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function short(id) {
  return String(id).slice(0, 12);
}

function getJson(path) {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, path, method: 'GET' }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => (body += chunk));
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode, body: JSON.parse(body) });
        } catch (err) {
          reject(err);
        }
      });
    });
    req.on('error', reject);
    req.end();
  });
}

async function listContainers() {
  for (let delay = RETRY_MIN_MS; ; delay = Math.min(delay * 2, RETRY_MAX_MS)) {
    try {
      const { status, body } = await getJson('/v1/containers');
      if (status !== 200) throw new Error(`HTTP ${status}: ${JSON.stringify(body)}`);
      console.log(
        `containers revision=${body.revision} count=${body.containers.length}` +
          ` state=${body.state} stale=${body.stale}`,
      );
      for (const c of body.containers) {
        console.log(`container id=${short(c.id)} name=${c.name} state=${c.state}`);
      }
      return;
    } catch (err) {
      console.log(`unavailable (${err.code || err.message}); retrying in ${delay}ms`);
      await sleep(delay);
    }
  }
}

function show(event) {
  switch (event.type) {
    case 'snapshot':
      lastRevision = event.revision;
      console.log(
        `snapshot revision=${event.revision} containers=${event.containers.length}` +
          ` state=${event.state}`,
      );
      break;
    case 'upsert': {
      lastRevision = event.revision;
      const c = event.container;
      console.log(
        `upsert revision=${event.revision} id=${short(c.id)} name=${c.name} state=${c.state}`,
      );
      break;
    }
    case 'remove':
      lastRevision = event.revision;
      console.log(`remove revision=${event.revision} id=${short(event.id)}`);
      break;
    case 'heartbeat':
      // Everything up to this revision has been sent: a safe resume point.
      lastRevision = event.revision;
      console.log(`heartbeat revision=${event.revision}`);
      break;
    case 'connection':
      console.log(
        `connection state=${event.state} error=${event.error ? event.error.kind : 'none'}`,
      );
      break;
    case 'resync':
      console.log(`resync revision=${event.revision}`);
      break;
    default:
      console.log(`unknown ${JSON.stringify(event)}`);
  }
}

// Follow the stream once; resolves with why it ended, and whether anything arrived.
function follow() {
  return new Promise((resolve) => {
    let settled = false;
    let received = false;
    const finish = (why) => {
      if (!settled) {
        settled = true;
        resolve({ why, received });
      }
    };
    const path = lastRevision === null ? '/v1/events' : `/v1/events?since=${lastRevision}`;
    const req = http.request({ socketPath, path, method: 'GET' }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        finish(`HTTP ${res.statusCode}`);
        return;
      }
      console.log(`subscribed since=${lastRevision === null ? 'none' : lastRevision}`);
      let buffer = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => {
        received = true;
        buffer += chunk;
        let newline;
        while ((newline = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          if (line) show(JSON.parse(line));
        }
      });
      res.on('end', () => finish('end of stream'));
      res.on('error', (err) => finish(err.code || err.message));
      res.on('close', () => finish('closed'));
    });
    req.on('error', (err) => finish(err.code || err.message));
    req.end();
  });
}

async function main() {
  await listContainers();
  let delay = RETRY_MIN_MS;
  for (;;) {
    const { why, received } = await follow();
    if (received) delay = RETRY_MIN_MS;
    const since = lastRevision === null ? 'none' : lastRevision;
    console.log(`disconnected (${why}); resuming since=${since} in ${delay}ms`);
    await sleep(delay);
    delay = Math.min(delay * 2, RETRY_MAX_MS);
  }
}

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
main();
