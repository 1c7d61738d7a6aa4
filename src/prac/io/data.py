"""Calibration and evaluation token sets, with the conventions of the field.

Calibration
- ``stream`` protocol (WikiText-2 and plain ``.txt``): the whole text is tokenized once and each
  sample is a window of ``seqlen`` tokens at a start drawn by ``random.randint(0, T - seqlen - 1)``
  after ``random.seed(seed)`` — the reference Wanda/SparseGPT sampler, token for token.
- ``documents`` protocol (C4 and ``.jsonl`` with a ``text`` field): for each sample, draw documents
  until one is longer than ``seqlen`` tokens, then a random window inside it (the reference C4 sampler).

Evaluation: the text (WikiText-2: the test split joined with ``"\\n\\n"``) is tokenized once and cut
into non-overlapping ``seqlen`` windows; the trailing partial window is dropped. C4 (and ``.jsonl``
files of documents) follow SparseGPT's protocol instead: the first :data:`C4_EVAL_DOCS` documents of
the validation shard joined with ``" "``, tokenized, and only the first :data:`C4_EVAL_WINDOWS` ×
``seqlen`` tokens kept. Several sets are given comma-separated (:func:`split_eval_sets`).

BOS (``--bos``): a text is tokenized whole and cut into windows, so only a window that starts where
the text starts can hold the tokenizer's BOS (the papers' protocol, and the references'). Some model
families are trained with BOS at the start of every sequence (Gemma, Gemma 2, Gemma 3:
:data:`BOS_MODEL_TYPES`) and calibrate and evaluate off-distribution without it. With ``always`` the
**first token of every window is replaced by BOS** (:func:`with_bos`): windows keep exactly
``seqlen`` tokens, the same starts and the same predicted tokens as ``never`` (a window's first token
is never predicted), and only the context of each window begins with BOS. ``never`` keeps the windows
as cut; ``auto`` (:func:`bos_mode`) is ``always`` for :data:`BOS_MODEL_TYPES` and ``never`` otherwise.
Exact token files (``--calib-tokens``) are used as given.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prac.core.errors import PracError

C4_REPO = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
# SparseGPT's C4 evaluation: ' '.join of the first 1100 validation documents, first 256 x seqlen tokens.
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256
WIKITEXT = ("wikitext", "wikitext-2-raw-v1")

# Calibration windows shorter than this are refused: a block sees its inputs in context, and rows of
# one or a few tokens show it only the first positions of a sequence (a 1-token row has no attention
# context at all), so the statistics would describe inputs the model never meets in use.
MIN_CALIB_SEQLEN = 8
# Fewer calibration tokens than this in all give a loud warning (the run goes on): Wanda's per-input
# norms and SparseGPT's H are then estimated from a handful of vectors.
MIN_CALIB_TOKENS = 128

log = logging.getLogger(__name__)

BOS_CHOICES = ("auto", "always", "never")
#: ``config.model_type`` of the families that expect BOS at the start of every sequence (``--bos auto``).
BOS_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text"})


def model_type_of(config) -> str | None:
    """``config.model_type`` (a composite config's ``text_config`` is asked when the top level names none
    of :data:`BOS_MODEL_TYPES`)."""
    kind = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    if kind not in BOS_MODEL_TYPES and text is not None and getattr(text, "model_type", None) in BOS_MODEL_TYPES:
        return text.model_type
    return kind


def bos_mode(choice: str, config=None) -> str:
    """``--bos`` settled: ``always`` or ``never``; ``auto`` is ``always`` for a model whose
    ``config.model_type`` is one of :data:`BOS_MODEL_TYPES` and ``never`` otherwise (or without a config)."""
    if choice not in BOS_CHOICES:
        raise PracError(f"--bos must be one of {', '.join(BOS_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "always" if config is not None and model_type_of(config) in BOS_MODEL_TYPES else "never"


def bos_token_id(tokenizer, why: str = "--bos always") -> int:
    """The tokenizer's BOS id, or a one-line :class:`PracError` when it has none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise PracError(f"{why} puts the tokenizer's BOS token at the start of every window, but this tokenizer has "
                        f"no BOS token (bos_token is not set): use --bos never")
    return int(bos)


