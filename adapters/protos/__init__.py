"""KEDA's external-scaler protocol (externalscaler.proto, KEDA v2.20.2) and its generated Python code.

Regenerate from this folder with
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. externalscaler.proto
then make the import in externalscaler_pb2_grpc.py package-relative (`from . import externalscaler_pb2 ...`).
The generated code checks its runtime at import: protobuf >= 6.33.5 (< 7) and grpcio >= 1.81.1.
"""
