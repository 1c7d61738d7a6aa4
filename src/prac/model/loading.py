"""Loading models and tokenizers from a folder, a GGUF file or the Hugging Face hub, and choosing devices."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch

from prac.core.errors import PracError

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


def gguf_file(path_or_id: str) -> Path | None:
    """The path when ``path_or_id`` names a GGUF file (by its ``.gguf`` suffix), else None."""
    return Path(path_or_id).expanduser() if str(path_or_id).lower().endswith(".gguf") else None


def check_gguf_source(path: Path) -> None:
    """A ``.gguf`` model: an existing file that starts with the GGUF magic, and the ``gguf`` package
    (at the version transformers' GGUF loader needs) importable; else one line."""
    if not path.exists():
        raise PracError(f"model file {str(path)!r} does not exist")
    if not path.is_file():
        raise PracError(f"model path {str(path)!r} ends in .gguf but is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise PracError(f"model file {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    if magic != b"GGUF":
        raise PracError(f"model file {str(path)!r} is not a GGUF file (it does not start with the GGUF magic)")
    from transformers.utils import is_gguf_available
    from transformers.utils.import_utils import GGUF_MIN_VERSION

    if not is_gguf_available(GGUF_MIN_VERSION):
        raise PracError(f"loading {path.name} needs the gguf package (>= {GGUF_MIN_VERSION}): "
                        f"pip install 'prac[gguf]'")


def gguf_types(path: Path) -> str:
    """The tensor types of a GGUF file, most common first (``Q4_1 x210, F32 x61, Q8_0 x1``); ``?`` when
    the file's tensor table cannot be read (the load that follows says why)."""
    from collections import Counter

    try:
        from gguf import GGUFReader

        counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    except Exception:  # noqa: BLE001 - only a description: transformers' load reports a bad file
        return "?"
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def check_model_source(path_or_id: str) -> None:
    """Fail fast, before any heavy import or download, on a path that is clearly not a model."""
    gguf = gguf_file(path_or_id)
    if gguf is not None:
        check_gguf_source(gguf)
        return
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
    check_hub_reachable(path_or_id)


_TRUE = {"1", "on", "yes", "true"}


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, or its host
    does not answer a TCP connection within 3 s), or None when it can. Probed once per endpoint."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    return _probe(endpoint)


@functools.lru_cache(maxsize=8)
def _probe(endpoint: str) -> str | None:
    import urllib.request

    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host or ""):
        purl = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname, purl.port or 80
    if not host:
        return None  # not a URL we understand: let the hub client decide
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as exc:
        return f"{endpoint} is unreachable ({exc.strerror or exc})"


def _cached_on_disk(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache is a cache miss
        return False


def check_hub_reachable(repo_id: str) -> None:
    """A hub id offline: fine when the hub's cache has it, else one line at once (no 26 s of retries)."""
    reason = hub_offline_reason()
    if reason is not None and not _cached_on_disk(repo_id):
        raise PracError(f"model {repo_id!r} is not a local folder and not in the hub cache, and the hub cannot be "
                        f"reached: {reason}")


def _hub_kwargs(path_or_id: str) -> dict:
    """``local_files_only`` for a cached hub id when the hub is offline (no retries against it)."""
    if Path(path_or_id).expanduser().exists():
        return {}
    return {"local_files_only": True} if hub_offline_reason() is not None else {}


def model_context(config) -> int | None:
    """The longest sequence the model takes (``max_position_embeddings`` or an equivalent), or None."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_vocab_size(model) -> int | None:
    """Rows of the input embedding (the ids the model can take), else ``config.vocab_size``."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None and getattr(emb, "num_embeddings", None):
        return int(emb.num_embeddings)
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(value) if isinstance(value, int) else None


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse a model with NaN/Inf in a floating-point parameter or buffer, naming the first such tensor."""
    seen = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            kinds = "/".join(k for k, hit in (("NaN", bool(t.isnan().any())), ("Inf", bool(t.isinf().any()))) if hit)
            raise PracError(f"model weights contain NaN/Inf: {name} has {bad} non-finite value(s) ({kinds}) "
                            f"of {t.numel()}")


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
    """Load a model on the CPU in eval mode; causal LMs with their head, encoders with ``AutoModel``;
    a ``.gguf`` file through transformers' GGUF loader (:func:`load_gguf_model`)."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    check_model_source(path_or_id)
    gguf = gguf_file(path_or_id)
    if gguf is not None:
        return _ready(load_gguf_model(gguf, dtype))
    hub = _hub_kwargs(path_or_id)
    try:
        config = AutoConfig.from_pretrained(path_or_id, **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise PracError(f"could not load a model config from {path_or_id!r}: {_first_line(exc)}") from exc
    auto_cls = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModel
    try:
        model = auto_cls.from_pretrained(path_or_id, dtype=_dtype(dtype), **hub)
    except (OSError, ValueError, KeyError) as exc:
        raise PracError(f"could not load model {path_or_id!r}: {_first_line(exc)}") from exc
    except (SafetensorError, EOFError, pickle.UnpicklingError, RuntimeError) as exc:
        # a truncated or corrupt weights file (safetensors header, torch zip archive, state-dict shapes)
        raise PracError(f"could not load the weights of {path_or_id!r} (truncated or corrupt file?): "
                        f"{_first_line(exc)}") from exc
    return _ready(model)


def _ready(model: torch.nn.Module) -> torch.nn.Module:
    """A loaded model checked finite, in eval mode, without gradients or a KV cache."""
    check_finite_weights(model)
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model


@contextlib.contextmanager
def _gguf_progress_as_transformers():
    """transformers' GGUF loader draws its own ``tqdm`` bar, which ignores transformers' progress
    setting; while that setting is off (``--no-progress``), the loader's bar is off too."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another layout: its bar, if any, stays
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_gguf_model(path: Path, dtype: str = "auto") -> torch.nn.Module:
    """A causal LM from a GGUF file through transformers' own GGUF loader, which dequantizes every
    tensor (``auto``: to float32). Says so in one warning, since a quantized source changes what
    pruning sees (a Q4_1 block has at most 16 distinct values per 32 weights: magnitude ties).

    The GGUF quantizer marker transformers attaches is dropped: the weights are plain tensors now, and
    a model that still carried it would be saved as a quantized model (or refused by ``save_pretrained``)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.float32 if dtype == "auto" else _dtype(dtype)
    try:
        with _gguf_progress_as_transformers():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise PracError(f"could not load the GGUF file {str(path)!r}: {_first_line(exc)}") from exc
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    types = gguf_types(path)
    plain = all(t.split(" x")[0] in ("F32", "F16", "BF16", "F64") for t in types.split(", "))
    log.warning("%s: weights %s from GGUF (%s) to %s by transformers", path.name,
                "converted" if plain else "dequantized", types, str(torch_dtype).removeprefix("torch."))
    return model


def model_skeleton(path_or_id: str) -> torch.nn.Module | None:
    """The model built from its ``config.json`` on the ``meta`` device: every module and shape, no
    weights read or allocated (seconds, whatever the size). Lets the checks that need only shapes
    (N:M and group sizes against the layers' inputs, ``--ignore``, context lengths) run before the
    load. None when the config cannot be read or the model not built that way (the load says why)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    gguf = gguf_file(path_or_id)
    try:
        if gguf is not None:  # the config is in the file's metadata (no tensor is read)
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        else:
            config = AutoConfig.from_pretrained(path_or_id, **_hub_kwargs(path_or_id))
        auto_cls = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModel
        with torch.device("meta"):
            return auto_cls.from_config(config).eval()
    except Exception as exc:  # noqa: BLE001 - the checks run again on the loaded model
        log.debug("no meta skeleton of %s (%s: %s); its shapes are checked after the load", path_or_id,
                  type(exc).__name__, _first_line(exc))
        return None


#: Files one of which a folder's tokenizer is read from (transformers' fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tokenizer_config.json")


def check_tokenizer_source(path_or_id: str) -> None:
    """A local model folder must hold a tokenizer (one of :data:`TOKENIZER_FILES`), checked before the
    weights are loaded; a hub id is left to the load."""
    path = Path(path_or_id).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise PracError(f"model folder {path_or_id!r} has no tokenizer (none of tokenizer.json, tokenizer.model, "
                        f"vocab.json, vocab.txt): copy the tokenizer files of the model it was made from into it")


def load_tokenizer(path_or_id: str):
    from transformers import AutoTokenizer

    gguf = gguf_file(path_or_id)
    if gguf is not None:  # the tokenizer is in the file's metadata
        try:
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PracError(f"could not load a tokenizer from the GGUF file {str(gguf)!r}: {_one_line(exc)}") from exc
    check_tokenizer_source(path_or_id)
    try:
        return AutoTokenizer.from_pretrained(path_or_id, **_hub_kwargs(path_or_id))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PracError(f"could not load a tokenizer from {path_or_id!r}: {_one_line(exc)}") from exc


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The whole message on one line (a first line ending in ``:`` says nothing alone), cut at ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