def with_bos(ids: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Windows ``[n, seqlen]`` with their first token replaced by ``bos`` (a new tensor); ``ids`` itself
    when ``bos`` is None."""
    if bos is None:
        return ids
    out = ids.clone()
    out[:, 0] = bos
    return out


def bos_protocol(bos: int | None) -> dict:
    """What the report records of the windows' BOS (``bos``: the id placed, or None)."""
    if bos is None:
        return {"bos": "never"}
    return {"bos": "always", "bos_token_id": int(bos), "bos_rule": "first token of every window replaced by BOS"}


@dataclass
class TokenSet:
    """Token windows with a description of how they were made (for the report)."""

    input_ids: torch.Tensor  # int64 [n, seqlen]
    protocol: dict = field(default_factory=dict)


HUB_DATASETS = {"c4": C4_REPO, "wikitext2": WIKITEXT[0]}
"""The texts prac reads from the hub (``--calib``/``--eval`` names), by the dataset each loads."""


def _load_dataset(*args, **kwargs):
    """``datasets.load_dataset`` with one-line errors for a missing package or an unreachable hub.

    When the hub cannot be reached (:func:`prac.model.loading.hub_offline_reason`) ``datasets`` is put in
    offline mode for the call: it reads its cache at once instead of retrying the hub for 40 s."""
    from prac.model.loading import hub_offline_reason

    try:
        import datasets.config
        from datasets import load_dataset
    except ImportError as exc:
        raise PracError("the c4 and wikitext2 loaders need the 'datasets' package: pip install 'prac[hub]'") from exc
    offline, before = hub_offline_reason(), datasets.config.HF_HUB_OFFLINE
    try:
        if offline is not None:
            datasets.config.HF_HUB_OFFLINE = True  # read at call time by datasets' loader: no HEAD retries
        return load_dataset(*args, **kwargs)
    except (OSError, ConnectionError, ValueError) as exc:
        why = (f"the hub cannot be reached ({offline}) and it is not in the datasets cache" if offline
               else _first_line(exc))
        raise PracError(f"could not load dataset {args[0]!r} from the hub: {why}") from exc
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def hub_dataset_cached(repo: str) -> bool:
    """Whether ``datasets``' cache holds a copy of ``repo`` (where its loader looks when the hub is offline)."""
    import glob
    import os

    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    parts = repo.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(os.path.expanduser(str(config.HF_DATASETS_CACHE)), "___".join(parts))
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(root, "*", "*", "*")))


def check_text_source(spec: str, what: str) -> None:
    """Refuse, with one line and before any model is loaded, a ``--calib``/``--eval`` text that cannot
    be read: a hub text (``c4``, ``wikitext2``) without ``datasets`` or with the hub unreachable and no
    cached copy; a file that is missing, a folder, unreadable, not UTF-8 text, or (``.jsonl``) not
    JSON lines with a ``text`` field."""
    if spec in HUB_DATASETS:
        import importlib.util

        from prac.model.loading import hub_offline_reason

        if importlib.util.find_spec("datasets") is None:
            raise PracError(f"{what} {spec} needs the 'datasets' package: pip install 'prac[hub]' (or give a "
                            f"local .txt/.jsonl file)")
        offline = hub_offline_reason()
        if offline is not None and not hub_dataset_cached(HUB_DATASETS[spec]):
            raise PracError(f"{what} {spec} needs the dataset {HUB_DATASETS[spec]!r} from the hub, which cannot be "
                            f"reached ({offline}), and the datasets cache has no copy: give a local .txt/.jsonl file")
        return
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl":
        if not _read_jsonl_texts(path, what=what):
            raise PracError(f"{what} {str(path)!r} has no documents")
    else:
        read_text_file(path, what)


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].to(torch.int64)


