"""The architecture's own class with plain dense weights: what a delta method assembles (the base
plus the decoded delta), loadable with ``from_pretrained`` and no remote code.

``assemble`` treats a family with ``NATIVE = True`` this way: the snapshot's ``config.json``
(``write_config``), keys checked against ``expected_keys``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILY = "dense"
NATIVE = True


def write_config(snapshot: Path, target: Path, extra: Mapping[str, Any]) -> None:
    data = json.loads((snapshot / "config.json").read_text())
    data.update(extra)
    (target / "config.json").write_text(json.dumps(data, indent=1, sort_keys=True))


def expected_keys(target: Path) -> set[str]:
    """The checkpoint keys of the architecture's class (a meta-device instance; a tied head left out)."""
    config = AutoConfig.from_pretrained(target)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    keys = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        keys -= {k for k in keys if k.endswith("lm_head.weight")}
    return keys
