"""Tiny random-weight Hugging Face models that Atlas's import and CUDA tests compare against.

Kept apart from the test modules so that a test needing only these (tests/test_cuda.py on a
GPU machine) does not import the CLI with them. transformers is imported when called.
"""

from __future__ import annotations

import torch


def hf_gpt2(vocab: int, tie: bool = True):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tie,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(vocab: int, kv_heads: int = 2, tie: bool = False):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a mix-up of norm weights would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model
