"""Weights for ``GPT``: a Lightning checkpoint, a ``torch.save``d state dict, or Hugging Face GPT-2 weights
(safetensors or ``pytorch_model.bin``) mapped onto ``GPT``'s names without needing ``transformers``."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["load_gpt_checkpoint", "load_safetensors"]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file without the ``safetensors`` package.

    The format: an 8-byte little-endian header length, a JSON header mapping each name to its dtype, shape and
    byte range (``data_offsets``, relative to the end of the header), then the raw little-endian tensor bytes.

    Raises:
        ValueError: a truncated file, an unknown dtype, or a byte range that does not match the shape.
    """
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"load_safetensors: {str(path)!r} is too short to be a safetensors file.")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if 8 + header_len > len(raw):
        raise ValueError(f"load_safetensors: {str(path)!r} declares a {header_len}-byte header past its end.")
    header = json.loads(raw[8 : 8 + header_len])
    data = memoryview(raw)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"load_safetensors: tensor {name!r} has unsupported dtype {info['dtype']!r}.")
        start, end = info["data_offsets"]
        shape = info["shape"]
        if end - start != math.prod(shape) * dtype.itemsize or end > len(data):
            raise ValueError(f"load_safetensors: tensor {name!r}: byte range {start}..{end} does not fit {shape}.")
        flat = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return tensors


# Hugging Face GPT-2 names -> ours. Its Conv1D stores weights as [in, out]: transposed to nn.Linear's [out, in].
_HF_BLOCK = {
    "ln_1.weight": ("ln1.weight", False),
    "ln_1.bias": ("ln1.bias", False),
    "attn.c_attn.weight": ("attn.qkv.weight", True),
    "attn.c_attn.bias": ("attn.qkv.bias", False),
    "attn.c_proj.weight": ("attn.proj.weight", True),
    "attn.c_proj.bias": ("attn.proj.bias", False),
    "ln_2.weight": ("ln2.weight", False),
    "ln_2.bias": ("ln2.bias", False),
    "mlp.c_fc.weight": ("fc.weight", True),
    "mlp.c_fc.bias": ("fc.bias", False),
    "mlp.c_proj.weight": ("out.weight", True),
    "mlp.c_proj.bias": ("out.bias", False),
}
_HF_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # the causal-mask buffers: not parameters


def _from_hf_gpt2(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``GPT2Model``/``GPT2LMHeadModel`` tensors -> a ``GPT`` state dict (tied head)."""
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
    ours: dict[str, Tensor] = {}
    for key, value in hf.items():
        if key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            ours[key] = value
        elif key == "lm_head.weight":
            if not torch.equal(value, hf["wte.weight"]):
                raise ValueError("load_gpt_checkpoint: lm_head.weight differs from wte.weight; GPT ties them.")
        elif match := re.fullmatch(r"h\.(\d+)\.(.+)", key):
            if _HF_BUFFERS.fullmatch(key):
                continue
            if match.group(2) not in _HF_BLOCK:
                raise ValueError(f"load_gpt_checkpoint: unexpected GPT-2 tensor {key!r}.")
            name, transpose = _HF_BLOCK[match.group(2)]
            ours[f"blocks.{match.group(1)}.{name}"] = value.t().contiguous() if transpose else value
        else:
            raise ValueError(f"load_gpt_checkpoint: unexpected GPT-2 tensor {key!r}.")
    ours["head.weight"] = ours["wte.weight"]
    return ours


def _read_weights(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    # weights_only: a checkpoint file can never run code while it is read
    return torch.load(path, map_location="cpu", weights_only=True)


def load_gpt_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights for ``GPT`` from any of the formats below, and the model sizes they imply.

    - a Lightning checkpoint of ``GPTTask`` (``trainer.save_checkpoint``): ``state_dict`` with ``model.`` keys;
      its ``hyper_parameters`` give ``n_head`` and ``activation``;
    - a ``torch.save``d state dict of ``GPT`` or of ``GPTTask`` (``.pt``/``.pth``/``.bin``);
    - Hugging Face GPT-2 weights: a folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
      (or one of those files; then ``n_head`` must come from the caller), mapped by name, Conv1D weights transposed.

    Args:
        path: the file or folder.

    Returns:
        (state dict with ``GPT``'s keys, sizes) where sizes holds ``vocab_size``, ``block_size``, ``n_layer``,
        ``n_embd`` (from the tensor shapes) and ``n_head``/``activation`` where the checkpoint records them.

    Raises:
        FileNotFoundError: no weights at ``path``.
        ValueError: tensors that match none of the formats.
    """
    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        files = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
        if not files:
            raise FileNotFoundError(f"load_gpt_checkpoint: no model.safetensors or pytorch_model.bin in {str(path)!r}.")
        path = files[0]
    elif not path.is_file():
        raise FileNotFoundError(f"load_gpt_checkpoint: no checkpoint at {str(path)!r}.")
    loaded = _read_weights(path)
    sizes: dict[str, Any] = {}
    if isinstance(loaded, dict) and "state_dict" in loaded:  # Lightning checkpoint
        hparams = loaded.get("hyper_parameters") or {}
        sizes.update({k: hparams[k] for k in ("n_head", "activation") if k in hparams})
        loaded = loaded["state_dict"]
    if any(k.removeprefix("transformer.").startswith("h.0.") for k in loaded):
        state = _from_hf_gpt2(loaded)
        sizes["activation"] = "gelu_tanh" if config.get("activation_function", "gelu_new") == "gelu_new" else "gelu"
        if "n_head" in config:
            sizes["n_head"] = config["n_head"]
    else:
        state = {k.removeprefix("model."): v for k, v in loaded.items()}
    if "wte.weight" not in state or "wpe.weight" not in state:
        raise ValueError(
            f"load_gpt_checkpoint: {str(path)!r} holds neither GPT, GPTTask nor Hugging Face GPT-2 weights "
            f"(first keys: {list(loaded)[:5]})."
        )
    state.setdefault("head.weight", state["wte.weight"])
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    sizes.update(
        vocab_size=state["wte.weight"].shape[0],
        n_embd=state["wte.weight"].shape[1],
        block_size=state["wpe.weight"].shape[0],
        n_layer=max(layers) + 1 if layers else 0,
    )
    return state, sizes
