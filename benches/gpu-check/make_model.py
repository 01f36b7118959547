"""Random-weight bf16 safetensors with Llama-3.1-8B's shapes, made on the GPU
machine (nothing large is copied there), plus a config.json and a word-level
tokenizer over the same 128,256-token vocabulary.

    python3 make_model.py OUT_DIR

Weights are N(0, 0.02) (RMSNorm weights 1), sharded ~4 GiB per file with an
index, as Hugging Face saves them. Prints the weight bytes.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 32, 8, 128256
HEAD_DIM = HIDDEN // HEADS


def shapes():
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (HIDDEN,)
        yield f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)
        yield f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)
        yield f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)
        yield f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)
        yield f"{p}.post_attention_layernorm.weight", (HIDDEN,)
        yield f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)
        yield f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)
        yield f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def main(out):
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shard, shard_bytes, index, n, total = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
            for k in shard:
                index[k] = name
            shard, shard_bytes = {}, 0

    for name, shape in shapes():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        shard[name] = t
        shard_bytes += t.numel() * 2
        total += t.numel() * 2
        if shard_bytes >= 4 << 30:
            flush()
    flush()
    # Hugging Face names the shards model-0000i-of-0000N.
    files = sorted(set(index.values()))
    renamed = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old, new in renamed.items():
        os.rename(os.path.join(out, old), os.path.join(out, new))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in index.items()}}, f)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    # A word-level tokenizer: token i is the word "w<i>".
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    print(total)


if __name__ == "__main__":
    main(sys.argv[1])
