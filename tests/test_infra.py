"""infra/: every manifest parses and agrees with the project (nothing is built or applied here).

Checks: commands run in containers are real `influence` subcommands; every image
is the same name and its tag is the package version; Ray versions agree
(Dockerfile base, constraints pin, KubeRay rayVersion); GPU workers request as
many GPUs as Ray is told they have, requests equal limits; the job file that the
manifests mount is valid for the project's own loader and joins the cluster.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import config_from_dict

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

INFRA = Path(__file__).resolve().parent.parent / "infra"
YAMLS = sorted(INFRA.rglob("*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def version() -> str:
    return tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]["version"]


def pins() -> dict[str, str]:
    lines = (INFRA / "constraints-cuda.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def containers(doc: dict) -> list[dict]:
    """Every container spec inside a Kubernetes object (any depth)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            for key in ("containers", "initContainers"):
                if isinstance(x.get(key), list):
                    found.extend(x[key])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(doc)
    return found


def influence_commands(text: str) -> list[list[str]]:
    """Each `influence ...` command in ``text`` (at a line start, after a comment mark, `:`, `-`, `$` or a
    backtick) as argv."""
    pattern = r"(?:^|[:`$-]|#)[ \t]*(influence [^\n#;|&`]+)"
    return [shlex.split(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE)]


def test_every_yaml_parses():
    assert {p.relative_to(INFRA).as_posix() for p in YAMLS} >= {
        "k8s/rayjob.yaml", "k8s/raycluster.yaml", "k8s/job-configmap.yaml", "k8s/cronjob.yaml", "aws/cluster.yaml"}
    for path in YAMLS:
        assert docs(path), path


@pytest.mark.parametrize("path", YAMLS + [INFRA / "README.md", INFRA / "Dockerfile"], ids=lambda p: p.name)
def test_influence_commands_exist_in_the_cli(path):
    for argv in influence_commands(path.read_text()):
        if argv[0] != "influence" or len(argv) < 2 or argv[1].startswith("-"):
            continue
        assert argv[1] in main.commands, f"{path.name}: `{' '.join(argv)}`: no such subcommand"


def test_rayjob_entrypoint_runs_the_mounted_job_file():
    (job,) = docs(INFRA / "k8s" / "rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["influence", "run"] and "run" in main.commands
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert argv[2] == f"{mount['mountPath']}/job.toml"
    (configmap,) = docs(INFRA / "k8s" / "job-configmap.yaml")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"] and "job.toml" in configmap["data"]


def test_mounted_job_file_is_valid_and_joins_the_cluster():
    (configmap,) = docs(INFRA / "k8s" / "job-configmap.yaml")
    cfg = config_from_dict(tomllib.loads(configmap["data"]["job.toml"]))
    assert cfg.resources.ray_address == "auto" and cfg.resources.gpus_per_actor == "auto"
    assert all(u.startswith("s3://") for u in (cfg.model.path, cfg.data.corpus, cfg.data.queries, cfg.data.output))
    (job,) = docs(INFRA / "k8s" / "rayjob.yaml")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.resources.actors <= workers["maxReplicas"]  # one GPU actor per GPU worker
    worker_cpus = int(workers["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    assert cfg.resources.cpus_per_actor <= worker_cpus


def test_one_image_name_everywhere_tagged_with_the_package_version():
    images = {c["image"] for p in (INFRA / "k8s").glob("*.yaml") for d in docs(p) for c in containers(d)
              if "kubectl" not in c["image"]}
    (launcher,) = docs(INFRA / "aws" / "cluster.yaml")
    images.add(launcher["docker"]["image"])
    assert images == {f"corpus-influence:{version()}"}
    assert f"-t corpus-influence:{version()}" in (INFRA / "Dockerfile").read_text()


def test_ray_versions_agree():
    ray = pins()["ray"]
    base = re.search(r"ARG BASE=rayproject/ray:([0-9.]+)-py\d+-cu\d+", (INFRA / "Dockerfile").read_text())
    assert base and base.group(1) == ray  # a CUDA base image of the pinned Ray
    for name in ("rayjob.yaml", "raycluster.yaml"):
        (d,) = docs(INFRA / "k8s" / name)
        spec = d["spec"].get("rayClusterSpec", d["spec"])
        assert spec["rayVersion"] == ray, name
    assert "torch" in pins() and "-c infra/constraints-cuda.txt" in (INFRA / "Dockerfile").read_text()


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_gpu_workers_request_what_ray_is_told(name):
    (d,) = docs(INFRA / "k8s" / name)
    spec = d["spec"].get("rayClusterSpec", d["spec"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        assert c["resources"]["requests"] == c["resources"]["limits"], group["groupName"]
        assert group["rayStartParams"]["num-gpus"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    if name == "raycluster.yaml":  # autoscaling: from zero GPU workers up
        assert spec["enableInTreeAutoscaling"] is True and spec["workerGroupSpecs"][0]["minReplicas"] == 0


def test_cluster_launcher_uses_an_instance_role_and_gpu_workers():
    (c,) = docs(INFRA / "aws" / "cluster.yaml")
    assert c["provider"]["type"] == "aws" and c["head_node_type"] in c["available_node_types"]
    for name, node in c["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Name"] == "influence-s3-access", name
    gpu = c["available_node_types"]["ray.worker.gpu"]
    assert gpu["resources"]["GPU"] == 1 and gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    assert gpu["max_workers"] <= c["max_workers"]
    assert c["available_node_types"][c["head_node_type"]]["resources"]["CPU"] == 0
    text = (INFRA / "aws" / "cluster.yaml").read_text()
    assert "aws_access_key" not in text.lower() and "secret" not in text.lower()


def test_cronjob_creates_a_rayjob_from_the_rayjob_manifest():
    objects = {d["kind"]: d for d in docs(INFRA / "k8s" / "cronjob.yaml")}
    cron = objects["CronJob"]
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = " ".join(container["args"])
    (rayjob,) = docs(INFRA / "k8s" / "rayjob.yaml")
    assert f"  name: {rayjob['metadata']['name']}$" in script and "kubectl create -f -" in script
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert objects["Role"]["rules"][0]["resources"] == ["rayjobs"] and "create" in objects["Role"]["rules"][0]["verbs"]
