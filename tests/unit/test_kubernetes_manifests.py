"""deploy/kubernetes/: every manifest valid against Kubernetes' own schemas, and what issue 22
asks of them: several replicas, a ReadWriteMany workspace claim, probes on /health, a
PodDisruptionBudget over the Deployment's pods, a termination grace above SHUTDOWN_GRACE_S.

Validated offline with PyPI's kubernetes-validate (pinned in pyproject's test extras): it ships
the schemas of each Kubernetes release it knows, strict (an unknown field fails), here against
1.30 (the oldest release with the fields used: ``appArmorProfile``) and the newest it has.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from claude_code_api.config.settings import load_settings

MANIFESTS = Path(__file__).parents[2] / "deploy" / "kubernetes"
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def documents() -> dict[str, dict]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[f"{path.name}:{document['kind']}"] = document
    return found


def by_kind(kind: str) -> dict:
    [document] = [d for d in documents().values() if d["kind"] == kind]
    return document


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(documents()))
def test_each_manifest_is_valid_against_kubernetes_schemas(name, version):
    kubernetes_validate.validate(documents()[name], version, strict=True)


def test_the_set_holds_what_several_replicas_need():
    kinds = sorted(d["kind"] for d in documents().values())
    assert kinds == [
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    ]
    deployment = by_kind("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        document = by_kind(kind)
        selector = document["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind

    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "/health" in str(container[probe]), probe
    claim = by_kind("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    [workspaces] = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert workspaces["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert mounted[workspaces["name"]] == env["WORKSPACES_DIR"]
    secret = by_kind("Secret")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert {"API_KEYS", "DATABASE_URL"} <= secret["stringData"].keys()

    # The settings as the service reads them: valid, and the pod's grace above the service's.
    settings = load_settings({**env, **secret["stringData"]})
    assert settings.database_url is not None
    needed_s = settings.shutdown_grace_s + settings.interrupt_grace_s
    assert pod["terminationGracePeriodSeconds"] > needed_s + 5
