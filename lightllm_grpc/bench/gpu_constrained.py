"""GPU benchmark of structured output: what a JSON-schema constraint costs per decode step.

On one server (8B Llama-3 shape, bf16, ``--load-format dummy``), batches of 64 streams sent at
once, each decoding 128 tokens after the prompt (64 tokens):
  plain        64 unconstrained requests
  constrained  64 requests with a JSON schema (an array of 40 small objects, so the JSON
               cannot end before 128 tokens)
  mixed        32 + 32: the unconstrained half's time per token is what the others cost it
Per-token decode time of a request = (last token time - time of its 16th token) / (tokens
after the 16th), as the client sees it: by the 16th token every request of the batch is
admitted, so prefills are not counted. The median over the batch's requests, best of
``--repeats`` rounds.
Writes ``bench-constrained.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import grpc

from lightllm_grpc.bench.gpu import environment, prepare_model_dir
from lightllm_grpc.bench.server import LocalServer
from lightllm_grpc.proto import generation_pb2 as pb
from lightllm_grpc.proto import generation_pb2_grpc

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "name": {"type": "string", "maxLength": 6},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "ok"],
    },
    "minItems": 40,
    "maxItems": 40,
}
PROMPT_LEN, NEW_TOKENS, BATCH = 64, 128, 64
SKIP = 16  # tokens before the steady state


def _request(i: int, constrained: bool, seed: int) -> pb.GenerateRequest:
    ids = [1000 + (i * 37 + j * 11 + seed) % 5000 for j in range(PROMPT_LEN)]
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids))
    req.sampling.temperature = 0.0
    req.stopping.max_new_tokens = NEW_TOKENS
    if constrained:
        req.json_schema = json.dumps(SCHEMA)
    else:
        req.stopping.ignore_eos = True
    return req


async def _stream(stub, req: pb.GenerateRequest) -> tuple[float, int, bool]:
    """Per-token time from the SKIP-th token on: by then every request of the batch is
    admitted, so prefills (and the constrained requests' compile round trip) are not counted."""
    start = last = 0.0
    tokens = 0
    async for msg in stub.GenerateStream(req):
        now = time.perf_counter()
        if tokens < SKIP <= tokens + len(msg.token_ids):
            start, counted_from = now, tokens + len(msg.token_ids)
        tokens += len(msg.token_ids)
        if msg.token_ids:
            last = now
    per_token = (last - start) / max(1, tokens - counted_from)
    return per_token, tokens, req.HasField("json_schema")


async def _batch(address: str, kinds: list[bool], seed: int) -> list[tuple[float, int, bool]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return list(await asyncio.gather(*(_stream(stub, _request(i, c, seed)) for i, c in enumerate(kinds))))


def _median_ms(results: list[tuple[float, int, bool]], constrained: bool) -> float:
    return 1e3 * statistics.median(t for t, _, c in results if c == constrained)


def measure(address: str, repeats: int) -> dict:
    plans = {
        "plain": [False] * BATCH,
        "constrained": [True] * BATCH,
        "mixed": [i % 2 == 0 for i in range(BATCH)],
    }
    asyncio.run(_batch(address, plans["constrained"][:4], seed=99))  # compile the schema, warm up
    rounds: dict[str, list[dict]] = {name: [] for name in plans}
    for r in range(repeats):
        for name, kinds in plans.items():  # interleaved, so drift hits every variant alike
            res = asyncio.run(_batch(address, kinds, seed=r))
            row = {"tokens": [n for _, n, _ in res]}
            if any(not c for c in kinds):
                row["plain_ms"] = _median_ms(res, False)
            if any(kinds):
                row["constrained_ms"] = _median_ms(res, True)
            rounds[name].append(row)
            print(name, r, {k: v for k, v in row.items() if k != "tokens"}, flush=True)
    best = {
        name: {k: min(row[k] for row in rows) for k in ("plain_ms", "constrained_ms") if k in rows[0]}
        for name, rows in rounds.items()
    }
    return {"rounds": rounds, "best": best}


def render(r: dict) -> str:
    b = r["best"]
    plain = b["plain"]["plain_ms"]
    lines = [
        " | ".join(f"{k} {v}" for k, v in r["environment"].items()),
        "",
        f"Batch {BATCH}, prompt {PROMPT_LEN}, {NEW_TOKENS} greedy tokens each; per-token decode time, "
        "median over the batch, best of the rounds",
        "",
        "| batch | rows measured | ms / token | vs plain |",
        "| --- | --- | --- | --- |",
        f"| 64 unconstrained | all | {plain:.2f} | — |",
        f"| 64 JSON schema | all | {b['constrained']['constrained_ms']:.2f} | "
        f"{100 * (b['constrained']['constrained_ms'] / plain - 1):+.1f}% |",
        f"| 32 + 32 mixed | unconstrained half | {b['mixed']['plain_ms']:.2f} | "
        f"{100 * (b['mixed']['plain_ms'] / plain - 1):+.1f}% |",
        f"| 32 + 32 mixed | constrained half | {b['mixed']['constrained_ms']:.2f} | "
        f"{100 * (b['mixed']['constrained_ms'] / plain - 1):+.1f}% |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", type=Path, default=None, help="default: the 8B Llama-3 shape (dummy)")
    p.add_argument("--extra", default="", help="more serve flags, space-separated")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = (args.model or prepare_model_dir(args.out)).resolve()
    flags = ["--load-format", "dummy", "--dtype", "bfloat16", "--device", args.device]
    flags += ["--json-whitespace", "compact", *args.extra.split()]
    server = LocalServer(
        model_dir, (args.out / "server-constrained.log").resolve(), *flags, start_timeout=900
    )
    try:
        result = {
            "environment": environment() if args.device == "cuda" else {},
            **measure(server.address, args.repeats),
        }
    finally:
        server.stop()
    (args.out / "bench-constrained.json").write_text(json.dumps(result, indent=2))
    md = render(result)
    (args.out / "bench-constrained.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
