"""Shape-based resource estimates for each stage (order-of-magnitude planning, not a promise)."""

from __future__ import annotations

from dataclasses import dataclass

from stagepipe.config import PipelineConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Estimate:
    stage: str
    disk: float
    ram: float
    gpu: float
    note: str = ""


def estimate(config: PipelineConfig, model_config) -> list[Estimate]:
    d = int(model_config.hidden_size)
    ff = int(getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None) or 4 * d)
    layers = int(model_config.num_hidden_layers)
    vocab = int(model_config.vocab_size)
    heads = int(model_config.num_attention_heads)
    kv = int(getattr(model_config, "num_key_value_heads", heads) or heads)
    kv_dim = d // heads * kv
    w = BYTES[config.model.dtype]
    act = BYTES[config.runtime.activation_dtype]
    shapes = [(d, d), (kv_dim, d), (kv_dim, d), (d, d), (ff, d), (ff, d), (d, ff)]
    block = sum(m * n for m, n in shapes)
    embed = vocab * d * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    params = layers * block + embed
    k, t, b = config.calibration.n_samples, config.calibration.seq_len, config.runtime.batch_size
    on_gpu = config.model.device != "cpu"
    hidden = k * t * d * act
    grams = (d * d * 3 + ff * ff) * 8  # distinct inputs: attn-in, o-in, mlp-in, down-in
    batch_act = b * t * (3 * d + 2 * ff) * 4
    rows = [
        Estimate("snapshot", params * w, params * w * 2, 0, f"{params / 1e9:.2f} B parameters"),
        Estimate("tokenize", k * t * 8, k * t * 8, 0),
        Estimate("capture", layers * (hidden + grams), block * w + embed * w + batch_act + grams,
                 (block * w + batch_act + grams) if on_gpu else 0, f"{layers} × block inputs {hidden / 2**20:.0f} MB"),
    ]
    method = config.method
    if method.name == "gfwsvd":
        factors = sum(m * m + n * n for m, n in shapes) * 8
        stored = k * block * 4
        mode = method.mode if method.mode != "auto" else ("stored" if stored <= method.memory_budget_gb * 2**30 else "streaming")
        ram = block * w + embed * w + 4 * batch_act + factors * 3 + (stored if mode == "stored" else 0)
        gpu = (block * w + 4 * batch_act + factors * 3) if on_gpu else 0
        rows.append(Estimate("fisher", layers * (hidden + factors), ram, gpu,
                             f"{mode} gradients; {2 * method.max_sweeps} passes max per layer"))
    else:
        rows.append(Estimate("fisher", 0, 0, 0, "no-op for this method"))
    factor_bytes = sum((m + n) * min(m, n) * 4 + min(m, n) * 8 for m, n in shapes)
    svd_ram = 8 * 8 * max(ff, d) ** 2
    rows += [
        Estimate("decompose", layers * factor_bytes, block * w + embed * w + svd_ram, svd_ram if on_gpu else 0,
                 "float64 eigh + SVD of the largest matrix"),
    ]
    if config.allocation.policy == "asvd_search":
        alloc = config.allocation
        windows = min(alloc.sensitivity_windows or k, k)
        state = windows * t * d * 4
        configs = 1 + len(shapes) * len(alloc.candidates)
        held = min(configs * state, max(state, alloc.sensitivity_memory_gb * 2**30))
        ram = block * 4 + embed * 4 + held + batch_act
        runs = configs * layers * (layers + 1) // 2
        rows.append(Estimate("sensitivity", layers * 1e5, ram, ram - embed * 4 if on_gpu else 0,
                             f"≤ {configs} perplexities per layer; ≤ {runs} block passes of {windows} windows in all"))
    rows += [
        Estimate("allocate", 1e6, layers * sum(min(m, n) for m, n in shapes) * 8, 0),
    ]
    if method.name == "ressvd":
        rank_bytes = sum((m + n) * m * n / (m + n) * config.target.kept_fraction * 4 for m, n in shapes)
        rows.append(Estimate("residual", layers * rank_bytes, block * w + embed * w + svd_ram, svd_ram if on_gpu else 0,
                             "two SVDs per matrix at the allocated rank"))
    rows += [
        Estimate("assemble", params * w * config.target.kept_fraction, block * 4 * 3, 0),
        Estimate("evaluate", 1e5, params * 4 * 2, params * 4 if on_gpu else 0, "full model in fp32"),
    ]
    return rows
