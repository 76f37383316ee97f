"""Compose and Kubernetes manifests, validated offline.

What it checks: deploy/compose.yaml against the Compose Specification's JSON schema (vendored
in tests/data/deploy/, provenance beside it) plus the wiring the schema cannot see (Qdrant
health gates Atlas, pinned images, the ingest profile); every kustomization under deploy/k8s
rendered by a small renderer for the subset of kustomize these files use (resources,
namespace, configMapGenerator without hash suffixes, images, JSON 6902 patches; anything else
is an error, not silently skipped), and every rendered object validated with
kubernetes-validate in strict mode against Kubernetes 1.30; then the cross-object promises:
selectors match, probes and drain timing fit together, the Indexed training Job's torchrun
rendezvous resolves, and the GPU overlays ask for GPUs.
What it does not do: run kubectl, kustomize, Docker or a cluster (none exist here); the
renderer is not kustomize, so `kubectl kustomize deploy/k8s/base` remains the reference.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
UVICORN_SHUTDOWN_S = 5  # timeout_graceful_shutdown in atlas_server/commands/serve.py
KUSTOMIZATIONS = ["base", "training", "overlays/gpu", "overlays/gpu-training"]
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}


# --- a renderer for the kustomize subset used here ----------------------------------------

SUPPORTED_KEYS = {
    "apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions",
    "images", "patches",
}  # fmt: skip


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` would print, for the supported subset."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert spec["kind"] == "Kustomization"
    unsupported = set(spec) - SUPPORTED_KEYS
    assert not unsupported, f"{directory}: the test renderer does not implement {unsupported}"
    objects = []
    for reference in spec.get("resources", []):
        path = (directory / reference).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml lists missing {reference}"
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    objects += generated_config_maps(directory, spec)
    for image in spec.get("images", []):
        set_images(objects, image)
    for patch in spec.get("patches", []):
        apply_patch(objects, patch)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    return objects


def generated_config_maps(directory: Path, spec: dict) -> list[dict]:
    generators = spec.get("configMapGenerator", [])
    if generators:
        # Hash suffixes would need kustomize's name-reference rewriting; these files opt out.
        assert spec.get("generatorOptions", {}).get("disableNameSuffixHash") is True
    maps = []
    for generator in generators:
        assert set(generator) <= {"name", "files"}, generator
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        maps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return maps


def pod_specs(obj: dict) -> list[dict]:
    template = obj.get("spec", {}).get("template") or obj.get("spec", {}).get("jobTemplate", {})
    return [template["spec"]] if "spec" in template else []


def containers(obj: dict) -> list[dict]:
    return [c for s in pod_specs(obj) for c in s.get("initContainers", []) + s["containers"]]


def set_images(objects: list[dict], image: dict) -> None:
    assert set(image) <= {"name", "newName", "newTag"}, image
    for container in (c for obj in objects for c in containers(obj)):
        name, _, _ = container["image"].partition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def apply_patch(objects: list[dict], patch: dict) -> None:
    """A JSON 6902 patch applied to every object the target selects (at least one)."""
    assert set(patch) == {"target", "patch"}, "only inline JSON 6902 patches are supported"
    target = patch["target"]
    assert set(target) <= {"group", "version", "kind", "name"}, target
    matched = [
        obj
        for obj in objects
        if obj["kind"] == target["kind"]
        and obj["metadata"]["name"] == target["name"]
        and obj["apiVersion"] == "/".join(p for p in (target.get("group"), target["version"]) if p)
    ]
    assert matched, f"patch target {target} matches no object"
    for obj in matched:
        for operation in yaml.safe_load(patch["patch"]):
            apply_operation(obj, operation)


def apply_operation(document: dict, operation: dict) -> None:
    *parents, last = [
        part.replace("~1", "/").replace("~0", "~") for part in operation["path"].split("/")[1:]
    ]
    node = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    op = operation["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, operation["value"])
        elif op == "replace":
            node[index] = operation["value"]
        else:
            assert op == "remove", op
            del node[index]
        return
    if op in ("replace", "remove"):
        assert last in node, f"{op} {operation['path']}: nothing there"
    if op == "remove":
        del node[last]
    else:
        assert op in ("add", "replace"), op
        node[last] = operation["value"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / name) for name in KUSTOMIZATIONS}


def find(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def server_toml() -> dict:
    return tomllib.loads((K8S / "base" / "atlas.toml").read_text())


def drain_timeout_s() -> float:
    return float(server_toml()["http"]["drain_timeout_s"])


# --- the renderer itself ------------------------------------------------------------------


def test_renderer_applies_json_patches_and_refuses_what_it_cannot_do(tmp_path):
    deployment = {"spec": {"template": {"spec": {"containers": [{"name": "a", "env": []}]}}}}
    apply_operation(deployment, {"op": "add", "path": "/spec/template/spec/containers/0/env/-",
                                 "value": {"name": "X", "value": "1"}})  # fmt: skip
    apply_operation(deployment, {"op": "add", "path": "/spec/x~1y", "value": 2})
    assert deployment["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "X", "value": "1"}
    ]
    assert deployment["spec"]["x/y"] == 2
    with pytest.raises(AssertionError):
        apply_operation(deployment, {"op": "replace", "path": "/spec/missing", "value": 1})
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\ncommonLabels: {a: b}\n"
    )
    with pytest.raises(AssertionError, match="does not implement"):
        render(tmp_path)


# --- Kubernetes: schema validation --------------------------------------------------------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid_kubernetes(rendered, name):
    objects = rendered[name]
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects in {name}"


def test_strict_validation_rejects_a_misspelled_field(rendered):
    deployment = copy.deepcopy(find(rendered["base"], "Deployment", "atlas"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomizations_list_every_manifest_in_their_folder():
    for name in ("base", "training"):
        listed = set(yaml.safe_load((K8S / name / "kustomization.yaml").read_text())["resources"])
        on_disk = {p.name for p in (K8S / name).glob("*.yaml")} - {"kustomization.yaml"}
        assert listed == on_disk, f"{name}: listed {sorted(listed)} but found {sorted(on_disk)}"


# --- Kubernetes: the serving stack --------------------------------------------------------


@pytest.fixture(scope="module")
def base(rendered) -> list[dict]:
    return rendered["base"]


@pytest.fixture(scope="module")
def server(base) -> dict:
    return find(base, "Deployment", "atlas")


def server_container(deployment: dict) -> dict:
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"
    ]
    return container


def test_service_pdb_and_hpa_select_the_server(base, server):
    pod_labels = server["spec"]["template"]["metadata"]["labels"]
    selector = server["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = find(base, "Service", "atlas")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {
        p["name"] for p in server_container(server)["ports"]
    }
    pdb = find(base, "PodDisruptionBudget", "atlas")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = find(base, "HorizontalPodAutoscaler", "atlas")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "atlas",
    }
    assert hpa["spec"]["minReplicas"] >= 2 > pdb["spec"]["maxUnavailable"]


def test_server_probes_use_health_and_survive_the_drain(server):
    container = server_container(server)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    # /health answers 503 while draining; a liveness probe on it would restart a pod that is
    # doing exactly what it should.
    assert "httpGet" not in container["livenessProbe"]


def test_grace_period_covers_prestop_and_drain(server):
    spec = server["spec"]["template"]["spec"]
    prestop = server_container(server)["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    needed = float(prestop[1]) + drain_timeout_s() + UVICORN_SHUTDOWN_S
    assert spec["terminationGracePeriodSeconds"] > needed


def test_server_has_requests_limits_and_a_locked_down_security_context(server):
    spec = server["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    for container in spec["initContainers"] + spec["containers"]:
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["image"] == "atlas:cpu"
    # A read-only root needs somewhere to write temporary files.
    assert "/tmp" in {m["mountPath"] for m in server_container(server)["volumeMounts"]}


def test_server_config_secret_and_checkpoint_come_from_volumes(base, server):
    container = server_container(server)
    env = env_of(container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}

    config_map = find(base, "ConfigMap", volumes["config"]["configMap"]["name"])
    assert env["ATLAS_CONFIG"] == f"{mounts['config']['mountPath']}/atlas.toml"
    assert "atlas.toml" in config_map["data"]

    key_file = env["ATLAS_API_KEY_FILE"]
    secret = volumes["api-key"]["secret"]
    assert key_file == f"{mounts['api-key']['mountPath']}/{secret['items'][0]['path']}"
    assert "ATLAS_API_KEY" not in env  # never a literal key in a manifest

    claim = volumes["checkpoints"]["persistentVolumeClaim"]["claimName"]
    assert find(base, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env["ATLAS_CHECKPOINT"].startswith(mounts["checkpoints"]["mountPath"] + "/")
    assert mounts["checkpoints"]["readOnly"] is True


def test_server_config_points_rag_at_the_qdrant_service(base):
    url = server_toml()["rag"]["qdrant_url"]
    host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url).groups()
    service = find(base, "Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_server_config_is_a_valid_atlas_server_config():
    from atlas_server.config import load_config

    config = load_config(K8S / "base" / "atlas.toml")
    assert config.http.drain_timeout_s == drain_timeout_s()
    assert config.rag.enabled and config.rag.qdrant_url


def test_qdrant_is_a_statefulset_with_storage_and_a_headless_service(base):
    qdrant = find(base, "StatefulSet", "qdrant")
    headless = find(base, "Service", qdrant["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    labels = qdrant["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    (claim,) = qdrant["spec"]["volumeClaimTemplates"]
    (container,) = qdrant["spec"]["template"]["spec"]["containers"]
    assert claim["metadata"]["name"] in {m["name"] for m in container["volumeMounts"]}
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+(-unprivileged)?", container["image"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert qdrant["spec"]["replicas"] == 1  # more needs cluster mode: the Helm chart


def selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_only_atlas_pods_may_reach_qdrant(base, server):
    policy = find(base, "NetworkPolicy", "qdrant")
    qdrant_labels = find(base, "StatefulSet", "qdrant")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], qdrant_labels)
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    server_labels = server["spec"]["template"]["metadata"]["labels"]
    assert selects(peer["podSelector"], server_labels)
    assert not selects(peer["podSelector"], {"app.kubernetes.io/name": "something-else"})
    assert {p["port"] for p in rule["ports"]} == {6333, 6334}


# --- Kubernetes: training -----------------------------------------------------------------


def test_training_job_is_indexed_with_a_torchrun_rendezvous_at_pod_zero(rendered):
    objects = rendered["training"]
    job = find(objects, "Job", "atlas-train")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]) >= 2

    service = find(objects, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    # Indexed Job pods are named <job>-<index>; with the subdomain they resolve as such.
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"

    script = container["command"][-1]
    assert '--node-rank "$JOB_COMPLETION_INDEX"' in script
    assert '--nnodes "$NNODES"' in script and '--master-addr "$MASTER_ADDR"' in script
    config_mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["config"]
    assert f"atlas-train train --config {config_mount}/train.toml --resume" in script


def train_config(objects: list[dict]):
    """The Job's train.toml loaded by the trainer itself, with the Job's TRAIN_ARGS applied."""
    from trainer.config import load_train_config

    job = find(objects, "Job", "atlas-train")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    words = env_of(container)["TRAIN_ARGS"].split()
    assert words[::2] == ["--set"] * (len(words) // 2)
    text = find(objects, "ConfigMap", "atlas-train-config")["data"]["train.toml"]
    return load_train_config(K8S / "training" / "train.toml", words[1::2]), text


def test_training_config_is_valid_and_writes_to_the_checkpoints_volume(rendered):
    config, text = train_config(rendered["training"])
    assert text == (K8S / "training" / "train.toml").read_text()
    job = find(rendered["training"], "Job", "atlas-train")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config.run.out_dir.startswith(mounts["checkpoints"] + "/")
    assert config.data.path.startswith(mounts["datasets"] + "/")
    assert config.run.device == "cpu"


def test_gpu_training_overlay_trains_on_cuda_in_bf16(rendered):
    config, _ = train_config(rendered["overlays/gpu-training"])
    assert config.run.device == "cuda" and config.run.precision == "bf16"


def test_training_reads_datasets_and_writes_the_servers_checkpoint_volume(rendered):
    job = find(rendered["training"], "Job", "atlas-train")
    pod = job["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    server_volumes = find(rendered["base"], "Deployment", "atlas")["spec"]["template"]["spec"][
        "volumes"
    ]
    server_claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in server_volumes
        if "persistentVolumeClaim" in v
    }
    assert claims["checkpoints"] in server_claims
    find(rendered["training"], "PersistentVolumeClaim", claims["datasets"])
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["datasets"].get("readOnly") is True
    assert not mounts["checkpoints"].get("readOnly", False)


# --- Kubernetes: GPU overlays --------------------------------------------------------------


def test_gpu_overlay_serves_the_cuda_image_on_one_gpu(rendered):
    deployment = find(rendered["overlays/gpu"], "Deployment", "atlas")
    container = server_container(deployment)
    assert container["image"] == "atlas:cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert args[args.index("--device") + 1] == "cuda"
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    # The base is untouched by the overlay.
    assert (
        "nvidia.com/gpu"
        not in server_container(find(rendered["base"], "Deployment", "atlas"))["resources"][
            "limits"
        ]
    )


def test_gpu_training_runs_one_worker_per_gpu(rendered):
    job = find(rendered["overlays/gpu-training"], "Job", "atlas-train")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "atlas:cuda"
    assert env_of(container)["NPROC_PER_NODE"] == container["resources"]["limits"]["nvidia.com/gpu"]
    # The overlay patches env entries by position: each must still hit the variable it means.
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names))
    assert env_of(container)["OMP_NUM_THREADS"] == "4"


# --- Compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((REPO / "tests" / "data" / "deploy" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_follows_the_compose_specification(compose, compose_validator):
    errors = [f"{list(e.path)}: {e.message}" for e in compose_validator.iter_errors(compose)]
    assert not errors


def test_compose_schema_rejects_a_misspelled_key(compose, compose_validator):
    broken = copy.deepcopy(compose)
    broken["services"]["atlas"]["heathcheck"] = broken["services"]["atlas"].pop("healthcheck")
    assert list(compose_validator.iter_errors(broken))


def test_compose_starts_atlas_after_a_healthy_qdrant(compose):
    services = compose["services"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", services["qdrant"]["image"])
    assert "/readyz" in " ".join(services["qdrant"]["healthcheck"]["test"])
    atlas = services["atlas"]
    assert atlas["depends_on"]["qdrant"]["condition"] == "service_healthy"
    assert "/health" in " ".join(atlas["healthcheck"]["test"])
    # The mounted config (checked below to be atlas.toml) sends RAG to the qdrant service.
    host = re.fullmatch(r"http://([a-z0-9-]+):6333", server_toml()["rag"]["qdrant_url"]).group(1)
    assert host in services


def test_compose_keeps_data_in_named_volumes_and_the_key_in_a_secret(compose):
    services = compose["services"]
    named = set(compose["volumes"])
    qdrant_volumes = {v.split(":")[0] for v in services["qdrant"]["volumes"]}
    atlas_volumes = {v.split(":")[0] for v in services["atlas"]["volumes"]}
    assert "qdrant-storage" in qdrant_volumes & named
    assert "checkpoints" in atlas_volumes & named
    atlas = services["atlas"]
    assert atlas["environment"]["ATLAS_API_KEY_FILE"] == f"/run/secrets/{atlas['secrets'][0]}"
    assert "ATLAS_API_KEY" not in atlas["environment"]
    (config,) = atlas["configs"]
    assert (REPO / "deploy" / compose["configs"][config["source"]]["file"]).resolve() == (
        K8S / "base" / "atlas.toml"
    )


def test_compose_stop_grace_exceeds_the_drain_timeout(compose):
    grace = compose["services"]["atlas"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > drain_timeout_s() + UVICORN_SHUTDOWN_S


def test_compose_ingest_profile_runs_rag_ingest_against_the_qdrant_server(compose):
    ingest = compose["services"]["ingest"]
    assert ingest["profiles"] == ["ingest"]
    command = ingest["entrypoint"] + ingest["command"]
    assert command[:3] == ["atlas", "rag", "ingest"]
    assert command[command.index("--qdrant-url") + 1] == "http://qdrant:6333"
    assert "--collection" in command
    assert ingest["depends_on"]["qdrant"]["condition"] == "service_healthy"
