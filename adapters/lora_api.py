"""LoRA adapters as first-class model names.

An adapter loaded into the engine is also registered with KServe as an `AdapterModel`, so the v2 routes
(`/v2/models/{adapter}/infer`, metadata, readiness; REST and gRPC) answer under its name; the generate and
OpenAI routes resolve the same names through `KVServeModel.resolve`. Loading and unloading at run time:

    POST /v2/repository/models/{name}/load     optional body {"parameters": {"path": "<folder|s3://…|hf://…>"}}
    POST /v2/repository/models/{name}/unload
    POST /v1/load_lora_adapter                 {"lora_name": …, "lora_path": …}   (vLLM's)
    POST /v1/unload_lora_adapter               {"lora_name": …}

Without a path, `load` takes the model folder's `adapters/{name}`. The repository routes keep KServe's own
behaviour for the base model's name.
"""
import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kserve import Model
from kserve.model_repository import ModelRepository

from kvserve.adapters.model_source import ModelSourceError, resolve_adapter_dir
from kvserve.adapters.predictor import KVServeModel

log = logging.getLogger("kvserve.lora")


class AdapterModel(Model):
    """The base model under an adapter's name: every request runs with that adapter."""

    def __init__(self, name: str, base: KVServeModel):
        super().__init__(name, return_response_headers=True)
        self.base = base
        self.ready = True

    async def healthy(self) -> bool:
        return await self.base.healthy() and self.name in self.base.adapters()

    def get_input_types(self) -> list[dict]:
        return self.base.get_input_types()

    def get_output_types(self) -> list[dict]:
        return self.base.get_output_types()

    async def predict(self, payload, headers=None, response_headers=None):
        return await self.base.predict(payload, headers, response_headers, lora=self.name)


class Adapters:
    """Loads adapters into the engine and keeps KServe's model registry in step."""

    def __init__(self, base: KVServeModel, registry: ModelRepository):
        self.base, self.registry = base, registry

    def register_loaded(self) -> None:
        for name in self.base.adapters():
            self.registry.update(AdapterModel(name, self.base))

    async def load(self, name: str, source: str | None) -> None:
        if name == self.base.name or name in self.base.served_names:
            raise ValueError(f"{name!r} is the base model's name, not an adapter's")
        if source is None:
            source = str(Path(self.base.config.model) / "adapters" / name)
        path = await asyncio.to_thread(resolve_adapter_dir, source)
        await self.base.async_engine.add_lora(name, str(path))
        self.registry.update(AdapterModel(name, self.base))
        log.info("loaded LoRA adapter %s from %s", name, source)

    async def unload(self, name: str) -> None:
        if name not in self.base.adapters():
            raise KeyError(name)
        await self.base.async_engine.remove_lora(name)
        self.registry.models.pop(name, None)
        log.info("unloaded LoRA adapter %s", name)


def _error(status: int, message: str, openai: bool) -> JSONResponse:
    if openai:
        kind = "NotFoundError" if status == 404 else "BadRequestError"
        return JSONResponse({"error": {"message": message, "type": kind, "param": "lora_name", "code": status}},
                            status_code=status)
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def register_lora_routes(app: FastAPI, adapters: Adapters, extension) -> None:
    """Registered before KServe adds its routes, so these answer the repository paths; `extension` is KServe's
    ModelRepositoryExtension, which keeps serving the names that are not adapters."""

    async def act(coro, openai: bool, ok: dict):
        try:
            await coro
        except KeyError as e:
            return _error(404, f"unknown LoRA adapter {e.args[0]!r}", openai)
        except (ValueError, ModelSourceError) as e:
            return _error(400, str(e), openai)
        return JSONResponse(ok)

    @app.post("/v2/repository/models/{model_name}/load", tags=["lora"])
    async def repository_load(model_name: str, request: Request):
        if model_name == adapters.base.name:
            await extension.load(model_name)
            return {"name": model_name, "load": True}
        try:
            params = (await _body(request)).get("parameters") or {}
        except ValueError as e:
            return _error(400, str(e), False)
        return await act(adapters.load(model_name, params.get("path")), False, {"name": model_name, "load": True})

    @app.post("/v2/repository/models/{model_name}/unload", tags=["lora"])
    async def repository_unload(model_name: str):
        if model_name == adapters.base.name:
            await extension.unload(model_name)
            return {"name": model_name, "unload": True}
        return await act(adapters.unload(model_name), False, {"name": model_name, "unload": True})

    @app.post("/v1/load_lora_adapter", tags=["lora"])
    async def load_lora_adapter(request: Request):
        try:
            body = await _body(request)
        except ValueError as e:
            return _error(400, str(e), True)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return _error(400, "give lora_name and lora_path as strings", True)
        return await act(adapters.load(name, path), True, {"lora_name": name, "loaded": True})

    @app.post("/v1/unload_lora_adapter", tags=["lora"])
    async def unload_lora_adapter(request: Request):
        try:
            name = (await _body(request)).get("lora_name")
        except ValueError as e:
            return _error(400, str(e), True)
        if not isinstance(name, str):
            return _error(400, "give lora_name as a string", True)
        return await act(adapters.unload(name), True, {"lora_name": name, "unloaded": True})
