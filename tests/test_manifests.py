"""Every file in manifests/ checked offline: custom resources against the openAPIV3Schema of their CRD in
../shared/crds (KServe v0.20.0, KEDA v2.20.2), built-in kinds against Kubernetes' own JSON schemas (the
kubernetes-validate package), both strict about unknown fields as `kubectl apply` is by default. Broken
copies of each document must fail the same validation. The Grafana dashboard is checked for shape and for
naming only metrics that EngineMetrics exports."""
import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
from jsonschema.protocols import Validator
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource

from kvserve.adapters import scaler
from kvserve.adapters.metrics import EngineMetrics
from kvserve.runtime.stats import EngineStats, RequestEvent, StepStats

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
CRDS = ROOT.parent / "shared" / "crds"
DASHBOARD = MANIFESTS / "grafana" / "kvserve-dashboard.json"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 9 MB of YAML
K8S_VERSION = "1.33"  # Kubernetes schemas to check built-in kinds against
CLUSTER_SCOPED = {"ClusterServingRuntime", "ClusterRole", "ClusterRoleBinding", "Namespace"}


# ---------------------------------------------------------------- validation


def _strict(schema: dict) -> dict:
    """A Kubernetes structural schema as JSON Schema: unknown fields are errors unless the schema preserves
    them, int-or-string accepts both, nullable accepts null. CEL rules (x-kubernetes-validations) and
    defaults are not evaluated."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    if "items" in s:
        s["items"] = _strict(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


@functools.cache
def crd_validators() -> dict[tuple[str, str], tuple[Validator, str]]:
    """(apiVersion, kind) -> (validator, scope) for every served version of every CRD in shared/crds."""
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_LOADER)
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # checked as ObjectMeta below
            api_version = f"{crd['spec']['group']}/{version['name']}"
            out[(api_version, crd["spec"]["names"]["kind"])] = (jsonschema.Draft4Validator(schema),
                                                                crd["spec"]["scope"])
    return out


@functools.cache
def object_meta_validator() -> Validator:
    version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) == K8S_VERSION][-1]
    defs = kv_utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json",
                                    K8S_VERSION)
    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    ref = {"$ref": f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(ref, registry=registry)


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(root)"


def validate(doc) -> list[str]:
    """Every reason the API server (with strict field validation) would refuse `doc`; [] when valid."""
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return ["not a Kubernetes object: apiVersion and kind are required"]
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        errors = ["metadata.name: a name is required"]
    else:
        errors = []
    crd = crd_validators().get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        validator, _ = crd
        errors += [f"{_where(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        if isinstance(meta, dict):
            errors += [f"metadata.{_where(e.absolute_path)}: {e.message}"
                       for e in object_meta_validator().iter_errors(meta)]
        return errors
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"{_where(e.path)}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        errors.append(f"no schema for {doc['apiVersion']} {doc['kind']}: {e.message}")
    return errors


# ---------------------------------------------------------------- the manifests


def yaml_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents() -> list[tuple[str, int, dict]]:
    out = []
    for path in yaml_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((str(path.relative_to(MANIFESTS)), i, doc))
    return out


DOCS = documents()


def doc_id(item) -> str:
    file, i, doc = item
    return f"{file}#{i}-{doc.get('kind')}-{doc.get('metadata', {}).get('name')}"


def of_kind(kind: str) -> list[dict]:
    return [doc for _, _, doc in DOCS if doc.get("kind") == kind]


def test_every_manifest_file_is_covered():
    """New files cannot slip past: each is YAML (all documents validated below) or the dashboard."""
    files = sorted(p for p in MANIFESTS.rglob("*") if p.is_file())
    unchecked = [str(p.relative_to(MANIFESTS)) for p in files if p.suffix not in (".yaml", ".yml")
                 and p != DASHBOARD]
    assert unchecked == [], f"no test checks these manifest files: {unchecked}"
    assert DASHBOARD.is_file()
    for path in yaml_files():
        assert any(f == str(path.relative_to(MANIFESTS)) for f, _, _ in DOCS), f"{path} holds no document"
    kinds = {doc["kind"] for _, _, doc in DOCS}
    assert {"ServingRuntime", "ClusterServingRuntime", "InferenceService", "ScaledObject", "Deployment",
            "Service", "ServiceAccount", "Secret", "Role", "RoleBinding"} <= kinds


def test_crd_schemas_are_present():
    assert {("serving.kserve.io/v1beta1", "InferenceService"), ("serving.kserve.io/v1alpha1", "ServingRuntime"),
            ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"),
            ("keda.sh/v1alpha1", "ScaledObject")} <= set(crd_validators())


@pytest.mark.parametrize("item", DOCS, ids=doc_id)
def test_document_is_valid(item):
    _, _, doc = item
    assert validate(doc) == []
    cluster_scoped = doc["kind"] in CLUSTER_SCOPED or (
        (doc["apiVersion"], doc["kind"]) in crd_validators()
        and crd_validators()[(doc["apiVersion"], doc["kind"])][1] == "Cluster")
    # namespaced examples name their namespace: the scaler address and RBAC subjects depend on it
    assert ("namespace" in doc["metadata"]) != cluster_scoped


# ---------------------------------------------------------------- broken copies


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _set(path, value):
    def mutate(doc):
        _get(doc, path[:-1])[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(doc):
        del _get(doc, path[:-1])[path[-1]]
    return mutate


def _add(path, key):
    def mutate(doc):
        _get(doc, path)[key] = "unexpected"
    return mutate


# kind -> [(what is wrong, path that must exist, mutation, word the errors must mention)]
RUNTIME_BREAKS = [
    ("wrong type", ("spec", "containers"), _set(("spec", "containers"), "kserve-container"), "containers"),
    ("unknown field", ("spec", "containers", 0), _add(("spec", "containers", 0), "imagee"), "imagee"),
    ("missing required", ("spec", "containers"), _delete(("spec", "containers")), "containers"),
    ("missing required", ("spec", "supportedModelFormats", 0, "name"),
     _delete(("spec", "supportedModelFormats", 0, "name")), "name"),
    ("pod annotation not a string", ("spec", "annotations"),
     _set(("spec", "annotations", "prometheus.kserve.io/port"), 8080), "prometheus.kserve.io/port"),
]
BREAKS = {
    "ServingRuntime": RUNTIME_BREAKS,
    "ClusterServingRuntime": RUNTIME_BREAKS,
    "InferenceService": [
        ("wrong type", ("spec", "predictor"), _set(("spec", "predictor", "minReplicas"), "one"), "minReplicas"),
        ("unknown field", ("spec", "predictor", "model"), _add(("spec", "predictor", "model"), "storageURI"),
         "storageURI"),
        ("missing required", ("spec", "predictor"), _delete(("spec", "predictor")), "predictor"),
        ("missing required", ("spec", "predictor", "model", "modelFormat", "name"),
         _delete(("spec", "predictor", "model", "modelFormat", "name")), "name"),
        ("not in enum", ("spec", "predictor", "autoScaling", "metrics", 0, "type"),
         _set(("spec", "predictor", "autoScaling", "metrics", 0, "type"), "Externall"), "Externall"),
        ("missing required", ("spec", "predictor", "autoScaling", "metrics", 0, "external", "target"),
         _delete(("spec", "predictor", "autoScaling", "metrics", 0, "external", "target")), "target"),
        ("annotation not a string", ("metadata", "annotations"),
         _set(("metadata", "annotations", "serving.kserve.io/s3-usehttps"), 0), "s3-usehttps"),
    ],
    "ScaledObject": [
        ("wrong type", ("spec", "minReplicaCount"), _set(("spec", "minReplicaCount"), "1"), "minReplicaCount"),
        ("unknown field", ("spec",), _add(("spec",), "cooldown"), "cooldown"),
        ("missing required", ("spec", "scaleTargetRef"), _delete(("spec", "scaleTargetRef")), "scaleTargetRef"),
        # YAML's unquoted 4 is an int; trigger metadata is a map of strings
        ("metadata value not a string", ("spec", "triggers", 0, "metadata"),
         _set(("spec", "triggers", 0, "metadata", "targetQueueDepth"), 4), "targetQueueDepth"),
    ],
    "Deployment": [
        ("wrong type", ("spec", "replicas"), _set(("spec", "replicas"), "one"), "replicas"),
        ("unknown field", ("spec", "template", "spec", "containers", 0),
         _add(("spec", "template", "spec", "containers", 0), "imagee"), "imagee"),
        ("missing required", ("spec", "selector"), _delete(("spec", "selector")), "selector"),
    ],
    "Service": [
        ("wrong type", ("spec", "ports", 0, "port"), _set(("spec", "ports", 0, "port"), "grpc"), "port"),
        ("unknown field", ("spec",), _add(("spec",), "portz"), "portz"),
        ("missing required", ("spec", "ports", 0, "port"), _delete(("spec", "ports", 0, "port")), "port"),
    ],
    "ServiceAccount": [
        ("wrong type", ("metadata",), _set(("secrets",), "kvserve-s3"), "secrets"),
        ("unknown field", ("metadata",), _add((), "automountToken"), "automountToken"),
    ],
    "Secret": [
        ("wrong type", ("stringData",), _set(("stringData", "AWS_ACCESS_KEY_ID"), 1234), "AWS_ACCESS_KEY_ID"),
        ("unknown field", ("metadata",), _add((), "stringdata"), "stringdata"),
        ("wrong type", ("type",), _set(("type",), 1), "type"),
    ],
    "Role": [
        ("wrong type", ("rules", 0, "verbs"), _set(("rules", 0, "verbs"), "list"), "verbs"),
        ("unknown field", ("rules", 0), _add(("rules", 0), "resource"), "resource"),
        ("missing required", ("rules", 0, "verbs"), _delete(("rules", 0, "verbs")), "verbs"),
    ],
    "RoleBinding": [
        ("wrong type", ("roleRef", "kind"), _set(("roleRef", "kind"), 1), "kind"),
        ("unknown field", ("subjects", 0), _add(("subjects", 0), "nam"), "nam"),
        ("missing required", ("roleRef",), _delete(("roleRef",)), "roleRef"),
    ],
}
# every kind, whatever it is
COMMON_BREAKS = [
    ("name not a string", ("metadata", "name"), _set(("metadata", "name"), 123), "name"),
    ("missing name", ("metadata", "name"), _delete(("metadata", "name")), "name"),
    ("unknown top-level field", ("metadata",), _add((), "specification"), "specification"),
]


def _applicable(doc):
    for what, needs, mutate, word in BREAKS.get(doc["kind"], []) + COMMON_BREAKS:
        try:
            _get(doc, needs)
        except (KeyError, IndexError, TypeError):
            continue
        yield what, mutate, word


BROKEN = [(item, what, mutate, word) for item in DOCS for what, mutate, word in _applicable(item[2])]


def test_every_kind_has_broken_copies():
    for _, _, doc in DOCS:
        assert doc["kind"] in BREAKS, f"add broken copies of {doc['kind']} to BREAKS"
        assert len(list(_applicable(doc))) >= 5, doc_id(("", 0, doc))


@pytest.mark.parametrize("item,what,mutate,word", BROKEN,
                         ids=[f"{doc_id(b[0])}-{b[1]}-{b[3]}" for b in BROKEN])
def test_broken_copy_fails(item, what, mutate, word):
    broken = copy.deepcopy(item[2])
    mutate(broken)
    errors = validate(broken)
    assert errors, f"{what} went unnoticed"
    assert word in " ".join(errors), errors


def test_validate_refuses_unknown_kinds():
    assert validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert validate({"kind": "Deployment"})


# ---------------------------------------------------------------- what the examples say


def test_serving_runtimes_follow_kserve_conventions():
    runtimes = of_kind("ServingRuntime") + of_kind("ClusterServingRuntime")
    assert len(runtimes) == 2 and runtimes[0]["spec"] == runtimes[1]["spec"]
    spec = runtimes[0]["spec"]
    assert spec["annotations"] == {"prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics"}
    assert {f["name"] for f in spec["supportedModelFormats"]} == {"kvserve", "huggingface"}
    [container] = spec["containers"]
    assert container["name"] == "kserve-container"
    assert {"--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080"} <= set(container["args"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    # the load-time budget promised in the comments and docs/DEPLOY.md
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_inference_services_run_standard_mode_on_kvserve():
    isvcs = of_kind("InferenceService")
    formats = {f["name"] for f in of_kind("ServingRuntime")[0]["spec"]["supportedModelFormats"]}
    assert len(isvcs) >= 5
    for isvc in isvcs:
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == "kvserve" and model["modelFormat"]["name"] in formats
    uris = [i["spec"]["predictor"]["model"]["storageUri"] for i in isvcs]
    assert any(u.startswith("s3://") for u in uris) and any(u.startswith("hf://") for u in uris)
    assert any("--lora-modules" in i["spec"]["predictor"]["model"].get("args", []) for i in isvcs)


def test_s3_credentials_reach_the_predictor():
    [secret] = of_kind("Secret")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert {"serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps",
            "serving.kserve.io/s3-region"} <= set(secret["metadata"]["annotations"])
    [account] = [sa for sa in of_kind("ServiceAccount") if sa["metadata"]["name"] != "kvserve-scaler"]
    assert {"name": secret["metadata"]["name"]} in account["secrets"]
    for isvc in of_kind("InferenceService"):
        if isvc["spec"]["predictor"]["model"]["storageUri"].startswith("s3://"):
            assert isvc["spec"]["predictor"]["serviceAccountName"] == account["metadata"]["name"]


def test_kserve_native_keda_route():
    [isvc] = [i for i in of_kind("InferenceService")
              if i["metadata"]["annotations"].get("serving.kserve.io/autoscalerClass") == "keda"]
    [m] = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
    assert m["type"] == "External" and m["external"]["metric"]["backend"] == "prometheus"
    assert "vllm:num_requests_waiting" in m["external"]["metric"]["query"]
    assert isvc["spec"]["predictor"]["minReplicas"] >= 1  # see the scale-from-zero notes


def test_scaled_object_reaches_the_scaler_and_the_predictor():
    [so] = of_kind("ScaledObject")
    isvc_name = so["spec"]["scaleTargetRef"]["name"].removesuffix("-predictor")
    [isvc] = [i for i in of_kind("InferenceService") if i["metadata"]["name"] == isvc_name]
    # KServe must leave the replica count to KEDA
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    assert so["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert so["metadata"]["namespace"] == isvc["metadata"]["namespace"]
    [trigger] = so["spec"]["triggers"]
    assert trigger["type"] == "external"
    md = trigger["metadata"]
    parsed = scaler.Trigger.parse(md)  # the scaler accepts this metadata
    assert parsed.service == f"{isvc_name}-predictor" and parsed.model_name == isvc_name
    [svc] = [s for s in of_kind("Service") if s["metadata"]["name"] == "kvserve-scaler"]
    [port] = svc["spec"]["ports"]
    assert md["scalerAddress"] == (f"{svc['metadata']['name']}.{svc['metadata']['namespace']}"
                                   f".svc.cluster.local:{port['port']}")
    [deployment] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "kvserve-scaler"]
    pod = deployment["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    assert container["command"] == ["kvserve", "scaler"]
    args = scaler._parser().parse_args(container["args"])  # flags the scaler really has
    assert args.port == 9090 and container["ports"][0]["containerPort"] == 9090
    assert so["spec"]["minReplicaCount"] >= 1  # see the scale-from-zero notes


def test_scaler_rbac_allows_listing_endpoint_slices():
    [role] = of_kind("Role")
    assert any("discovery.k8s.io" in r["apiGroups"] and "endpointslices" in r["resources"] and "list" in r["verbs"]
               for r in role["rules"])
    [binding] = of_kind("RoleBinding")
    [deployment] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "kvserve-scaler"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": deployment["spec"]["template"]["spec"]["serviceAccountName"],
            "namespace": deployment["metadata"]["namespace"]} in binding["subjects"]


# ---------------------------------------------------------------- the dashboard

PANEL_METRICS = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
                 "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
                 "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:lora_requests_info"]
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


@functools.cache
def exported_names() -> frozenset[str]:
    """Sample names (with _total/_bucket/_sum/_count) EngineMetrics puts on /metrics after one step."""
    model = "dashboard-check"
    EngineMetrics(model, max_loras=2)(StepStats(EngineStats(num_running=1, running_loras=["a"]), [
        RequestEvent("r", 3, 1, True, True, "stop", 1.0, 1.5, 2.0, 2.0, 1)]))
    return frozenset(s.name for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())
                     for s in f.samples if s.labels.get("model_name") == model)


def dashboard_errors(dash) -> list[str]:
    errors = []
    if dash.get("uid") != "kvserve":
        errors.append(f"uid must be the fixed 'kvserve', got {dash.get('uid')!r}")
    for key in ("title", "panels", "templating", "schemaVersion"):
        if key not in dash:
            errors.append(f"missing {key}")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    if (ds.get("type"), ds.get("query")) != ("datasource", "prometheus"):
        errors.append("needs a 'datasource' variable of type datasource for prometheus")
    if variables.get("model_name", {}).get("type") != "query":
        errors.append("needs a 'model_name' query variable")
    ids, used = set(), set()
    for panel in dash.get("panels", []):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids or not isinstance(panel.get("id"), int):
            errors.append(f"{where}: ids must be unique integers")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in "hwxy") or grid["x"] + grid["w"] > 24:
            errors.append(f"{where}: gridPos must fit Grafana's 24 columns")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"{where}: must use the datasource variable")
        targets = panel.get("targets") or []
        if not targets or len({t.get("refId") for t in targets}) != len(targets):
            errors.append(f"{where}: needs targets with unique refIds")
        for t in targets:
            expr = t.get("expr", "")
            for name in re.findall(r"vllm:[a-zA-Z0-9_:]+", expr):  # [a-z_]+ alone would cut e2e
                used.add(name)
                if name not in exported_names():
                    errors.append(f"{where}: {name} is not exported by EngineMetrics")
            for var in re.findall(r"\$\{?(\w+)", expr):
                if var not in variables and var not in BUILTIN_VARIABLES:
                    errors.append(f"{where}: undefined variable ${var}")
    for metric in PANEL_METRICS:
        if not any(u == metric or u.startswith(metric + "_") for u in used):
            errors.append(f"no panel shows {metric}")
    return errors


def test_dashboard_is_valid_and_names_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dashboard_errors(dash) == []


def test_exported_names_carry_prometheus_suffixes():
    names = exported_names()
    assert {"vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds_bucket",
            "vllm:e2e_request_latency_seconds_count", "vllm:num_requests_waiting"} <= names
    assert "vllm:prompt_tokens" not in names  # a counter is only ever read as _total


@pytest.mark.parametrize("what,mutate,word", [
    ("misspelt metric", lambda d: d["panels"][0]["targets"][0].update(
        expr=d["panels"][0]["targets"][0]["expr"].replace("vllm:num_requests_running", "vllm:num_request_running")),
     "vllm:num_request_running"),
    ("counter without _total", lambda d: d["panels"][4]["targets"][0].update(expr="rate(vllm:prompt_tokens[5m])"),
     "vllm:prompt_tokens"),
    ("no uid", lambda d: d.pop("uid"), "uid"),
    ("hard-wired datasource", lambda d: d["panels"][1].update(datasource={"type": "prometheus", "uid": "prom1"}),
     "datasource"),
    ("no datasource variable", lambda d: d["templating"]["list"].pop(0), "datasource"),
    ("undefined variable", lambda d: d["panels"][2]["targets"][0].update(
        expr=d["panels"][2]["targets"][0]["expr"] + ' * on() group_left vllm:num_requests_running{pod="$pod"}'),
     "$pod"),
    ("duplicate panel id", lambda d: d["panels"][3].update(id=d["panels"][2]["id"]), "unique"),
    ("panel dropped", lambda d: d.update(panels=[p for p in d["panels"] if "Queue time" not in p["title"]]),
     "vllm:request_queue_time_seconds"),
])
def test_broken_dashboard_fails(what, mutate, word):
    dash = json.loads(DASHBOARD.read_text())
    mutate(dash)
    errors = dashboard_errors(dash)
    assert errors and word in " ".join(errors), (what, errors)
