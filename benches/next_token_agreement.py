#!/usr/bin/env python3
"""How often two OpenAI-compatible servers pick the same next token.

The reference server writes a greedy continuation of each prompt; then, at
every position of it, both servers are asked for the next token after the
prompt and the continuation so far (teacher forcing, so one early
difference does not derail the rest). Prints the share of positions where
their greedy tokens agree and the mean gap between the logprobs the two
give the reference's pick. Use it to see what a setting costs in accuracy, for
instance `--kv-cache-dtype fp8` against `bfloat16` on the same model:

    python3 benches/next_token_agreement.py --reference http://127.0.0.1:8001 \\
        --test http://127.0.0.1:8002 --prompts benches/prompts/edit-tasks.jsonl

Standard library only. Both servers must serve the same tokenizer, take
token-id prompts and return `logprobs` on /v1/completions, and the
reference must answer /tokenize (strata and vLLM do).
"""

import argparse
import json
import urllib.request


def post(url, path, body):
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def complete(url, prompt, max_tokens):
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 5,
        "ignore_eos": True,  # EOS counts as a token to compare
    }
    return post(url, "/v1/completions", body)["choices"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="base URL of the reference server")
    ap.add_argument("--test", required=True, help="base URL of the server under test")
    ap.add_argument("--prompts", required=True, help='JSONL file, {"prompt": ...} per line')
    ap.add_argument("--tokens", type=int, default=64, help="continuation length per prompt")
    args = ap.parse_args()

    agree = total = 0
    gaps = []
    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    for text in prompts:
        prompt = post(args.reference, "/tokenize", {"prompt": text})["tokens"]
        cont = complete(args.reference, prompt, args.tokens)["text"]
        forced = post(args.reference, "/tokenize", {"prompt": cont, "add_special_tokens": False})
        forced = forced["tokens"]
        for i in range(len(forced)):
            ids = prompt + forced[:i]
            ref = complete(args.reference, ids, 1)["logprobs"]
            got = complete(args.test, ids, 1)["logprobs"]
            total += 1
            agree += ref["tokens"][0] == got["tokens"][0]
            # The gap between the logprobs the two give the reference's
            # pick, where the test ranks it in its top 5.
            pick = ref["tokens"][0]
            if pick in got["top_logprobs"][0]:
                gaps.append(abs(got["top_logprobs"][0][pick] - ref["token_logprobs"][0]))
    print(f"positions: {total}")
    print(f"same greedy token: {agree / total:.1%} ({agree} of {total})")
    if gaps:
        mean = sum(gaps) / len(gaps)
        print(f"mean |logprob gap| on the reference's pick: {mean:.4f} ({len(gaps)} positions)")


if __name__ == "__main__":
    main()
