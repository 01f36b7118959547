"""Measures a running OpenAI-compatible server (standard library only):
decode tok/s at several batch sizes and prefill tok/s of long prompts.

    python3 client.py http://127.0.0.1:8000 MODEL VOCAB [--batches 1,16,64]
        [--tokens 128] [--prefill 2048]

Prompts are random token ids, so any tokenizer will do; `ignore_eos` makes
every request generate exactly --tokens tokens. Prints one JSON line.
"""
import argparse
import http.client
import json
import random
import threading
import time
from urllib.parse import urlparse


def stream(base, model, prompt, max_tokens):
    """One streamed completion: (sent, first token, last token, tokens)."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    first = last = None
    tokens = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        now = time.perf_counter()
        if chunk.get("choices"):
            first = first or now
            last = now
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return sent, first, last, tokens


def concurrent(base, model, prompts, max_tokens):
    results = [None] * len(prompts)

    def run(i):
        results[i] = stream(base, model, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if any(r is None for r in results):
        raise RuntimeError("a request failed")
    return results, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("model")
    ap.add_argument("vocab", type=int)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--prefill-runs", type=int, default=3)
    a = ap.parse_args()
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, a.vocab) for _ in range(n)]
    out = {}
    # Warm-up: first launches load kernels and grow the allocator's pools.
    concurrent(a.base, a.model, [ids(32) for _ in range(4)], 8)
    for b in [int(x) for x in a.batches.split(",")]:
        results, wall = concurrent(a.base, a.model, [ids(32) for _ in range(b)], a.tokens)
        total = sum(r[3] for r in results)
        out[f"batch{b}_tok_s"] = total / wall
        if b == 1:
            _, first, last, n = results[0]
            out["batch1_decode_tok_s"] = (n - 1) / (last - first)
            out["batch1_itl_ms"] = 1000 * (last - first) / (n - 1)
    ttfts = []
    for _ in range(a.prefill_runs):
        sent, first, _, _ = stream(a.base, a.model, ids(a.prefill), 1)
        ttfts.append(first - sent)
    if ttfts:
        ttft = sorted(ttfts)[len(ttfts) // 2]
        out[f"prefill{a.prefill}_tok_s"] = a.prefill / ttft
        out[f"prefill{a.prefill}_ttft_ms"] = 1000 * ttft
    print(json.dumps(out))


if __name__ == "__main__":
    main()
