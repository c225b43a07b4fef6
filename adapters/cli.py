"""The `kvserve` command.

    kvserve serve [--model_dir DIR|s3://...|hf://...] [KServe flags] [engine flags under vLLM's names]
    kvserve scaler ...   the KEDA external scaler (its own --help)

Engine flags are generated from EngineConfig, so every engine argument has its vLLM-style flag. Precedence:
explicit flag > the model folder's kvserve.json > EngineConfig's default.
"""
import argparse
import logging
import os
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from kvserve.runtime.config import EngineConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model-repo" / "kvserve-tiny"

_ENGINE_HELP = {
    "max_model_len": "context length (prompt + output); default: the model's, capped by the KV pool",
    "max_num_seqs": "most sequences in one batch",
    "max_num_batched_tokens": "token budget of one engine step",
    "max_waiting_requests": "requests that may wait beyond the running ones; more get 503 / 429 at once",
    "block_size": "tokens per KV cache block",
    "dtype": "auto | float32 | float16 | bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)",
    "device": "auto | cuda | cpu",
    "gpu_memory_utilization": "fraction of GPU memory the engine may fill",
    "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
    "num_gpu_blocks_override": "fixed KV pool size in blocks (any device)",
    "served_model_name": "the model name the OpenAI routes list (also accepted: --model_name)",
    "seed": "engine seed for requests without one",
    "kv_offload_cpu_gb": "KV offload: GiB of host memory for KV chunks (0: no host-memory tier)",
    "kv_offload_disk_path": "KV offload: folder for KV chunks (kept across restarts)",
    "kv_offload_disk_gb": "KV offload: GiB the folder may hold, least recently used chunks deleted first",
    "kv_offload_remote": "KV offload: s3://bucket/prefix shared by replicas (AWS_ENDPOINT_URL etc. as for models)",
    "kv_offload_remote_gb": "KV offload: GiB this replica keeps in the bucket (0: no cap, use a lifecycle rule)",
    "kv_offload_chunk_tokens": "KV offload: tokens per chunk, rounded down to whole blocks",
    "kv_offload_policy": "KV offload: auto (load where faster than recomputing) | always | never (save only)",
}
_CUSTOM_FLAGS = {"model", "lora_modules"}  # --model_dir names the model; --lora-modules takes NAME=PATH pairs


def _flag_type(annotation):
    """The scalar type behind `int`, `int | None`, `str | None`..."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (vLLM's argument names)")
    for f in fields(EngineConfig):
        if f.name in _CUSTOM_FLAGS:
            continue
        default = f.default if f.default is not MISSING else None
        help_ = f"{_ENGINE_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        typ = _flag_type(f.type)
        if typ is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(typ) is list:
            group.add_argument(flag, dest=f.name, type=typing.get_args(typ)[0], nargs="+", default=None,
                               metavar=f.name.upper(), help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=typ, default=None, metavar=f.name.upper(), help=help_)
    group.add_argument("--lora-modules", dest="lora_modules", nargs="+", type=_lora_module, default=None,
                       metavar="NAME=PATH", help="LoRA adapters (PEFT folders) to load at start, by name")


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="A KServe predictor with its own LLM engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over KServe v2 (REST, gRPC), generate and OpenAI")
    sub.add_parser("scaler", help="run the KEDA external scaler (see `kvserve scaler --help`)", add_help=False)

    k = serve.add_argument_group("KServe")
    k.add_argument("--model_name", default=None,
                   help="name on /v2/models/{name}; default: served_model_name from kvserve.json, else the folder name")
    k.add_argument("--model_dir", default=None,
                   help=f"local folder, model repository, s3://bucket/prefix or hf://org/name; "
                        f"default: the embedded {DEFAULT_MODEL_DIR.name}")
    k.add_argument("--http_port", type=int, default=8080, help="REST port (default: 8080)")
    k.add_argument("--grpc_port", type=int, default=8081, help="gRPC port (default: 8081)")
    k.add_argument("--workers", type=int, default=1,
                   help="must be 1: one process owns the engine and the device; scale with replicas")
    k.add_argument("--max_threads", type=int, default=4, help="gRPC server threads (default: 4)")
    k.add_argument("--enable_grpc", type=_bool, default=True, help="serve gRPC (default: true)")
    k.add_argument("--enable_docs_url", type=_bool, default=False, help="serve Swagger UI on /docs (default: false)")

    s = serve.add_argument_group("serving")
    s.add_argument("--api-key", dest="api_key", default=os.environ.get("KVSERVE_API_KEY"),
                   help="key clients must present (env KVSERVE_API_KEY)")
    s.add_argument("--api-key-protect-health", dest="api_key_protect_health", action="store_true",
                   help="require the key on liveness and readiness too (probes then need it)")
    s.add_argument("--api-key-protect-metrics", dest="api_key_protect_metrics", action="store_true",
                   help="require the key on /metrics and /v2/models/{m}/stats too")
    s.add_argument("--allow-pickle", dest="allow_pickle", action="store_true",
                   help="accept pickle (.bin/.pt) weights, which can run code when loaded")
    s.add_argument("--max-request-bytes", dest="max_request_bytes", type=_positive(int), default=16 << 20,
                   help="largest request body; larger ones get 413 (default: 16 MiB)")
    s.add_argument("--max-n", dest="max_n", type=_positive(int), default=16,
                   help="most choices one request may ask for (OpenAI `n`) (default: 16)")
    s.add_argument("--request-timeout", dest="request_timeout", type=_positive(float), default=None,
                   help="seconds a request may take, queueing included; a request's own `timeout` may be shorter "
                        "(default: no limit)")
    s.add_argument("--shutdown-grace-period", dest="shutdown_grace_period", type=_positive(float), default=30.0,
                   help="seconds running requests get to finish after SIGTERM (default: 30)")
    _add_engine_flags(serve)
    return parser


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value
    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def engine_config(args: argparse.Namespace, model_dir: Path, settings: dict) -> EngineConfig:
    """kvserve.json's values under the explicit flags."""
    known = {f.name for f in fields(EngineConfig)} - {"model"}
    from_settings = {k.replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(from_settings) - known)
    if unknown:
        raise ValueError(f"{model_dir / 'kvserve.json'}: unknown engine argument(s) {', '.join(unknown)}")
    explicit = {k: getattr(args, k) for k in known if getattr(args, k) is not None}
    if "lora_modules" in explicit:  # s3:// and hf:// adapters are fetched into the cache first
        from kvserve.adapters.model_source import resolve_adapter_dir
        explicit["lora_modules"] = {name: str(resolve_adapter_dir(uri)) if "://" in uri else uri
                                    for name, uri in explicit["lora_modules"]}
    return EngineConfig.from_kwargs(model=str(model_dir), **{**from_settings, **explicit})


