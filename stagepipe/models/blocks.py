"""Run a model one decoder block at a time from a local snapshot.

``BlockRunner`` builds the model with a *single* block slot per layer type (embeddings, rotary
tables, final norm and head are real; Gemma 3 has two types, sliding-window and global attention,
so two slots), loads the non-block weights from the snapshot, and then loads decoder block i into
the slot of its type on demand. Each slot's call arguments (rotary position embeddings, causal or
sliding-window mask, position ids) are captured once by a catcher in the slot, exactly as the full
model would pass them, so a block run here computes what it computes inside the full model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from stagepipe.errors import StagepipeError
from stagepipe.models.layout import Layout, layout_for
from stagepipe.models.sources import read_weights, weight_map


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("caught block inputs")
        self.args, self.kwargs = args, kwargs


class _Catcher(nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise _Caught(args, kwargs)


class _PassThrough(nn.Module):
    """Stands in for the slots before the one being caught: hands its hidden states on untouched
    (no block runs, no hook fires)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]


def slot_types(config: Any) -> list[str]:
    """The distinct layer types of ``config`` in order of first appearance (Gemma 3: sliding-window
    and global attention); one ``"full_attention"`` for an architecture without them."""
    return list(dict.fromkeys(getattr(config, "layer_types", None) or ["full_attention"]))


def block_type(block: nn.Module) -> str:
    """The layer type of a decoder block: ``sliding_attention`` when its attention is windowed."""
    return "sliding_attention" if getattr(getattr(block, "self_attn", None), "is_sliding", False) else "full_attention"


def _slot_config(config: Any) -> Any:
    """``config`` with one decoder block per layer type (slot j has type ``slot_types[j]``)."""
    one = copy.deepcopy(config)
    types = slot_types(config)
    if getattr(config, "layer_types", None) is not None:
        one.layer_types = types
    one.num_hidden_layers = len(types)
    return one


