#!/usr/bin/env node
// Create an llm-loadtest run from Node.js, watch it to the end and print its result.
//
// The gRPC client is @grpc/grpc-js with the service loaded from the project's .proto files
// by @grpc/proto-loader (no generated code to keep in sync). From the repository root, after
// `scripts/bootstrap.sh --dev` (or `npm install`):
//
//   node examples/node/watch_run.js --controller 127.0.0.1:50051 \
//       --target http://127.0.0.1:8000/v1 --model mock --concurrency 4 --requests 40
//
// Progress goes to stderr; the result is printed to stdout as one JSON object. Exit code 0
// when the run SUCCEEDED, 1 when it did not, 2 when the controller refused it.
// LLM_LOADTEST_API_KEY (or --api-key) is sent as x-api-key metadata, as the CLI does.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = process.env.LLM_LOADTEST_PROTO_DIR || path.resolve(__dirname, "..", "..", "protos");
const CALL_DEADLINE_MS = 30_000;

function parseArgs(argv) {
  const opts = {
    controller: process.env.LLM_LOADTEST_CONTROLLER || "127.0.0.1:50051",
    apiKey: process.env.LLM_LOADTEST_API_KEY || "",
    target: "",
    model: "",
    concurrency: 4,
    requests: 40,
    duration: "",
    outputTokens: 64,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    switch (flag) {
      case "--controller": opts.controller = value; break;
      case "--api-key": opts.apiKey = value; break;
      case "--target": opts.target = value; break;
      case "--model": opts.model = value; break;
      case "--concurrency": opts.concurrency = Number(value); break;
      case "--requests": opts.requests = Number(value); break;
      case "--duration": opts.duration = value; break;
      case "--output-tokens": opts.outputTokens = Number(value); break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  if (!opts.target || !opts.model) throw new Error("--target and --model are required");
  return opts;
}

function loadRunService() {
  const definition = protoLoader.loadSync("loadtest/v1/run_service.proto", {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the .proto (snake_case), like the JSON the API docs show
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).loadtest.v1.RunService;
}

function buildSpec(opts) {
  const stage = { name: `c${opts.concurrency}`, concurrency: opts.concurrency };
  if (opts.requests) stage.requests = String(opts.requests);
  if (opts.duration) stage.duration = { seconds: String(parseFloat(opts.duration)), nanos: 0 };
  return {
    display_name: "node example",
    target: { base_url: opts.target, model: opts.model },
    workload: {
      synthetic: { input_tokens: { fixed: 128 }, output_tokens: { fixed: opts.outputTokens } },
    },
    stages: [stage],
  };
}

function deadline() {
  return new Date(Date.now() + CALL_DEADLINE_MS);
}

function createRun(client, metadata, spec) {
  return new Promise((resolve, reject) => {
    client.CreateRun({ spec }, metadata, { deadline: deadline() }, (err, response) =>
      err ? reject(err) : resolve(response.run));
  });
}

// Resolves with the final WatchRunResponse (the one carrying the result).
function watchRun(client, metadata, runId) {
  return new Promise((resolve, reject) => {
    // No deadline on the stream: the server sends an update about once a second.
    const call = client.WatchRun({ run_id: runId }, metadata);
    let last = null;
    call.on("data", (update) => {
      last = update;
      const live = update.live || {};
      process.stderr.write(
        `${update.run.state} stage ${update.run.current_stage} ` +
        `done ${live.stage_requests_done || 0} ` +
        `ttft p50 ${Number(live.ttft_p50_ms || 0).toFixed(1)} ms\n`);
    });
    call.on("error", reject);
    call.on("end", () => (last && last.result ? resolve(last) : reject(new Error("stream ended without a result"))));
  });
}

function summarize(update) {
  const stages = update.result.stages.map((s) => ({
    index: s.index,
    name: s.name,
    requests_ok: Number(s.requests_ok),
    requests_failed: Number(s.requests_failed),
    ttft_p50_ms: s.ttft ? s.ttft.p50_ms : 0,
    ttft_p99_ms: s.ttft ? s.ttft.p99_ms : 0,
    output_token_throughput: s.output_token_throughput,
  }));
  return { run_id: update.run.id, state: update.run.state, stages };
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`error: ${err.message}\n`);
    return 2;
  }
  const RunService = loadRunService();
  const client = new RunService(opts.controller, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (opts.apiKey) metadata.set("x-api-key", opts.apiKey);
  try {
    let run;
    try {
      run = await createRun(client, metadata, buildSpec(opts));
    } catch (err) {
      process.stderr.write(`CreateRun refused: ${err.code} ${err.details}\n`);
      return 2;
    }
    process.stderr.write(`created ${run.id}\n`);
    const final = await watchRun(client, metadata, run.id);
    const summary = summarize(final);
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    return summary.state === "RUN_STATE_SUCCEEDED" ? 0 : 1;
  } finally {
    client.close();
  }
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => { process.stderr.write(`error: ${err.message}\n`); process.exitCode = 1; },
);