def _log_to_stderr() -> None:
    """kvserve's own log lines (download progress, model folder, KV cache size) into the pod's log. KServe
    configures only its and uvicorn's loggers, and only once imported, after the model is fetched."""
    logger = logging.getLogger("kvserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.__stderr__)  # the process's stderr, never a stream swapped in later
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(process)s %(name)s %(levelname)s "
                                               "%(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def serve(args: argparse.Namespace) -> int:
    from kvserve.adapters.model_source import ModelSourceError, read_settings, resolve_model_dir

    if args.workers != 1:
        return _fail(f"--workers must be 1, got {args.workers}: the engine owns the device and its KV cache, "
                     "so run more replicas instead of more workers")
    _log_to_stderr()
    try:
        model_dir = resolve_model_dir(args.model_dir or str(DEFAULT_MODEL_DIR), args.model_name,
                                      allow_pickle=args.allow_pickle)
        config = engine_config(args, Path(model_dir), read_settings(model_dir))
    except (ModelSourceError, ValueError) as e:
        return _fail(str(e))
    name = args.model_name or config.served_model_name or Path(model_dir).name

    # kserve parses sys.argv when imported; import it only once the command line is known to be good.
    import kserve
    from kserve.model_server import app

    from kvserve.adapters.errors import install_error_handlers
    from kvserve.adapters.generate_api import register_generate_routes
    from kvserve.adapters.grpc_server import GuardedGRPCServer
    from kvserve.adapters.guard import Guard, GuardMiddleware, Limits
    from kvserve.adapters.lifecycle import Lifecycle
    from kvserve.adapters.lora_api import Adapters, register_lora_routes
    from kvserve.adapters.metrics import EngineMetrics
    from kvserve.adapters.openai_api import register_openai_routes
    from kvserve.adapters.predictor import KVServeModel, V2DataPlane

    model = KVServeModel(name, config, served_names=[config.served_model_name] if config.served_model_name else [],
                         stat_loggers=[EngineMetrics(name, config.max_loras)])
    try:
        model.load()
    except ValueError as e:  # engine settings the model or the device cannot honour (e.g. max_model_len)
        return _fail(str(e))
    model.limits = Limits(max_n=args.max_n, request_timeout=args.request_timeout)
    guard = Guard(args.api_key, args.api_key_protect_health, args.api_key_protect_metrics, args.max_request_bytes)
    app.add_middleware(GuardMiddleware, guard=guard)
    # Registered before ModelServer.start adds KServe's routes, so that these answer /v1/models and health.
    install_error_handlers(app)
    Lifecycle(model, args.shutdown_grace_period).register(app)
    _document_first_routes(app)
    register_openai_routes(app, model)
    register_generate_routes(app, model)
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1,
                                max_threads=args.max_threads, enable_grpc=False, enable_docs_url=args.enable_docs_url,
                                grace_period=args.shutdown_grace_period)
    server.dataplane = V2DataPlane(model_registry=server.registered_models)
    if args.enable_grpc:  # KServe's gRPC server plus the API key; ModelServer.stop stops it as its own
        from kserve.model_server import args as kserve_args

        server._grpc_server = GuardedGRPCServer(args.grpc_port, server.dataplane, server.model_repository_extension,
                                                vars(kserve_args), args.shutdown_grace_period, guard, model)
        server.servers.append(server._grpc_server.start(args.max_threads))
    # KServe adds its own routes in start(): these answer the repository paths for adapters first.
    adapters = Adapters(model, server.registered_models)
    adapters.register_loaded()
    register_lora_routes(app, adapters, server.model_repository_extension)
    if args.api_key:  # after ModelServer: it configures logging
        logging.getLogger("kvserve").info("API key required on inference and adapter routes (HTTP and gRPC)")
    server.start([model])
    return 0


def _document_first_routes(app) -> None:
    """kvserve's routes are registered before KServe's and answer where both have a path (/v1/models, health,
    the repository routes), but FastAPI's schema describes the last route of a path: build it from the routes
    in reverse, so that it describes what answers."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             openapi_version=app.openapi_version, routes=app.routes[::-1])
        return app.openapi_schema

    app.openapi = openapi


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["scaler"]:
        from kvserve.adapters.scaler import scaler_main

        return scaler_main(argv[1:])
    args = build_parser().parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
