#!/usr/bin/env node
// Places an order on orderflow and follows it to a terminal status.
//
// The watch resumes where it left off when the stream drops: it asks for every change after the
// last version it printed, so each version is printed exactly once however often the connection
// goes away. The stubs are made at start-up from proto/ by @grpc/proto-loader, so there is no
// generated code to keep in step with the contracts (see the README, "Generated clients").
//
// Exit status: 0 the order reached a terminal status (whichever), 2 the server refused the
// request, 3 the server stayed unreachable, 1 anything else (as the `orderflow` CLI).
'use strict';

const path = require('node:path');
const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const { setTimeout: sleep } = require('node:timers/promises');

let grpc, protoLoader;
try {
  grpc = require('@grpc/grpc-js');
  protoLoader = require('@grpc/proto-loader');
} catch (missing) {
  console.error(`error: ${missing.message}\nInstall the dependencies first: npm ci --prefix ${__dirname}`);
  process.exit(1);
}

// Failed attempts in a row before giving up; any update received starts the count again.
const MAX_RETRIES = 6;
const { status: Code } = grpc;
const REFUSED = new Set([
  Code.INVALID_ARGUMENT,
  Code.NOT_FOUND,
  Code.ALREADY_EXISTS,
  Code.OUT_OF_RANGE,
  Code.UNAUTHENTICATED,
  Code.PERMISSION_DENIED,
]);

class GaveUp extends Error {}

// Milliseconds to wait before retry number `retry` (1-based): 200 ms doubling, at most 5 s.
const backoff = (retry) => Math.min(200 * 2 ** (retry - 1), 5000);

const describe = (error) => `${Object.keys(Code).find((k) => Code[k] === error.code)}: ${error.details}`;

function loadOrderService() {
  const definition = protoLoader.loadSync('orderflow/v1/orders.proto', {
    includeDirs: [path.join(__dirname, '..', '..', 'proto')],
    // Versions count status changes of one order: far below 2^53.
    longs: Number,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).orderflow.v1.OrderService;
}

async function place(client, request, metadata) {
  // The idempotency key makes a retry after a lost answer return the same order instead of
  // placing a second one.
  for (let retry = 1; ; retry++) {
    try {
      return await new Promise((resolve, reject) =>
        client.placeOrder(request, metadata, { deadline: Date.now() + 10_000 }, (error, order) =>
          error ? reject(error) : resolve(order),
        ),
      );
    } catch (error) {
      if (error.code !== Code.UNAVAILABLE) throw error;
      if (retry > MAX_RETRIES) throw new GaveUp(`PlaceOrder: ${describe(error)}`);
      console.log(`PlaceOrder failed (${describe(error)}); retrying`);
      await sleep(backoff(retry));
    }
  }
}

// Prints every update from the first one until a terminal one, which it returns.
async function watch(client, orderId, metadata) {
  // 0 replays the whole history, so the first status is printed even if the order has already
  // moved on.
  let lastVersion = 0;
  let retry = 0;
  for (;;) {
    let why = 'the stream ended before a terminal status';
    try {
      const stream = client.watchOrder({ orderId, resumeAfterVersion: lastVersion }, metadata);
      for await (const update of stream) {
        if (update.version <= lastVersion) continue;
        lastVersion = update.version;
        retry = 0;
        const reason = update.reason ? ` (${update.reason})` : '';
        console.log(`version ${update.version}: ${update.status}${reason}`);
        // The server ends the stream after a terminal update.
        if (update.terminal) return update;
      }
    } catch (error) {
      if (error.code !== Code.UNAVAILABLE) throw error;
      why = describe(error);
    }
    retry += 1;
    if (retry > MAX_RETRIES) throw new GaveUp(`WatchOrder: ${why}`);
    console.log(`stream dropped (${why}); resuming after version ${lastVersion}`);
    await sleep(backoff(retry));
  }
}

async function main() {
  const { values: args } = parseArgs({
    options: {
      addr: { type: 'string', default: '127.0.0.1:50051' },
      // Sent as `authorization: Bearer <token>`.
      token: { type: 'string', default: process.env.ORDERFLOW_TOKEN ?? '' },
      customer: { type: 'string', default: 'alice' },
      sku: { type: 'string', default: 'KB-001' },
      quantity: { type: 'string', default: '1' },
    },
  });
  const quantity = Number(args.quantity);
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set('authorization', `Bearer ${args.token}`);

  const OrderService = loadOrderService();
  const client = new OrderService(args.addr, grpc.credentials.createInsecure());
  try {
    const order = await place(
      client,
      {
        customerId: args.customer,
        items: [{ sku: args.sku, quantity }],
        idempotencyKey: randomUUID(),
      },
      metadata,
    );
    console.log(`placed order ${order.orderId}: ${quantity} x ${args.sku} for ${args.customer}`);
    const final = await watch(client, order.orderId, metadata);
    console.log(`order ${final.orderId} ended ${final.status}`);
    return 0;
  } catch (error) {
    if (error instanceof GaveUp) {
      console.error(`error: gave up after ${MAX_RETRIES} retries: ${error.message}`);
      return 3;
    }
    if (error.code === undefined) throw error;
    console.error(`error: ${describe(error)}`);
    if (REFUSED.has(error.code)) return 2;
    if (error.code === Code.DEADLINE_EXCEEDED) return 3;
    return 1;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    console.error(`error: ${error.stack ?? error}`);
    process.exitCode = 1;
  },
);
