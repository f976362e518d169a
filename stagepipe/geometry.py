"""The one derivation of a decoder block's shapes from a model config: the sizes every stage, the
plan, the accounting and MoDeGPT's structured blocks read (an HF config, or a ``shape_hint``
made into one, so the plan needs no model).

Linear names follow the architecture: Llama-family blocks (``llama``, ``mistral``, ``qwen2``, and a
config without a ``model_type``: a shape hint) have ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``; GPT-2 blocks ``attn.c_attn`` (q, k and v in one), ``attn.c_proj``,
``mlp.c_fc`` and ``mlp.c_proj``. Shapes are (out, in) = (m, n), as ``layout.weight_matrix`` gives
them (GPT-2's ``Conv1D`` stores the transpose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockGeometry:
    d: int  # hidden size
    ff: int  # MLP intermediate size
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    model_type: str = ""

    @classmethod
    def of(cls, config: Any) -> BlockGeometry:
        d = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
        return cls(d=d, ff=int(ff), layers=int(config.num_hidden_layers), heads=heads,
                   kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(config, "head_dim", None) or d // heads), vocab=int(config.vocab_size),
                   tied=bool(getattr(config, "tie_word_embeddings", False)), model_type=getattr(config, "model_type", "") or "")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(m, n) of every linear of one block, by name relative to the block, in forward order."""
        d, ff = self.d, self.ff
        if self.model_type == "gpt2":
            return {"attn.c_attn": (3 * d, d), "attn.c_proj": (d, d), "mlp.c_fc": (ff, d), "mlp.c_proj": (d, ff)}
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                "self_attn.o_proj": (d, q), "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}

    @property
    def linears(self) -> list[tuple[int, int]]:
        return list(self.linear_shapes().values())

    @property
    def block(self) -> int:
        """Weights of one block's linears."""
        return sum(m * n for m, n in self.linears)

    @property
    def embed(self) -> int:
        """Embedding (and, untied, LM head) weights."""
        return self.vocab * self.d * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.block + self.embed
