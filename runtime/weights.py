"""Load a safetensors checkpoint into a model tensor by tensor, so host memory never holds a second copy."""
import glob
import os

import torch
from safetensors import safe_open


def load_weights(model: torch.nn.Module, folder: str) -> None:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    params = dict(model.named_parameters())
    loaded: dict[str, set[int]] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                target, shard = _target(model, name)
                if target is None:
                    continue
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                param = params[target]
                tensor = f.get_tensor(name)
                loader = getattr(param, "weight_loader", None)
                if loader is not None:
                    loader(param, tensor, shard or 0)
                else:
                    if param.shape != tensor.shape:
                        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
                    param.data.copy_(tensor)
                loaded.setdefault(target, set()).add(shard or 0)
                del tensor
    missing = [n for n, p in params.items() if len(loaded.get(n, ())) < getattr(p, "num_shards", 1)]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


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
