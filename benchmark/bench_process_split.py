"""Process layout, measured. `droidspeak serve` runs the scheduler in a background
thread of the HTTP process; SGLang splits the HTTP server + tokenizer, the
scheduler and the detokenizer into processes that talk over sockets. This
benchmark serves the same streaming load (bench_serving's prompts and clients)
through both layouts in one run:

  thread   `droidspeak serve` as shipped.
  process  a two-process split built from the same engine here: the HTTP process
           (FastAPI + uvicorn, the same SSE shape) tokenizes and streams; the
           scheduler process owns the Engine, steps it and sends every step's
           outputs (cumulative text, ids, finish) back over a pipe, as SGLang's
           scheduler and detokenizer send theirs over ZMQ.

  thread-lean  control: the prototype's lean handler in front of the shipped
           thread layout, to separate the two effects.

The split moves the HTTP/JSON work off the scheduler's GIL and pays for pickling
each step's outputs across processes; on 2 cores this says which one wins.

    python benchmark/bench_process_split.py [--num-requests 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import threading

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from bench_serving import free_port, make_prompts, run_load, start_http, start_server
from common import print_table, write_json


def lean_app() -> FastAPI:
    """The prototype servers' app: /health, and /generate added by each layout."""
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {}
    return app


# ---- the split prototype: scheduler process ----------------------------------------
def scheduler_process(inbox, outbox, model_path: str, max_total_tokens: int) -> None:
    from droidspeak.engine.engine import Engine
    engine = Engine(model_path, max_total_tokens=max_total_tokens)
    scheduler = engine.scheduler
    outbox.send("ready")
    while True:
        if inbox.poll(0 if scheduler.has_work else 0.05):
            while True:
                msg = inbox.recv()
                if msg is None:
                    return
                kind, payload = msg
                if kind == "add":
                    rid, ids, params = payload
                    reqs, _ = engine.make_requests(input_ids=ids, sampling_params=params, rid=rid, stream=True)
                    for r in reqs:
                        scheduler.enqueue(r)
                else:
                    scheduler.abort_request(payload)
                if not inbox.poll(0):
                    break
        if not scheduler.has_work:
            continue
        batch = []
        for out in scheduler.step():
            r = out.req
            batch.append((r.rid, r.output_text, list(r.output_ids), out.finished,
                          r.finish_reason.to_dict() if r.finish_reason else None, len(r.origin_input_ids)))
        if batch:
            outbox.send(batch)


# ---- the split prototype: HTTP process ---------------------------------------------
def serve_split(port: int, model_path: str, max_total_tokens: int) -> None:
    from droidspeak.tokenizer.tokenizer import load_tokenizer

    ctx = mp.get_context("spawn")
    sched_in, to_sched = ctx.Pipe(duplex=False)     # (receiving end, sending end)
    from_sched, sched_out = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=scheduler_process, args=(sched_in, sched_out, model_path, max_total_tokens),
                       daemon=True)
    proc.start()
    assert from_sched.recv() == "ready"
    tokenizer = load_tokenizer(model_path)
    streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
    send_lock = threading.Lock()
    app = lean_app()

    def reader() -> None:
        while True:
            try:
                batch = from_sched.recv()
            except EOFError:
                return
            for item in batch:
                entry = streams.get(item[0])
                if entry is not None:
                    entry[0].call_soon_threadsafe(entry[1].put_nowait, item)

    threading.Thread(target=reader, daemon=True).start()

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        rid = os.urandom(8).hex()
        ids = tokenizer.encode(body["text"])
        queue: asyncio.Queue = asyncio.Queue()
        streams[rid] = (asyncio.get_running_loop(), queue)
        with send_lock:
            to_sched.send(("add", (rid, ids, body.get("sampling_params") or {})))

        async def events():
            try:
                while True:
                    _, text, out_ids, finished, reason, prompt_len = await queue.get()
                    result = {"text": text, "output_ids": out_ids,
                              "meta_info": {"id": rid, "finish_reason": reason, "prompt_tokens": prompt_len,
                                            "completion_tokens": len(out_ids)}}
                    yield f"data: {json.dumps(result)}\n\n"
                    if finished:
                        break
                yield "data: [DONE]\n\n"
            finally:
                streams.pop(rid, None)
        return StreamingResponse(events(), media_type="text/event-stream")

    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    finally:
        to_sched.send(None)
        proc.join(timeout=10)