def read_text_file(path: str | Path, what: str = "text file") -> str:
    """A UTF-8 text file's content, or a one-line :class:`PracError` for a missing, unreadable or binary file.

    Binary means a NUL byte or bytes that are not UTF-8 (a BOM is accepted and dropped); the error
    says where the first bad byte is, so a wrong path (a model file, a gzip) is recognised at once.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise PracError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise PracError(f"{what} {str(path)!r} is a folder, not a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PracError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    nul = raw.find(b"\0")
    if nul >= 0:
        raise PracError(f"{what} {str(path)!r} is binary, not text (NUL byte at offset {nul})")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PracError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                        f"convert it, e.g. iconv -t UTF-8") from exc


def _read_text(path: Path) -> str:
    return read_text_file(path)


def _read_jsonl_texts(path: Path, key: str = "text", what: str = "calibration file") -> list[str]:
    texts = []
    for lineno, line in enumerate(read_text_file(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[key]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
            raise PracError(f"{path}:{lineno}: expected a JSON object with a {key!r} field") from exc
        if not isinstance(text, str):
            raise PracError(f"{path}:{lineno}: the {key!r} field is {type(text).__name__}, not a string")
        texts.append(text)
    return texts


def sample_stream(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """Random windows of one token stream (reference sampler)."""
    total = int(tokens.numel())
    if total < nsamples * seqlen + 1:
        raise PracError(
            f"calibration text {source} is too short: it has {total} tokens, "
            f"nsamples x seqlen needs {nsamples * seqlen + 1} ({nsamples} x {seqlen} + 1)"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def sample_documents(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """For each sample, documents are drawn until one exceeds ``seqlen`` tokens (reference C4 sampler)."""
    if not texts:
        raise PracError(f"calibration source {source} has no documents")
    lengths: dict[int, torch.Tensor] = {}
    rng = random.Random(seed)
    out = []
    budget = 50 * len(texts) + 1000
    for _ in range(nsamples):
        while True:
            budget -= 1
            if budget < 0:
                longest = max((t.numel() for t in lengths.values()), default=0)
                raise PracError(
                    f"calibration source {source} is too short: no document longer than seqlen={seqlen} "
                    f"tokens (longest seen: {longest}); nsamples x seqlen needs {nsamples * seqlen} tokens"
                )
            i = rng.randint(0, len(texts) - 1)
            if i not in lengths:
                lengths[i] = _tokenize(tokenizer, texts[i])
            enc = lengths[i]
            if enc.numel() > seqlen:
                break
        start = rng.randint(0, enc.numel() - seqlen - 1)
        out.append(enc[start : start + seqlen])
    return torch.stack(out)


def load_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                     bos: int | None = None) -> TokenSet:
    """Calibration windows from ``c4``, ``wikitext2``, a ``.txt`` file (stream) or ``.jsonl`` (documents).

    ``bos``: a token id put in place of the first token of every window (``--bos always``, :func:`with_bos`);
    None leaves the windows as sampled. The windows' starts are the same either way."""
    if nsamples < 1 or seqlen < 2:
        raise PracError(f"nsamples must be >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    proto = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    if source == "c4":
        data = _load_dataset(C4_REPO, data_files={"train": C4_TRAIN_FILE}, split="train")
        ids = sample_documents(list(data["text"]), tokenizer, nsamples, seqlen, seed, "c4")
        proto.update(protocol="documents", dataset=f"{C4_REPO}:{C4_TRAIN_FILE}")
    elif source == "wikitext2":
        data = _load_dataset(*WIKITEXT, split="train")
        ids = sample_stream(_tokenize(tokenizer, " ".join(data["text"])), nsamples, seqlen, seed, "wikitext2")
        proto.update(protocol="stream", dataset="wikitext-2-raw-v1 train, joined with ' '")
    else:
        path = Path(source).expanduser()
        if path.suffix == ".jsonl":
            ids = sample_documents(_read_jsonl_texts(path), tokenizer, nsamples, seqlen, seed, str(path))
            proto.update(protocol="documents", file=str(path))
        else:
            ids = sample_stream(_tokenize(tokenizer, _read_text(path)), nsamples, seqlen, seed, str(path))
            proto.update(protocol="stream", file=str(path))
    return TokenSet(with_bos(ids, bos), {**proto, **bos_protocol(bos)})


def load_token_file(path: str | Path) -> TokenSet:
    """Exact calibration tokens from a safetensors file holding an integer ``input_ids`` [n, seqlen].

    Negative ids are refused here; ids beyond the model's vocabulary and rows that are too short by
    :func:`check_calibration` once the model is known.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise PracError(f"calibration token file {str(path)!r} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PracError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from exc
    ids = tensors.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise PracError(f"{path} must hold an integer tensor 'input_ids' of shape [n, seqlen]")
    n, seqlen = ids.shape
    if n < 1 or seqlen < 1:
        raise PracError(f"{path} holds an empty 'input_ids' of shape [{n}, {seqlen}]")
    ids = ids.to(torch.int64)
    check_token_ids(ids, None, str(path))
    return TokenSet(ids, {"source": "tokens", "file": str(path), "nsamples": n, "seqlen": seqlen,
                          "bos": "as given (exact tokens: --bos does not apply)"})


def check_calibration(tokens: TokenSet, vocab_size: int | None = None, context: int | None = None) -> TokenSet:
    """What a run may calibrate on: rows of at least :data:`MIN_CALIB_SEQLEN` tokens, ids inside the
    vocabulary, rows no longer than the model's ``context``; fewer than :data:`MIN_CALIB_TOKENS` tokens
    in all is allowed with a warning. Returns ``tokens``."""
    n, seqlen = tokens.input_ids.shape
    source = _describe(tokens)
    if seqlen < MIN_CALIB_SEQLEN:
        raise PracError(f"calibration {source} has rows of {seqlen} token(s): prac needs at least "
                        f"{MIN_CALIB_SEQLEN} tokens per row (a short row shows a block only the first positions "
                        f"of a sequence)")
    if context is not None and seqlen > context:
        raise PracError(f"calibration {source} has rows of {seqlen} tokens, beyond the model's context of "
                        f"{context} tokens")
    check_token_ids(tokens.input_ids, vocab_size, f"calibration {source}")
    if n * seqlen < MIN_CALIB_TOKENS:
        log.warning("calibration %s has only %d tokens (%d x %d), fewer than %d: its statistics, and so the "
                    "masks, come from a handful of vectors", source, n * seqlen, n, seqlen, MIN_CALIB_TOKENS)
    return tokens


def _describe(tokens: TokenSet) -> str:
    p = tokens.protocol
    return str(p.get("file") or p.get("source") or "tokens")


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, source: str) -> None:
    """Refuse token ids that are negative or, when ``vocab_size`` is known, not below it."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise PracError(f"{source} holds negative token id {low}")
    if vocab_size is not None and high >= vocab_size:
        bad = int((ids >= vocab_size).sum())
        raise PracError(f"{source} holds token id {high} (and {bad} id(s) >= {vocab_size} in all), outside the "
                        f"model's vocabulary of {vocab_size}: tokens from another tokenizer?")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def split_eval_sets(spec: str | None) -> list[str]:
    """``"wikitext2,c4"`` -> ``["wikitext2", "c4"]`` (order kept, repeats dropped); ``none`` or empty -> []."""
    if spec is None:
        return []
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part and part not in out:
            out.append(part)
    if "none" in out:
        if len(out) > 1:
            raise PracError(f"--eval {spec!r}: 'none' cannot be combined with other evaluation sets")
        return []
    return out


def c4_eval_tokens(texts: list[str], tokenizer, seqlen: int | None) -> torch.Tensor:
    """SparseGPT's C4 evaluation stream: the first :data:`C4_EVAL_DOCS` documents joined with ``" "``,
    tokenized once, cut to the first :data:`C4_EVAL_WINDOWS` × ``seqlen`` tokens (fewer if the text is
    shorter; not cut when ``seqlen`` is None)."""
    ids = _tokenize(tokenizer, " ".join(texts[:C4_EVAL_DOCS]))
    return ids if seqlen is None else ids[: C4_EVAL_WINDOWS * seqlen]


def load_eval_tokens(source: str, tokenizer, seqlen: int | None = None) -> tuple[torch.Tensor, dict]:
    """The evaluation text as one token stream ``[T]`` plus its description.

    ``wikitext2``: the test split joined with ``"\\n\\n"``. ``c4``: SparseGPT's protocol on the
    validation shard (:func:`c4_eval_tokens`; needs ``seqlen``); a ``.jsonl`` file of documents
    (``"text"`` field) follows the same protocol. Any other path: a UTF-8 text file, whole."""
    if source == "wikitext2":
        data = _load_dataset(*WIKITEXT, split="test")
        return _tokenize(tokenizer, "\n\n".join(data["text"])), {"source": "wikitext2", "split": "test", "join": "\\n\\n"}
    c4_proto = {"protocol": "sparsegpt-c4", "documents": C4_EVAL_DOCS, "join": " ",
                "max_tokens": f"{C4_EVAL_WINDOWS} x seqlen"}
    if source == "c4":
        if seqlen is None:
            raise ValueError("the c4 evaluation protocol needs seqlen")
        data = _load_dataset(C4_REPO, data_files={"validation": C4_VALIDATION_FILE}, split="validation")
        texts = list(data[:C4_EVAL_DOCS]["text"])
        return c4_eval_tokens(texts, tokenizer, seqlen), {"source": "c4", "dataset": f"{C4_REPO}:{C4_VALIDATION_FILE}",
                                                          "split": "validation", **c4_proto}
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        texts = _read_jsonl_texts(path, what="evaluation file")
        if not texts:
            raise PracError(f"evaluation file {str(path)!r} has no documents")
        return c4_eval_tokens(texts, tokenizer, seqlen), {"source": "file", "file": str(path), **c4_proto}
    return _tokenize(tokenizer, _read_text(path)), {"source": "file", "file": str(path)}


def eval_windows(tokens: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows ``[n, seqlen]`` (trailing partial window dropped); with ``bos``,
    the first token of every window replaced by it (:func:`with_bos`: the predicted tokens stay the same)."""
    n = tokens.numel() // seqlen
    if n < 1:
        raise PracError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return with_bos(tokens[: n * seqlen].reshape(n, seqlen), bos)
