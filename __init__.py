from kvserve.runtime.llm import LLM
from kvserve.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
