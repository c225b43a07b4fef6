"""The offline API users know from vLLM: LLM(model=...).generate(prompts, sampling_params)."""
from kvserve.runtime.config import EngineConfig
from kvserve.runtime.engine import Engine
from kvserve.runtime.outputs import RequestOutput
from kvserve.runtime.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_args):
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **engine_args))
        self.engine.record_events = False  # no stat loggers offline
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: str | list[str | None] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. Returns outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        ids = []
        for prompt, p, lora in zip(prompts, params, loras):
            rid = str(self._next_id)
            self._next_id += 1
            self.engine.add_request(prompt, p, rid, lora, stream=False)
            ids.append(rid)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            outputs, _ = self.engine.step()
            for delta in outputs:
                acc = done.get(delta.request_id)
                if acc is None:
                    done[delta.request_id] = delta
                else:
                    acc.merge(delta)
        return [done[r] for r in ids]