# ---- control: the same lean HTTP handler over droidspeak's thread layout ----------
def serve_lean(port: int, model_path: str, max_total_tokens: int) -> None:
    """The split prototype's handler (no request models, metrics or logging) in
    front of the shipped AsyncEngine: separates what the process split buys from
    what the prototype's leaner handler buys."""
    from droidspeak.engine.engine import Engine
    from droidspeak.server.async_engine import AsyncEngine

    aengine = AsyncEngine(factory=lambda: Engine(model_path, max_total_tokens=max_total_tokens))
    aengine.start()
    app = lean_app()

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        reqs, _ = aengine.engine.make_requests(body["text"], body.get("sampling_params") or {}, stream=True)

        async def events():
            async for _, result, _ in aengine.generate(reqs, {"tokenizer": aengine.engine.tokenizer}):
                yield f"data: {json.dumps(result)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    finally:
        aengine.shutdown()


def start_split(model_path: str, max_total_tokens: int, mode: str = "--serve-split") -> tuple[subprocess.Popen, str]:
    port = free_port()
    return start_http([sys.executable, __file__, mode, str(port), "--model-path", model_path,
                       "--max-total-tokens", str(max_total_tokens)], port)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternate the layouts this many times (this VM's timings drift)")
    parser.add_argument("--layouts", nargs="*", default=["thread", "thread-lean", "process"],
                        choices=["thread", "thread-lean", "process"])
    parser.add_argument("--serve-split", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-lean", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--max-total-tokens", type=int, default=100000)
    args = parser.parse_args()
    if args.serve_split is not None:
        serve_split(args.serve_split, args.model_path, args.max_total_tokens)
        return
    if args.serve_lean is not None:
        serve_lean(args.serve_lean, args.model_path, args.max_total_tokens)
        return
    from droidspeak.models.default_model import prepare_default_model
    model_path = args.model_path or prepare_default_model()
    warmup = make_prompts(2, seed=1)
    rows = []
    layouts = (("thread", lambda: start_server(["--model-path", model_path, "--max-total-tokens",
                                                                  str(args.max_total_tokens)])),
               ("thread-lean", lambda: start_split(model_path, args.max_total_tokens, "--serve-lean")),
               ("process", lambda: start_split(model_path, args.max_total_tokens)))
    names = {"thread": "thread (droidspeak serve)", "thread-lean": "thread, prototype's lean handler",
             "process": "process split (HTTP | scheduler)"}
    for repeat in range(args.repeats):
        for layout, start in layouts:
            if layout not in args.layouts:
                continue
            proc, url = start()
            try:
                asyncio.run(run_load(url, warmup, 1, None))
                for c in args.concurrency:
                    # fresh prompts per load (seeded by the concurrency, the same for
                    # every layout): nothing is served from the prefix cache
                    rows.append({"layout": names[layout], "load": f"concurrency {c}", "repeat": repeat,
                                 **asyncio.run(run_load(url, make_prompts(args.num_requests, seed=100 + c),
                                                        c, None))})
                    print(rows[-1], flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    summary = []
    for layout in args.layouts:
        for c in args.concurrency:
            runs = [r for r in rows if r["layout"] == names[layout] and r["load"] == f"concurrency {c}"]
            summary.append({"layout": names[layout], "load": f"concurrency {c}", "runs": len(runs),
                            **{k: statistics.median(r[k] for r in runs)
                               for k in ("req_s", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                                         "itl_p99_ms", "e2e_p50_s")}})
    print_table(rows, ["layout", "load", "repeat", "req_s", "out_tok_s", "ttft_p50_ms", "itl_p50_ms", "e2e_p50_s"])
    print("medians:")
    print_table(summary, ["layout", "load", "runs", "req_s", "out_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                          "itl_p99_ms", "e2e_p50_s"])
    write_json("bench_process_split", {"model": "SmolLM2-135M-Instruct", "num_requests": args.num_requests,
                                       "repeats": args.repeats, "medians": summary, "rows": rows})


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
