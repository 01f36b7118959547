#!/usr/bin/env python3
"""A random-weight DeepSeek-V3-shaped checkpoint sized for a CPU, in
DeepSeek's FP8 layout, for benchmarking strata's MLA and mixture of experts.

Usage:  python benches/make_moe_model.py OUT_DIR   (needs torch, safetensors)

About 0.9 B parameters: 16 layers (the first dense), hidden 1024, 16 heads
of MLA (q_lora_rank 384, kv_lora_rank 256, nope 64 / rope 32 / v 64), 64
routed experts of width 256 in 8 groups with 8 active (top-4 groups), one
shared expert, vocab 320 with the tiny DeepSeek chat folder's tokenizer.
Every linear weight of the layers but the router is float8_e4m3fn with an
f32 scale per 128x128 block. The weights are noise: the figures are speed,
not text.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

OUT = sys.argv[1]
HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = os.path.join(HERE, "..", "tests", "fixtures", "tiny", "deepseek-chat")
BLOCK = 128

CFG = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
    vocab_size=320, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
    scoring_func="sigmoid", topk_method="noaux_tc", hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, rope_interleave=True,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                             weight_block_size=[BLOCK, BLOCK]),
)


def fp8(w):
    """(float8 weight, f32 scale per block) for a 2-D f32 weight."""
    r, c = w.shape
    pr, pc = -r % BLOCK, -c % BLOCK
    p = torch.nn.functional.pad(w, (0, pc, 0, pr))
    blocks = p.reshape((r + pr) // BLOCK, BLOCK, (c + pc) // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(r + pr, c + pc)[:r, :c]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.float().contiguous()


def main():
    g = torch.Generator().manual_seed(0)
    c = CFG
    h = c["hidden_size"]
    t = {}

    def dense(name, rows, cols, std=0.02):
        t[name] = (torch.randn(rows, cols, generator=g) * std).to(torch.bfloat16)

    def linear(name, rows, cols, std=0.02):
        q, s = fp8(torch.randn(rows, cols, generator=g) * std)
        t[name + ".weight"], t[name + ".weight_scale_inv"] = q, s

    def norm(name, n):
        t[name + ".weight"] = torch.ones(n, dtype=torch.bfloat16)

    heads, qk = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    dense("model.embed_tokens.weight", c["vocab_size"], h, 1.0)
    dense("lm_head.weight", c["vocab_size"], h)
    norm("model.norm", h)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}"
        norm(f"{p}.input_layernorm", h)
        norm(f"{p}.post_attention_layernorm", h)
        a = f"{p}.self_attn"
        linear(f"{a}.q_a_proj", c["q_lora_rank"], h)
        norm(f"{a}.q_a_layernorm", c["q_lora_rank"])
        linear(f"{a}.q_b_proj", heads * qk, c["q_lora_rank"])
        linear(f"{a}.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h)
        norm(f"{a}.kv_a_layernorm", c["kv_lora_rank"])
        linear(f"{a}.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
        linear(f"{a}.o_proj", h, heads * c["v_head_dim"])
        m = f"{p}.mlp"
        if l < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            linear(f"{m}.gate_proj", inter, h)
            linear(f"{m}.up_proj", inter, h)
            linear(f"{m}.down_proj", h, inter)
            continue
        inter = c["moe_intermediate_size"]
        t[f"{m}.gate.weight"] = (torch.randn(c["n_routed_experts"], h, generator=g) * 0.02).float()
        t[f"{m}.gate.e_score_correction_bias"] = torch.zeros(c["n_routed_experts"])
        for e in range(c["n_routed_experts"]):
            linear(f"{m}.experts.{e}.gate_proj", inter, h)
            linear(f"{m}.experts.{e}.up_proj", inter, h)
            linear(f"{m}.experts.{e}.down_proj", h, inter)
        shared = inter * c["n_shared_experts"]
        linear(f"{m}.shared_experts.gate_proj", shared, h)
        linear(f"{m}.shared_experts.up_proj", shared, h)
        linear(f"{m}.shared_experts.down_proj", h, shared)
    os.makedirs(OUT, exist_ok=True)
    save_file(t, os.path.join(OUT, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(os.path.join(CHAT, name), OUT)
    params = sum(x.numel() for k, x in t.items() if not k.endswith("_scale_inv"))
    print(f"{OUT}: {params / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
