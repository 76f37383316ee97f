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


def _random_norms(model):
    with torch.no_grad():  # random norms and biases, so a mix-up of either would show
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def hf_qwen2(vocab: int, kv_heads: int = 2, tie: bool = False):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return _random_norms(transformers.Qwen2ForCausalLM(cfg).eval())


def hf_gpt_neox(vocab: int, parallel: bool = True, rotary_pct: float = 0.25, act: str = "gelu"):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        rotary_pct=rotary_pct,
        rotary_emb_base=10000,
        use_parallel_residual=parallel,
        hidden_act=act,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return _random_norms(transformers.GPTNeoXForCausalLM(cfg).eval())


def llama3_style_tokenizer(
    vocab_size: int, special_tokens: list[str], text_chars: int, split: str | None = None
):
    """A `tokenizers` BPE shaped like Llama 3's: its split regex (`split`, default Atlas's
    copy of it), then byte-level with no regex of its own, trained on `text_chars` of
    standard-library text."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from atlas_server.gguf_export import LLAMA3_SPLIT_PATTERN
    from atlas_server.tokenizer.corpus import stdlib_sample

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split or LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_sample(text_chars), trainer)
    return tok
