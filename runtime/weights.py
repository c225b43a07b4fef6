"""Load a safetensors checkpoint into a model tensor by tensor, so host memory never holds a second copy.

Tensors are read with plain file reads, straight into the parameters (or through a one-tensor buffer where a
dtype conversion, a fused shard or the device needs one). safetensors' own reader maps the whole file, and every
mapped page it reads stays resident until the file is closed: loading a shard that way costs its full size on top
of the model."""
import glob
import json
import os
import struct

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def load_weights(model: torch.nn.Module, folder: str) -> None:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    params = dict(model.named_parameters())
    loaded: dict[str, set[int]] = {}
    for path in files:
        with open(path, "rb", buffering=0) as f:
            for name, dtype, shape, offset in _tensors(f, path):
                target, shard = _target(model, name)
                if target is None:
                    continue
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                param = params[target]
                loader = getattr(param, "weight_loader", None)
                if loader is None and param.shape != shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(shape)} != model {tuple(param.shape)}")
                # A one-shard loader copies the whole tensor (lm_head): read it in place like any other.
                whole = loader is None or (getattr(param, "num_shards", 1) == 1 and param.shape == shape)
                direct = whole and param.dtype == dtype and param.device.type == "cpu" and param.is_contiguous()
                tensor = param.data if direct else torch.empty(shape, dtype=dtype)
                _read_into(f, offset, tensor, f"{path}: {name}")
                if not direct:
                    if loader is not None:
                        loader(param, tensor, shard or 0)
                    else:
                        param.data.copy_(tensor)
                loaded.setdefault(target, set()).add(shard or 0)
                del tensor
    missing = [n for n, p in params.items() if len(loaded.get(n, ())) < getattr(p, "num_shards", 1)]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _tensors(f, path: str) -> list[tuple[str, torch.dtype, torch.Size, int]]:
    """(name, dtype, shape, file offset) of every tensor in a safetensors file, in file order."""
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        out = [(name, _DTYPES[t["dtype"]], torch.Size(t["shape"]), 8 + n + t["data_offsets"][0])
               for name, t in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a safetensors file kvserve can read: {e!r}") from e
    return sorted(out, key=lambda t: t[3])


def _read_into(f, offset: int, tensor: torch.Tensor, what: str) -> None:
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{what}: the file ends {len(view) - got} bytes early (truncated)")
        got += n


def _target(model, name: str) -> tuple[str | None, int | None]:
    """Checkpoint name -> (our parameter name, shard index or None); None to skip the tensor."""
    if "rotary_emb.inv_freq" in name:
        return None, None
    if name == "lm_head.weight" and getattr(model, "tie", False):
        return None, None  # tied: the embedding is the head
    for hf_name, (ours, shard) in model.packed.items():
        if f".{hf_name}." in name:
            return name.replace(f".{hf_name}.", f".{ours}."), shard
    return name, None


@torch.no_grad()
def dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Small random weights in place (benchmarks of a model shape without its checkpoint)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.uniform_(-0.05, 0.05, generator=gen)
