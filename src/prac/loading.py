"""Loading models and tokenizers from a folder or the Hugging Face hub, and choosing devices."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from prac.errors import PracError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` → first CUDA device if there is one, else CPU; ``cpu``, ``cuda``, ``cuda:i`` as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise PracError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:i") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PracError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PracError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    return device


def check_model_source(path_or_id: str) -> None:
    """Fail fast, before any heavy import or download, on a path that is clearly not a model."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PracError(f"model path {path_or_id!r} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise PracError(f"model path {path_or_id!r} is not a model: it has no config.json")
        return
    looks_local = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1
    if looks_local or not _HUB_ID.match(path_or_id):
        raise PracError(f"model path {path_or_id!r} does not exist (and is not a hub id like org/name)")


def _dtype(spec: str):
    if spec == "auto":
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if spec not in table:
        raise PracError(f"unknown dtype {spec!r}: use auto, float32, float16 or bfloat16")
    return table[spec]


def is_causal_lm_config(config) -> bool:
    """True when the config maps to a causal-LM head class (else the model loads with AutoModel)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if archs:
        return False
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def load_model(path_or_id: str, dtype: str = "auto") -> torch.nn.Module:
    """Load a model on the CPU in eval mode; causal LMs with their head, encoders with ``AutoModel``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    check_model_source(path_or_id)
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError, KeyError) as exc:
        raise PracError(f"could not load a model config from {path_or_id!r}: {_first_line(exc)}") from exc
    auto_cls = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModel
    try:
        model = auto_cls.from_pretrained(path_or_id, dtype=_dtype(dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise PracError(f"could not load model {path_or_id!r}: {_first_line(exc)}") from exc
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PracError(f"could not load a tokenizer from {path_or_id!r}: {_first_line(exc)}") from exc


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
