"""Engine configuration: one plain dataclass, field names after vLLM's engine arguments."""
from dataclasses import dataclass, fields

OFFLOAD_POLICIES = ("auto", "always", "never")  # see runtime/kv_offload.py


@dataclass
class EngineConfig:
    model: str  # a local Hugging Face-format folder (the loader in adapters/ resolves URIs to one)
    tokenizer: str | None = None  # defaults to `model`
    served_model_name: str | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped by the KV pool
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_waiting_requests: int | None = 1024  # AsyncEngine: requests waiting beyond the running ones; more are refused
    block_size: int = 16
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; or float32 / float16 / bfloat16
    device: str = "auto"  # auto: cuda if available, else cpu
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None  # fixed KV pool size in blocks (any device)
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory the engine may fill
    cpu_kv_cache_gb: float = 1.0  # CPU: KV pool size
    seed: int = 0
    max_logprobs: int = 20
    enforce_eager: bool = False  # CUDA: no CUDA graphs
    load_format: str = "auto"  # auto: safetensors from `model`; dummy: random weights (benchmarks)
    skip_tokenizer_init: bool = False  # token ids in, token ids out, no text (benchmarks)
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere; or "torch" / "triton"
    max_loras: int = 0  # device slots for LoRA adapters (adapters one step can mix); 0: LoRA off
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # loaded adapters kept on the host; default: max_loras
    lora_modules: dict[str, str] | None = None  # adapter name -> local PEFT folder, loaded at start
    lora_allowed_roots: list[str] | None = None  # default: the model's adapters/ folder and the download cache
    # KV offload (runtime/kv_offload.py, docs/OFFLOAD.md): off unless a tier is set
    kv_offload_cpu_gb: float = 0  # host-memory tier (pinned on CUDA)
    kv_offload_disk_path: str | None = None  # local-folder tier
    kv_offload_disk_gb: float = 10.0  # cap of the folder tier
    kv_offload_remote: str | None = None  # s3://bucket/prefix shared by replicas (any S3-compatible endpoint)
    kv_offload_remote_gb: float = 0  # cap of what this replica keeps in the bucket; 0: none (a lifecycle rule)
    kv_offload_chunk_tokens: int = 256  # tokens per chunk, rounded down to whole blocks
    kv_offload_policy: str = "auto"  # auto: load where faster than recomputing; always; never (save only)

    def __post_init__(self):
        if self.lora_modules and not self.max_loras:
            self.max_loras = 1  # adapters given: LoRA on, with vLLM's default of one slot
        self._check()

    def _check(self):
        """Settings no engine can run with: one ValueError naming the argument (the CLI prints it as one line)."""
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_logprobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "num_gpu_blocks_override", "max_waiting_requests"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gb <= 0:
            raise ValueError(f"cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb}")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras must be >= 0 and max_lora_rank >= 1, got {self.max_loras}, "
                             f"{self.max_lora_rank}")
        if self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        if self.kv_offload_enabled:
            if self.kv_offload_policy not in OFFLOAD_POLICIES:
                raise ValueError(f"kv_offload_policy must be one of {', '.join(OFFLOAD_POLICIES)}, "
                                 f"got {self.kv_offload_policy!r}")
            if not self.enable_prefix_caching:
                raise ValueError("KV offload names chunks by the prefix cache's block hashes: "
                                 "it needs enable_prefix_caching")

    @property
    def kv_offload_enabled(self) -> bool:
        """Whether any KV offload tier is configured."""
        return self.kv_offload_cpu_gb > 0 or bool(self.kv_offload_disk_path) or bool(self.kv_offload_remote)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)
