"""`kvserve scaler`: a KEDA external scaler (gRPC, KEDA's externalscaler.proto) that reports the predictors'
summed queue depth against a per-replica target.

It runs as its own small Deployment, so it is alive while the predictors are at zero replicas; at zero it
finds no predictor to read and reports 0 (docs/DEPLOY.md says what wakes a service from zero).

Trigger metadata (ScaledObject `triggers[].metadata`, all strings; unknown keys such as scalerAddress are
ignored):
  targetQueueDepth      queue depth one replica should carry (> 0, default 2). KEDA's HPA divides the total
                        by it: desired replicas = ceil(total / targetQueueDepth).
  activationQueueDepth  IsActive is true while total > this (>= 0, default 0): it decides 0 <-> 1 replicas.
  includeRunning        "true": count vllm:num_requests_running as well as vllm:num_requests_waiting
                        (default "false"). Waiting alone counts only requests the engine could not admit, the
                        signal that a replica is saturated; waiting + running is the concurrency, which scales
                        earlier but needs a target near the engine's max_num_seqs.
  modelName             only series with this model_name label (default: all models on the predictor).
  service               a Service in the ScaledObject's namespace whose ready endpoints are the predictors
                        (overrides --targets / --service; needs the in-cluster API).
"""
import argparse
import asyncio
import json
import logging
import math
import os
import signal
import ssl
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Mapping

import grpc
from prometheus_client.parser import text_string_to_metric_families

from kvserve.adapters.protos import externalscaler_pb2 as pb
from kvserve.adapters.protos import externalscaler_pb2_grpc as pb_grpc

log = logging.getLogger("kvserve.scaler")

METRIC_NAME = "kvserve-queue-depth"
WAITING, RUNNING = "vllm:num_requests_waiting", "vllm:num_requests_running"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass
class Trigger:
    target: float = 2.0
    activation: float = 0.0
    include_running: bool = False
    model_name: str | None = None
    service: str | None = None

    @classmethod
    def parse(cls, md: Mapping[str, str]) -> "Trigger":
        """Raises ValueError naming the bad key."""
        t = cls(model_name=md.get("modelName") or None, service=md.get("service") or None)
        if "targetQueueDepth" in md:
            t.target = _number(md, "targetQueueDepth")
            if t.target <= 0:
                raise ValueError(f"targetQueueDepth must be > 0, got {md['targetQueueDepth']!r}")
        if "activationQueueDepth" in md:
            t.activation = _number(md, "activationQueueDepth")
            if t.activation < 0:
                raise ValueError(f"activationQueueDepth must be >= 0, got {md['activationQueueDepth']!r}")
        if "includeRunning" in md:
            value = md["includeRunning"].strip().lower()
            if value not in ("true", "false"):
                raise ValueError(f"includeRunning must be 'true' or 'false', got {md['includeRunning']!r}")
            t.include_running = value == "true"
        return t


def _number(md: Mapping[str, str], key: str) -> float:
    try:
        value = float(md[key])
    except ValueError:
        raise ValueError(f"{key} must be a number, got {md[key]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {md[key]!r}")
    return value


def queue_depth(text: str, include_running: bool = False, model_name: str | None = None) -> float:
    """Sum of the queue-depth gauges in one Prometheus text exposition."""
    names = {WAITING, RUNNING} if include_running else {WAITING}
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in names and (model_name is None or s.labels.get("model_name") == model_name):
                total += s.value
    return total


class KubeEndpoints:
    """Ready addresses behind a Service, from the API server's EndpointSlices (discovery.k8s.io/v1; the
    Endpoints API is deprecated since Kubernetes 1.33). Plain HTTPS with the pod's service-account token."""

    def __init__(self, api_url: str, token: str, ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0):
        self.api_url, self.token, self.ssl_context, self.timeout = api_url.rstrip("/"), token, ssl_context, timeout

    @classmethod
    def in_cluster(cls) -> "KubeEndpoints":
        # Untested here (needs a cluster): the service-account files and env vars every pod gets.
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset); "
                               "use --targets host:port,... instead of a Service")
        with open(f"{SA_DIR}/token") as f:
            token = f.read().strip()
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token, ssl.create_default_context(cafile=f"{SA_DIR}/ca.crt"))

    def addresses(self, service: str, namespace: str, port: int) -> list[str]:
        selector = urllib.parse.quote(f"kubernetes.io/service-name={service}")
        url = (f"{self.api_url}/apis/discovery.k8s.io/v1/namespaces/{urllib.parse.quote(namespace)}"
               f"/endpointslices?labelSelector={selector}")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}",
                                                       "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout, context=self.ssl_context) as response:
            slices = json.load(response)
        out = []
        for item in slices.get("items", []):
            for endpoint in item.get("endpoints") or []:
                # a predictor that is not ready is still loading its model: it has no queue yet
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for address in endpoint.get("addresses", []):
                    out.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
        return sorted(set(out))


