"""kvserve: a KServe predictor with its own paged-attention LLM engine.

`LLM` and `SamplingParams` load on first use, so light entry points (the KEDA scaler) skip torch.
"""
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    if name == "LLM":
        from kvserve.runtime.llm import LLM
        return LLM
    if name == "SamplingParams":
        from kvserve.runtime.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
