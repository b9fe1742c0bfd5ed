#!/usr/bin/env node
// A polyhead client in Node.js, loading the wire contract straight from proto/ (no generated code).
//
//   npm install
//   node polyhead_client.js --target 127.0.0.1:50051 --task cartpole [--deterministic] [--max-steps 500]
//       [--state 0.01,-0.02,0.03,0.01]
//
// It lists the served tasks (ListTasks), then runs one episode of CartPole (gymnasium's CartPole-v1
// physics, below) over one ActStream session: each message carries the current observation and the
// reward of the previous action, and the episode ends with a final feedback message. The last stdout
// line is a JSON summary: {"task", "return", "steps", "head_versions", "tasks"}.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function parseArgs(argv) {
  const args = { target: "127.0.0.1:50051", task: "cartpole", deterministic: false, maxSteps: 500,
    state: [0.01, -0.02, 0.03, 0.01] };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const next = () => argv[++i];
    if (flag === "--target") args.target = next();
    else if (flag === "--task") args.task = next();
    else if (flag === "--deterministic") args.deterministic = true;
    else if (flag === "--max-steps") args.maxSteps = Number(next());
    else if (flag === "--state") args.state = next().split(",").map(Number);
    else if (flag === "--help" || flag === "-h") {
      console.error("usage: node polyhead_client.js --target HOST:PORT --task TASK [--deterministic] " +
        "[--max-steps N] [--state x,x_dot,theta,theta_dot]");
      process.exit(0);
    } else throw new Error(`unknown flag ${flag}`);
  }
  return args;
}

function loadPolyhead() {
  const definition = protoLoader.loadSync(["polyhead/v1/policy.proto"], {
    includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: Number, bytes: Buffer,
    defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).polyhead.v1;
}

// gymnasium CartPole-v1: Euler integration, 0.02 s steps, reward 1 per step, ends when the cart leaves
// [-2.4, 2.4] or the pole tilts past 12 degrees.
class CartPole {
  constructor(state) {
    this.gravity = 9.8; this.massCart = 1.0; this.massPole = 0.1; this.length = 0.5;
    this.forceMag = 10.0; this.tau = 0.02;
    this.totalMass = this.massCart + this.massPole;
    this.poleMassLength = this.massPole * this.length;
    this.thetaLimit = (12 * 2 * Math.PI) / 360;
    this.xLimit = 2.4;
    this.state = state.slice();
  }

  step(action) {
    let [x, xDot, theta, thetaDot] = this.state;
    const force = action === 1 ? this.forceMag : -this.forceMag;
    const cos = Math.cos(theta), sin = Math.sin(theta);
    const temp = (force + this.poleMassLength * thetaDot * thetaDot * sin) / this.totalMass;
    const thetaAcc = (this.gravity * sin - cos * temp) /
      (this.length * (4.0 / 3.0 - (this.massPole * cos * cos) / this.totalMass));
    const xAcc = temp - (this.poleMassLength * thetaAcc * cos) / this.totalMass;
    x += this.tau * xDot; xDot += this.tau * xAcc;
    theta += this.tau * thetaDot; thetaDot += this.tau * thetaAcc;
    this.state = [x, xDot, theta, thetaDot];
    const terminated = x < -this.xLimit || x > this.xLimit || theta < -this.thetaLimit || theta > this.thetaLimit;
    return { reward: 1.0, terminated };
  }
}

const DTYPE_FLOAT32 = 1;

function decodeTensor(t) {
  const shape = t.shape.map(Number);
  if (t.raw_data && t.raw_data.length) {
    const buf = t.raw_data, out = [];
    if (t.dtype === 3) for (let i = 0; i < buf.length; i += 8) out.push(Number(buf.readBigInt64LE(i)));
    else if (t.dtype === 4) for (let i = 0; i < buf.length; i += 4) out.push(buf.readInt32LE(i));
    else if (t.dtype === 2) for (let i = 0; i < buf.length; i += 8) out.push(buf.readDoubleLE(i));
    else for (let i = 0; i < buf.length; i += 4) out.push(buf.readFloatLE(i));
    return { shape, values: out };
  }
  return { shape, values: t.int_data.length ? t.int_data.map(Number) : t.float_data };
}

// One ActStream: step() writes a request and resolves with its response (the stream is ordered).
class Session {
  constructor(client, taskId, episodeId, deterministic) {
    this.taskId = taskId; this.episodeId = episodeId; this.deterministic = deterministic;
    this.waiting = []; this.failure = null;
    this.call = client.ActStream();
    this.call.on("data", (resp) => this.waiting.shift().resolve(resp));
    this.call.on("error", (err) => { this.failure = err; for (const w of this.waiting.splice(0)) w.reject(err); });
  }

  send(request) {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.call.write(request);
    });
  }

  step(observation, feedback) {
    const req = { task_id: this.taskId, episode_id: this.episodeId, deterministic: this.deterministic,
      observation: { dtype: DTYPE_FLOAT32, shape: [observation.length], float_data: observation } };
    if (feedback) req.feedback = feedback;
    return this.send(req);
  }

  finish(feedback) {
    return this.send({ task_id: this.taskId, episode_id: this.episodeId, feedback });
  }

  close() {
    return new Promise((resolve) => { this.call.on("end", resolve); this.call.on("error", () => resolve()); this.call.end(); });
  }
}

function unary(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 10_000 }, (err, resp) => (err ? reject(err) : resolve(resp))));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const pb = loadPolyhead();
  const client = new pb.PolicyService(args.target, grpc.credentials.createInsecure());
  const listing = await unary(client, "ListTasks", {});
  for (const t of listing.tasks) {
    const kind = t.action_space.discrete ? `Discrete(${t.action_space.discrete.n})` : "Box";
    console.error(`task ${t.task_id}: env ${t.spec.env}, actions ${kind}, active head v${t.active_version}`);
  }
  const task = listing.tasks.find((t) => t.task_id === args.task);
  if (!task) throw new Error(`task ${args.task} is not served; served: ${listing.tasks.map((t) => t.task_id)}`);
  if (!task.action_space.discrete || task.action_space.discrete.n !== 2) {
    throw new Error(`task ${args.task} does not act like CartPole (needs Discrete(2) actions)`);
  }

  const env = new CartPole(args.state);
  const session = new Session(client, args.task, `node-${process.pid}-${Date.now()}`, args.deterministic);
  const versions = new Set();
  let episodeReturn = 0, steps = 0, feedback = null, terminated = false;
  while (steps < args.maxSteps) {
    const observation = Math.fround ? env.state.map(Math.fround) : env.state;
    const resp = await session.step(observation, feedback);
    versions.add(Number(resp.head_version));
    const action = decodeTensor(resp.action).values[0] + (task.action_space.discrete.start || 0);
    const outcome = env.step(action);
    episodeReturn += outcome.reward; steps += 1;
    terminated = outcome.terminated;
    feedback = { reward: outcome.reward, terminated, truncated: false };
    if (terminated) break;
  }
  await session.finish({ reward: feedback.reward, terminated, truncated: !terminated });
  await session.close();
  client.close();
  console.error(`episode return ${episodeReturn} after ${steps} steps`);
  console.log(JSON.stringify({ task: args.task, return: episodeReturn, steps, head_versions: [...versions].sort(),
    tasks: listing.tasks.map((t) => t.task_id) }));
}

main().catch((err) => {
  console.error(`polyhead node client failed: ${err.code !== undefined ? `status ${err.code}: ` : ""}${err.details || err.message}`);
  process.exit(1);
});
