"""Tiny randomly initialised models with a byte-level tokenizer, built offline in milliseconds.

They prove the plumbing (shapes, GQA, Conv1D transposes, resumability), never compression quality.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from stagepipe.config import TinyModel

SPECIALS = ["<s>", "</s>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus BOS/EOS: any text round-trips, no training, no download."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def build_tiny(spec: TinyModel) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(spec.seed)
    if spec.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_positions,
            tie_word_embeddings=False, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
            initializer_range=spec.init_std,
        )
        model = LlamaForCausalLM(config)
    elif spec.arch == "gemma3":  # Gemma 3's block: sliding-window layers then a global one, tied embeddings
        config = Gemma3TextConfig(
            vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, head_dim=spec.hidden // spec.num_heads,
            max_position_embeddings=spec.max_positions, sliding_window=16,
            layer_types=["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(spec.num_layers)],
            tie_word_embeddings=True, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=None,
            initializer_range=spec.init_std,
        )
        model = Gemma3ForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=vocab, n_embd=spec.hidden, n_inner=spec.intermediate, n_layer=spec.num_layers,
            n_head=spec.num_heads, n_positions=spec.max_positions, bos_token_id=vocab - 2,
            eos_token_id=vocab - 1, initializer_range=spec.init_std,
        )
        model = GPT2LMHeadModel(config)
    return model.eval(), tokenizer
