#!/usr/bin/env node
// Streams a completion from lightllm.v1.Generation/GenerateStream.
// Text goes to stdout as it arrives; finish reason and usage go to stderr.
"use strict";

const { makeClient, parseArgs, exitWithError } = require("./client");

const USAGE = `usage: node generate.js --prompt TEXT [--address HOST:PORT] [--max-new-tokens N]
                        [--temperature T] [--seed S] [--chat]
  --address         server address (default 127.0.0.1:50051)
  --prompt          prompt text (with --chat: one user message, rendered with the chat template)
  --max-new-tokens  tokens to generate (server default when omitted)
  --temperature     0 = greedy (server default 1.0)
  --seed            fixes the sampling random stream
  --chat            send the prompt as a chat message instead of raw text
`;

function toNumber(name, value, integer) {
  const n = Number(value);
  if (value === "" || !Number.isFinite(n) || (integer && !Number.isInteger(n))) {
    throw new Error(`--${name} must be ${integer ? "an integer" : "a number"}, got ${JSON.stringify(value)}`);
  }
  return n;
}

function buildRequest(args) {
  const req = { sampling: {}, stopping: {} };
  if (args.chat) {
    req.chat = { messages: [{ role: "user", content: args.prompt }] };
  } else {
    req.text = args.prompt;
  }
  if (args.maxNewTokens !== undefined) {
    req.stopping.max_new_tokens = toNumber("max-new-tokens", args.maxNewTokens, true);
  }
  if (args.temperature !== undefined) {
    req.sampling.temperature = toNumber("temperature", args.temperature, false);
  }
  if (args.seed !== undefined) {
    toNumber("seed", args.seed, true);
    req.sampling.seed = args.seed; // uint64: passed as a string, no precision loss
  }
  return req;
}

function main() {
  let args;
  let request;
  try {
    args = parseArgs(process.argv.slice(2), {
      strings: ["address", "prompt", "max-new-tokens", "temperature", "seed"],
      booleans: ["chat", "help"],
      defaults: { address: "127.0.0.1:50051" },
    });
    if (args.help) {
      process.stdout.write(USAGE);
      return;
    }
    if (args.prompt === undefined) throw new Error("--prompt is required");
    request = buildRequest(args);
  } catch (err) {
    process.stderr.write(`${err.message}\n${USAGE}`);
    process.exit(2);
  }

  const client = makeClient(args.address);
  const call = client.GenerateStream(request);
  let last = null;
  call.on("data", (msg) => {
    if (msg.text) process.stdout.write(msg.text);
    last = msg;
  });
  call.on("error", exitWithError);
  call.on("end", () => {
    client.close();
    if (process.stdout.isTTY) process.stdout.write("\n");
    if (last) {
      const usage = last.usage || {};
      process.stderr.write(
        `finish_reason=${last.finish_reason}` +
          (last.stop_reason ? ` stop_reason=${JSON.stringify(last.stop_reason)}` : "") +
          ` prompt_tokens=${usage.prompt_tokens} completion_tokens=${usage.completion_tokens}` +
          ` cached_tokens=${usage.cached_tokens}\n`,
      );
    }
  });
  // Ctrl-C cancels the call so the server frees the request at once.
  process.once("SIGINT", () => {
    call.cancel();
    process.exit(130);
  });
}

main();
