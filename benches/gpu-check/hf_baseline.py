"""The side-by-side baseline: PyTorch/transformers `generate` on the same
weights and card, and the card's device-to-device copy bandwidth (the HBM
roofline's denominator).

    python3 hf_baseline.py MODEL_DIR [--batches 1,16,64] [--tokens 128] [--prefill 2048]

Prints one JSON line.
"""
import argparse
import json
import time

import torch


def bandwidth():
    """Bytes/s of a large device-to-device copy (each byte read and written)."""
    n = 4 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * n * reps / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--skip-generate", action="store_true")
    a = ap.parse_args()
    out = {"card": torch.cuda.get_device_name(0), "copy_bandwidth_GBps": bandwidth() / 1e9}
    if a.skip_generate:
        print(json.dumps(out))
        return
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        a.model, torch_dtype=torch.bfloat16, device_map="cuda", attn_implementation="sdpa"
    ).eval()
    out["hf_load_s"] = time.perf_counter() - t
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for b in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(3, vocab, (b, 32), device="cuda", generator=g)
            kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, **kw)
            torch.cuda.synchronize()
            out[f"hf_batch{b}_tok_s"] = b * a.tokens / (time.perf_counter() - t)
        ids = torch.randint(3, vocab, (1, a.prefill), device="cuda", generator=g)
        model(ids)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        out[f"hf_prefill{a.prefill}_tok_s"] = a.prefill / (time.perf_counter() - t)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
