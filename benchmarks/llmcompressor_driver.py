"""Run llm-compressor's GPTQModifier on a model directory with given calibration windows (issue #33).

Runs in llm-compressor's own environment (it pins transformers 5.17 and compressed-tensors 0.19, so it
cannot share stagepipe's): ``benchmarks/llmcompressor_gptq.py`` calls it with

    <venv>/bin/python benchmarks/llmcompressor_driver.py MODEL_DIR CALIB.pt OUT_DIR BITS GROUP DAMP

``CALIB.pt`` holds the n × T token ids stagepipe calibrated on; ``GROUP`` 0 is per channel. Writes the
compressed model to ``OUT_DIR`` and ``OUT_DIR/timing.json`` (seconds inside ``oneshot``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, calibration, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    bits, group, damp = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    torch.set_num_threads(int(sys.argv[7]) if len(sys.argv) > 7 else torch.get_num_threads())
    ids = torch.load(calibration)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group" if group else "channel",
               "group_size": group or None, "actorder": None}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                          dampening_frac=damp, block_size=128, actorder=None)
    started = time.time()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False)
    seconds = time.time() - started
    model.save_pretrained(out, save_compressed=True)
    (out / "timing.json").write_text(json.dumps({"oneshot_seconds": seconds, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