class BlockRunner:
    """Embeddings + head + one decoder-block slot, on ``device`` in ``dtype``."""

    def __init__(self, snapshot_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.snapshot_dir = Path(snapshot_dir)
        self.device, self.dtype = device, dtype
        self.config = AutoConfig.from_pretrained(self.snapshot_dir)
        self.layout: Layout = layout_for(self.config.model_type)
        self.num_layers = int(self.config.num_hidden_layers)
        self.weight_map = weight_map(self.snapshot_dir)
        with no_init_weights():  # every parameter is loaded below or by ``load_block``: random init is waste
            self.model = AutoModelForCausalLM.from_config(_slot_config(self.config), dtype=dtype)
        self.types = slot_types(self.config)
        self.layer_types = list(getattr(self.config, "layer_types", None) or self.types * self.num_layers)
        self.model.tie_weights()  # ``no_init_weights`` also skips the tying that initialisation does
        self.model.eval().requires_grad_(False).to(device)
        self._rest_loaded = False  # embeddings, final norm, head: read on first use (decompose never needs them)
        self._block_args: tuple | None = None
        self._block_kwargs: dict[str, dict] | None = None  # per layer type

    def _load_rest(self) -> None:
        """Read every tensor outside the decoder blocks (embeddings, final norm, head), once."""
        if self._rest_loaded:
            return
        rest = {k: v for k, v in self._read(lambda k: not k.startswith(self.layout.layers_path + ".")).items()}
        missing, unexpected = self.model.load_state_dict(rest, strict=False)
        missing = [k for k in missing if not k.startswith(self.layout.layers_path + ".") and not self._is_tied(k)]
        if missing or unexpected:
            raise StagepipeError(f"snapshot {self.snapshot_dir}: missing {missing[:3]} unexpected {unexpected[:3]}")
        self._rest_loaded = True

    # ------------------------------------------------------------------ weights
    def _is_tied(self, key: str) -> bool:
        head = self.model.get_output_embeddings()
        return bool(getattr(self.config, "tie_word_embeddings", False)) and head is not None and (
            key.endswith("lm_head.weight") and head.weight is self.model.get_input_embeddings().weight
        )

    def _read(self, wanted) -> dict[str, torch.Tensor]:
        return read_weights(self.snapshot_dir, [k for k in self.weight_map if wanted(k)], self.weight_map)

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors, keyed relative to the block."""
        prefix = self.layout.layer_prefix(index)
        return {k[len(prefix):]: v for k, v in self._read(lambda k: k.startswith(prefix)).items()}

    def slot(self, index: int) -> nn.Module:
        """The slot that runs block ``index`` (the one of its layer type)."""
        return self.model.get_submodule(self.layout.layers_path)[self.types.index(self.layer_types[index])]

    def load_block(self, index: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Put block ``index`` (or the given block-relative ``state``) into its slot and return it."""
        state = self.block_state(index) if state is None else state
        slot = self.slot(index)
        slot.load_state_dict(state, strict=True)
        return slot

    # ------------------------------------------------------------------ execution
    def _capture_block_inputs(self, input_ids: torch.Tensor, slot: int = 0) -> tuple[torch.Tensor, tuple, dict]:
        """(hidden states, args, kwargs) the model passes to its block ``slot`` (slot 0's hidden
        states are the embeddings; a later slot is caught only for its arguments)."""
        self._load_rest()
        layers = self.model.get_submodule(self.layout.layers_path)
        blocks = list(layers[: slot + 1])
        for j in range(slot):
            layers[j] = _PassThrough()
        layers[slot] = _Catcher()
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _Caught as caught:
            hidden, args, kwargs = caught.args[0], caught.args[1:], caught.kwargs
        else:
            raise StagepipeError("the model never called its first decoder block")
        finally:
            for j, block in enumerate(blocks):
                layers[j] = block
        if "hidden_states" in kwargs:  # blocks called with keyword hidden states
            hidden = kwargs.pop("hidden_states")
        return hidden, args, kwargs

    @torch.no_grad()
    def prepare(self, input_ids: torch.Tensor) -> None:
        """Capture the block call arguments (rotary tables, mask) for windows of this length."""
        if self._block_kwargs is None:
            caught = [self._capture_block_inputs(input_ids[:1], j) for j in range(len(self.types))]
            self._block_args = caught[0][1]
            self._block_kwargs = {t: kwargs for t, (_, _, kwargs) in zip(self.types, caught, strict=True)}

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Inputs of decoder block 0 for a batch of equal-length windows."""
        self.prepare(input_ids)
        hidden, _, _ = self._capture_block_inputs(input_ids)
        return hidden

    def run_block(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One block's output for a batch of block inputs (autograd follows the caller's mode)."""
        if self._block_kwargs is None:
            raise StagepipeError("call prepare() or embed() before run_block()")
        kwargs = self._block_kwargs[block_type(block)] if len(self._block_kwargs) > 1 else next(iter(self._block_kwargs.values()))
        out = block(hidden.to(self.device, self.dtype), *self._block_args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._load_rest()
        norm = self.model.get_submodule(self.layout.final_norm_path)
        logits = self.model.get_output_embeddings()(norm(hidden.to(self.device, self.dtype)))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap  # as the model's head does (Gemma 2)

    def window_losses(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                      sample_from: torch.Generator | None = None) -> torch.Tensor:
        """Mean next-token NLL of each window (float32), from the last block's output.

        With ``sample_from`` the targets are drawn from the model's own predictive distribution
        instead of the text's next tokens, so gradients of this loss give the true Fisher (the
        expected Hessian of the NLL) rather than the empirical Fisher.
        """
        logits = self.logits(hidden).float()
        targets = input_ids.to(self.device)[:, 1:]
        if sample_from is not None:
            probs = torch.softmax(logits[:, :-1].detach(), dim=-1).reshape(-1, logits.shape[-1]).cpu()
            targets = torch.multinomial(probs, 1, generator=sample_from).view(targets.shape).to(self.device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        )
        return nll.view(targets.shape).mean(dim=1)
