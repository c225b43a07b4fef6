"""KServe's gRPC server with kvserve's API-key interceptor in front and health answers that see the engine.

KServe builds its gRPC server inside `ModelServer.start` with a fixed interceptor list, so `kvserve serve`
starts ModelServer with gRPC off and adds this server in its place (as `ModelServer._grpc_server`, which
ModelServer.stop shuts down with its grace period, as it would its own).
"""
from concurrent import futures

from grpc import aio
from kserve.logging import logger
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer

from kvserve.adapters.guard import Guard, GrpcAuthInterceptor
from kvserve.adapters.predictor import KVServeModel


class _Servicer(InferenceServicer):
    """KServe's ServerLive / ServerReady always answer true; these answer what the HTTP routes answer."""

    def __init__(self, data_plane, extension, model: KVServeModel):
        super().__init__(data_plane, extension)
        self.model = model

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.model.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=await self.model.healthy())


class GuardedGRPCServer(GRPCServer):
    def __init__(self, port: int, data_plane, extension, kwargs: dict, grace_period: float, guard: Guard,
                 model: KVServeModel):
        super().__init__(port, data_plane, extension, kwargs, grace_period)
        self.guard, self.model = guard, model

    async def start(self, max_workers):  # KServe's GRPCServer.start, with the interceptor and servicer above
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(GrpcAuthInterceptor(self.guard), LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))])
        servicer = _Servicer(self._data_plane, self._model_repository_extension, self.model)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"[::]:{self._port}")
        logger.info("Starting gRPC server on [::]:%s with %s workers", self._port, max_workers)
        await self._server.start()
        await self._server.wait_for_termination()