class QueueDepthScaler(pb_grpc.ExternalScalerServicer):
    def __init__(self, targets: list[str] | None = None, service: str | None = None, namespace: str = "default",
                 kube: KubeEndpoints | None = None, metrics_port: int = 8080, scrape_timeout: float = 2.0,
                 push_interval: float = 5.0):
        self.targets, self.service, self.namespace = targets or [], service, namespace
        self.kube, self.metrics_port = kube, metrics_port
        self.scrape_timeout, self.push_interval = scrape_timeout, push_interval
        self._down: set[str] = set()  # predictors already reported unreachable

    async def _predictors(self, trigger: Trigger, ref: pb.ScaledObjectRef) -> list[str]:
        if trigger.service or self.service:
            service = trigger.service or self.service
            namespace = (ref.namespace or self.namespace) if trigger.service else self.namespace
            if self.kube is None:
                self.kube = KubeEndpoints.in_cluster()
            return await asyncio.to_thread(self.kube.addresses, service, namespace, self.metrics_port)
        if not self.targets:
            raise RuntimeError("no predictors configured: start the scaler with --targets or --service, "
                               "or set the trigger metadata 'service'")
        return self.targets

    async def _scrape(self, address: str, trigger: Trigger) -> float:
        def fetch() -> str:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=self.scrape_timeout) as response:
                return response.read().decode()
        try:
            value = queue_depth(await asyncio.to_thread(fetch), trigger.include_running, trigger.model_name)
        except Exception as e:  # a predictor that is down or starting counts as 0, and is logged once
            if address not in self._down:
                self._down.add(address)
                log.warning("predictor %s unreachable, counting it as 0: %s", address, e)
            return 0.0
        if address in self._down:
            self._down.discard(address)
            log.info("predictor %s reachable again", address)
        return value

    async def _measure(self, ref: pb.ScaledObjectRef, context) -> tuple[Trigger, float]:
        """The trigger's settings and the summed queue depth, or the RPC aborted with a status saying why."""
        try:
            trigger = Trigger.parse(ref.scalerMetadata)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad trigger metadata: {e}")
        try:
            addresses = await self._predictors(trigger, ref)
        except Exception as e:  # the Kubernetes API or the configuration failed, not one predictor
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot find the predictors: {e}")
        return trigger, sum(await asyncio.gather(*(self._scrape(a, trigger) for a in addresses)))

    async def IsActive(self, request, context):
        trigger, total = await self._measure(request, context)
        return pb.IsActiveResponse(result=total > trigger.activation)

    async def StreamIsActive(self, request, context):
        # KEDA's external-push trigger holds this stream open; send the first state at once, then changes.
        last = None
        while True:
            trigger, total = await self._measure(request, context)
            active = total > trigger.activation
            if active != last:
                yield pb.IsActiveResponse(result=active)
                last = active
            await asyncio.sleep(self.push_interval)

    async def GetMetricSpec(self, request, context):
        try:
            trigger = Trigger.parse(request.scalerMetadata)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad trigger metadata: {e}")
        return pb.GetMetricSpecResponse(metricSpecs=[pb.MetricSpec(
            metricName=METRIC_NAME, targetSize=math.ceil(trigger.target), targetSizeFloat=trigger.target)])

    async def GetMetrics(self, request, context):
        if request.metricName and request.metricName != METRIC_NAME:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown metric {request.metricName!r}; this scaler reports {METRIC_NAME!r}")
        _, total = await self._measure(request.scaledObjectRef, context)
        return pb.GetMetricsResponse(metricValues=[pb.MetricValue(
            metricName=METRIC_NAME, metricValue=int(total), metricValueFloat=total)])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve scaler", description="KEDA external scaler on predictor queue depth")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9090, help="gRPC port (default 9090; 0 picks a free one)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--targets", default="", help="static predictor addresses host:port,host:port")
    where.add_argument("--service", help="Service whose ready EndpointSlice addresses are the predictors")
    p.add_argument("--namespace", help="namespace of --service (default: this pod's namespace)")
    p.add_argument("--metrics-port", type=int, default=8080,
                   help="predictor port serving /metrics, used with --service (default 8080)")
    p.add_argument("--scrape-timeout", type=float, default=2.0, help="seconds per /metrics scrape (default 2)")
    p.add_argument("--push-interval", type=float, default=5.0,
                   help="seconds between StreamIsActive checks (default 5)")
    return p


def _own_namespace() -> str:
    try:
        with open(f"{SA_DIR}/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"


async def _serve(args: argparse.Namespace, targets: list[str]) -> None:
    scaler = QueueDepthScaler(targets, args.service, args.namespace or _own_namespace(),
                              KubeEndpoints.in_cluster() if args.service else None, args.metrics_port,
                              args.scrape_timeout, args.push_interval)
    server = grpc.aio.server()
    pb_grpc.add_ExternalScalerServicer_to_server(scaler, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    where = f"service {args.service}" if args.service else (",".join(targets) or "trigger metadata 'service'")
    # the first stdout line tells a parent process which port was bound (--port 0)
    print(f"kvserve scaler listening on {args.host}:{port}, predictors: {where}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=2)


def scaler_main(argv: list[str] | None = None) -> int:
    """`kvserve scaler ARGS`; returns the exit status (2: bad flags, 1: cannot start)."""
    args = _parser().parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if not t.rpartition(":")[0] or not t.rpartition(":")[2].isdigit()]
    if bad:
        print(f"kvserve scaler: --targets wants host:port entries, got {', '.join(bad)}", file=sys.stderr)
        return 2
    if args.scrape_timeout <= 0 or args.push_interval <= 0:
        print("kvserve scaler: --scrape-timeout and --push-interval must be > 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args, targets))
    except (RuntimeError, OSError) as e:  # not in a cluster with --service, port taken, ...
        print(f"kvserve scaler: {e}", file=sys.stderr)
        return 1
    return 0
