#!/usr/bin/env node
// Prints GetModelInfo and GetServerInfo as JSON: {"model": {...}, "server": {...}}.
"use strict";

const { makeClient, parseArgs, exitWithError } = require("./client");

function unary(client, method) {
  return new Promise((resolve, reject) => {
    client[method]({}, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2), {
      strings: ["address"],
      defaults: { address: "127.0.0.1:50051" },
    });
  } catch (err) {
    process.stderr.write(`${err.message}\nusage: node info.js [--address HOST:PORT]\n`);
    process.exit(2);
  }
  const client = makeClient(args.address);
  try {
    const model = await unary(client, "GetModelInfo");
    const server = await unary(client, "GetServerInfo");
    process.stdout.write(JSON.stringify({ model, server }, null, 2) + "\n");
  } catch (err) {
    exitWithError(err);
  } finally {
    client.close();
  }
}

main();
