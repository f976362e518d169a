"""Honest perplexity, tested directly: known values, HF's own loss, non-finite windows, batching."""

from __future__ import annotations

import math

import numpy as np
import torch

from stagepipe.config import TinyModel
from stagepipe.models.tiny import build_tiny
from stagepipe.perplexity import perplexity

CPU = torch.device("cpu")


class Fixed(torch.nn.Module):
    """A language model whose logits are a function of the input ids alone (no parameters learned)."""

    def __init__(self, vocab: int, poison: int | None = None) -> None:
        super().__init__()
        self.vocab, self.poison = vocab, poison
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.dummy
        if self.poison is not None:
            logits[input_ids[:, 0] == self.poison] = float("nan")
        return type("Out", (), {"logits": logits})()


def test_uniform_logits_give_the_vocabulary_size_and_count_every_token() -> None:
    windows = torch.randint(0, 50, (7, 12))
    result = perplexity(Fixed(50), windows, batch_size=3, device=CPU)
    assert math.isclose(result.ppl, 50.0, rel_tol=1e-6)  # log-softmax in fp32, sums in float64
    assert result.n_windows == 7 and result.n_tokens == 7 * 11 and result.n_nonfinite_windows == 0


def test_one_nan_window_makes_the_result_inf_and_is_counted() -> None:
    windows = torch.randint(1, 50, (5, 8))
    windows[3, 0] = 0  # this window's logits are NaN
    result = perplexity(Fixed(50, poison=0), windows, batch_size=2, device=CPU)
    assert math.isinf(result.ppl) and math.isinf(result.nll)
    assert result.n_nonfinite_windows == 1 and result.n_windows == 5 and result.n_tokens == 5 * 7


def test_equals_the_hugging_face_loss_and_does_not_depend_on_batch_size() -> None:
    model, _ = build_tiny(TinyModel(source="tiny", num_layers=2, hidden=32, intermediate=48, seed=3))
    windows = torch.randint(0, 250, (6, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # HF's labels= loss: token mean over all shifted positions of the batch
        reference = math.exp(float(model(input_ids=windows, labels=windows).loss))
    results = [perplexity(model, windows, batch_size=b, device=CPU).ppl for b in (1, 4, 6)]
    assert all(math.isclose(r, reference, rel_tol=1e-5) for r in results), (results, reference)
    assert max(results) - min(results) < 1e-9 * reference


def test_evaluation_windows_do_not_overlap_and_max_windows_takes_the_first(write_pipeline, tmp_path) -> None:
    from transformers import AutoTokenizer

    from stagepipe.config import load_pipeline
    from stagepipe.data.text import load_text
    from stagepipe.stagekit import artifacts
    from stagepipe.stages import make_runner

    def windows(max_windows):
        pipeline = write_pipeline(f"w{max_windows}", evaluation={"datasets": [{"name": "syn", "text": {
            "source": "synthetic", "n_words": 2000, "seed": 1}}], "seq_len": 16, "max_windows": max_windows})
        config = load_pipeline(pipeline)
        runner = make_runner(config, tmp_path / f"ws{max_windows}")
        runner.run(only={"snapshot", "tokenize"})
        states = {str(e.ref): e.state.output for e in runner.states()}
        tokenizer = AutoTokenizer.from_pretrained(artifacts.model_dir(states["snapshot@all"]))
        stream = tokenizer(load_text(config.evaluation.datasets[0].text)[0], add_special_tokens=False)["input_ids"]
        return artifacts.read_windows(states["tokenize@eval-syn"]).numpy(), np.asarray(stream)

    everything, stream = windows(None)
    first, _ = windows(3)
    n = len(stream) // 16
    assert everything.shape == (n, 16) and np.array_equal(everything.reshape(-1), stream[: n * 16])  # back to back
    assert np.array_equal(first, everything[:3])
