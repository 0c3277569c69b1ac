// Shared helpers: load protos/lightllm/v1/generation.proto at runtime and parse CLI flags.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "protos");

const definition = protoLoader.loadSync("lightllm/v1/generation.proto", {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names exactly as in the .proto (max_new_tokens, ...)
  longs: String, // uint64 fields (seed) as decimal strings
  enums: String, // FINISH_REASON_LENGTH rather than 1
  defaults: true, // unset scalars read back as 0 / "" / false
  oneofs: true,
});
const { Generation } = grpc.loadPackageDefinition(definition).lightllm.v1;

function makeClient(address) {
  return new Generation(address, grpc.credentials.createInsecure());
}

// Minimal flag parser: "--name value", "--name=value" and boolean "--flag".
// The value after "--name" is taken as is, so "--temperature -1" works.
function parseArgs(argv, { strings = [], booleans = [], defaults = {} }) {
  const out = { ...defaults };
  const camel = (name) => name.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const name = flag.replace(/^--/, "");
    if (!flag.startsWith("--")) {
      throw new Error(`unexpected argument: ${argv[i]}`);
    } else if (booleans.includes(name) && inline === undefined) {
      out[camel(name)] = true;
    } else if (strings.includes(name)) {
      const value = inline !== undefined ? inline : argv[++i];
      if (value === undefined) throw new Error(`${flag} needs a value`);
      out[camel(name)] = value;
    } else {
      throw new Error(`unknown option: ${flag}`);
    }
  }
  return out;
}

// Print a gRPC error as "error: STATUS_NAME: details" and exit non-zero.
function exitWithError(err) {
  const status = err.code !== undefined ? grpc.status[err.code] : undefined;
  const details = err.details !== undefined ? err.details : err.message;
  process.stderr.write(status ? `error: ${status}: ${details}\n` : `error: ${details}\n`);
  process.exit(1);
}

module.exports = { grpc, makeClient, parseArgs, exitWithError };
