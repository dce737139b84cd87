"""Static checks of cluster/: everything parses, and the facts a deployment silently relies on hold.

Nothing here needs Kubernetes, AWS or a running Ray: manifests are parsed with PyYAML, entrypoints
are resolved with the project's own config loader, the `ray up` config is validated with Ray's
own schema, and the CronJob fallback's script runs against a stub `kubectl`.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
NIGHT = "2026-01-31"
"""Stands for the night's date wherever a nightly name is built from it."""
DATE_EXPR = "$(date +%F)"
NIGHT_PLACEHOLDER = "__NIGHT__"
"""cronjob-fallback.yaml: the creator pod writes the date over it before creating the RayJob."""
NIGHT_FILE = "/var/run/composeae/night"
"""raycronjob-nightly.yaml: the date the submitter pod's init container read from the RayJob."""
NIGHT_FILE_EXPR = f"$(cat {NIGHT_FILE})"
CRONTAB_NIGHT = "${night}"
"""crontab: the shell variable that holds the date, read once by `night="$(date +%F)"`."""
SCHEDULED_ANNOTATION = "ray.io/cronjob-scheduled-timestamp"
"""Set by KubeRay's RayCronJob controller on each RayJob it creates (1.6: RFC 3339, UTC)."""
STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"
MAX_NIGHT_S = 23 * 3600
"""A night's RayJob, every attempt and its last cluster's TTL included, must release its GPUs
before the next night begins (24 h), with room for the clusters torn down between attempts."""

# Fields of KubeRay's v1 RayJobSpec, RayClusterSpec and (1.6) RayCronJobSpec: a misspelt field is
# rejected by the API server's strict validation only at apply time, or dropped by older clients.
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_FIELDS = {
    "rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
    "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "upgradeStrategy",
    "gcsFaultToleranceOptions",
}
RAYCRONJOB_FIELDS_1_6 = {"schedule", "suspend", "jobTemplate"}  # timeZone only from KubeRay 1.7

SECRET_NAME = re.compile(
    r"(SECRET|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|SESSION_TOKEN|AUTH_TOKEN|API_KEY|PRIVATE_KEY)",
    re.IGNORECASE)
SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                 # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"aws_secret_access_key\s*[=:]\s*[A-Za-z0-9/+]{30,}", re.IGNORECASE),
    re.compile(r"Bearer\s+[A-Za-z0-9._-]{16,}"),
]


# -- helpers ---------------------------------------------------------------------------------

def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def docs_of_kind(kind: str) -> Iterator[tuple[str, dict]]:
    for path in yaml_files():
        for doc in docs(path):
            if isinstance(doc, dict) and doc.get("kind") == kind:
                yield path.relative_to(ROOT).as_posix(), doc


def fallback_rayjob(night: str = NIGHT) -> dict:
    """The RayJob that cronjob-fallback.yaml's ConfigMap holds, with the date filled in."""
    for _, cm in docs_of_kind("ConfigMap"):
        for text in (cm.get("data") or {}).values():
            if NIGHT_PLACEHOLDER in text:
                return yaml.safe_load(text.replace(NIGHT_PLACEHOLDER, night))
    raise AssertionError("cronjob-fallback.yaml holds no RayJob template with __NIGHT__")


def crontab_entries() -> list[str]:
    lines = (CLUSTER / "crontab").read_text().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def cron_unescape(command: str) -> str:
    """What cron hands to /bin/sh: `\\%` becomes `%` (an unescaped % would end the command)."""
    return command.replace("\\%", "%")


def rayjob_specs() -> list[tuple[str, dict]]:
    """(where, RayJob spec) for every RayJob that some file here creates."""
    specs = [(where, doc["spec"]) for where, doc in docs_of_kind("RayJob")]
    specs += [(where, doc["spec"]["jobTemplate"]) for where, doc in docs_of_kind("RayCronJob")]
    specs.append(("cluster/kuberay/cronjob-fallback.yaml (ConfigMap)", fallback_rayjob()["spec"]))
    return specs


def cluster_specs() -> list[tuple[str, dict]]:
    specs = [(where, doc["spec"]) for where, doc in docs_of_kind("RayCluster")]
    specs += [(where, spec["rayClusterSpec"]) for where, spec in rayjob_specs()]
    return specs


def entrypoints() -> list[tuple[str, str]]:
    """(where, entrypoint command) for every training job the files here start."""
    found = [(where, spec["entrypoint"]) for where, spec in rayjob_specs()]
    for entry in crontab_entries():
        command = cron_unescape(entry.split(None, 5)[5])
        assert " -- " in command, "the crontab's ray job submit has no `-- entrypoint`"
        found.append(("cluster/crontab", command.split(" -- ", 1)[1].split(">>")[0].strip()))
    return found


def argv(entrypoint: str) -> list[str]:
    for expr in (DATE_EXPR, NIGHT_FILE_EXPR, CRONTAB_NIGHT):
        entrypoint = entrypoint.replace(expr, NIGHT)
    return shlex.split(entrypoint)


def option_values(args: list[str], option: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == option]


def is_nightly(where: str) -> bool:
    return "nightly" in where or "crontab" in where or "fallback" in where


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


# -- every file parses -----------------------------------------------------------------------

@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path):
    parsed = docs(path)
    assert parsed, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in parsed), f"{path}: every document must be a mapping"


def test_expected_files_exist():
    for name in ["runtime_env.yaml", "aws-gpu.yaml", "crontab", "start-local.sh", "stop-local.sh",
                 "README.md", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
                 "kuberay/raycronjob-nightly.yaml", "kuberay/cronjob-fallback.yaml"]:
        assert (CLUSTER / name).is_file(), f"cluster/{name} is missing"


def test_readme_mentions_every_file():
    readme = (CLUSTER / "README.md").read_text()
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.name != "README.md":
            rel = path.relative_to(CLUSTER).as_posix()
            assert rel in readme, f"cluster/README.md does not say what {rel} is for"


# -- entrypoints: jobs/train.py or jobs/nightly.py with a config that exists and loads --------

@pytest.mark.parametrize("where,entrypoint", entrypoints(), ids=lambda v: str(v)[:60])
def test_entrypoint_runs_a_job_with_an_existing_config(where, entrypoint):
    """Nightly schedules run jobs/nightly.py (champion and challenger); the rest train."""
    args = argv(entrypoint)
    job = "jobs/nightly.py" if is_nightly(where) else "jobs/train.py"
    assert args[:2] == ["python", job], f"{where}: {entrypoint}"
    configs = option_values(args, "--config")
    assert len(configs) == 1, f"{where}: exactly one --config expected"
    assert configs[0].startswith("jobs/configs/"), f"{where}: config outside jobs/configs/"
    assert (ROOT / configs[0]).is_file(), f"{where}: {configs[0]} does not exist"
    assert all("=" in s for s in option_values(args, "--set")), f"{where}: --set needs key=value"


@pytest.mark.parametrize("where,entrypoint", entrypoints(), ids=lambda v: str(v)[:60])
def test_entrypoint_config_resolves_for_the_cluster(where, entrypoint, monkeypatch):
    """The config plus its overrides loads (keys, types, profile), and points at S3 and GPUs:
    a cluster job writing to a pod's local disk would lose its checkpoints with the pod."""
    from composeae.config import load_config

    monkeypatch.chdir(ROOT)  # the job's working directory: ray_config.yaml is found there
    args = argv(entrypoint)
    cfg = load_config(ROOT / option_values(args, "--config")[0], option_values(args, "--set"))
    assert cfg.train.storage.startswith("s3://"), f"{where}: runs go to {cfg.train.storage}"
    assert cfg.data.url.startswith("s3://"), f"{where}: shards read from {cfg.data.url}"
    assert cfg.ray.use_gpu, f"{where}: trains without GPUs"
    if is_nightly(where):
        from composeae.nightly.flow import parse_date, RUN_PREFIX

        assert option_values(args, "--date") == [NIGHT], f"{where}: the night is not {NIGHT}"
        assert RUN_PREFIX + parse_date(NIGHT) == f"nightly-{NIGHT}"
        assert cfg.nightly.registry.startswith("s3://"), \
            f"{where}: the registry is {cfg.nightly.registry}"


def test_nightly_date_is_fixed_when_the_job_is_created():
    """Retries of one night must land on the same run name, so they resume it. KubeRay pastes a
    RayJob's entrypoint into the `bash -c` of a submitter pod it creates for every attempt, so a
    clock read there would be read again by each retry (and give the next day after midnight)."""
    nightly = [(w, e) for w, e in entrypoints() if is_nightly(w)]
    assert {w for w, _ in nightly} == {
        "cluster/crontab", "cluster/kuberay/raycronjob-nightly.yaml",
        "cluster/kuberay/cronjob-fallback.yaml (ConfigMap)"}
    for where, spec in rayjob_specs():
        entrypoint = spec["entrypoint"]
        assert "$(date" not in entrypoint and "`" not in entrypoint, \
            f"{where}: the entrypoint reads the clock on every attempt: {entrypoint}"
        assert entrypoint.replace(NIGHT_FILE_EXPR, "").count("$") == 0, \
            f"{where}: only the night file may be expanded by the submitter: {entrypoint}"
    # RayCronJob: the date comes from the file the submitter pod's init container writes from
    # the RayJob's creation-time annotation (see test_raycronjob_submitter_*).
    (_, cron), = docs_of_kind("RayCronJob")
    assert f"--date {NIGHT_FILE_EXPR}" in cron["spec"]["jobTemplate"]["entrypoint"]
    # Fallback: the creator pod writes the date literally into the RayJob it creates.
    assert f"--date {NIGHT_PLACEHOLDER}" in fallback_rayjob(NIGHT_PLACEHOLDER)[
        "spec"]["entrypoint"]
    # crontab: cron's shell reads the date once, when it submits; Ray stores the expansion.
    (entry,) = crontab_entries()
    shell_command = cron_unescape(entry.split(None, 5)[5])
    assert shell_command.count("$(date") == 1 and 'night="$(date +%F)"' in shell_command


@pytest.mark.parametrize("where,spec", [(w, s) for w, s in rayjob_specs() if is_nightly(w)],
                         ids=lambda v: str(v)[:60])
def test_nightly_deadlines_bound_the_night(where, spec):
    """KubeRay 1.6 applies activeDeadlineSeconds per attempt (each retry restarts the clock and
    an attempt stopped by it is not retried), and RayCronJob has no concurrency policy: a whole
    night holds GPUs for at most (backoffLimit + 1) x activeDeadlineSeconds, plus the TTL of its
    last cluster, and that must end before the next night starts."""
    worst_case = ((spec["backoffLimit"] + 1) * spec["activeDeadlineSeconds"]
                  + spec["ttlSecondsAfterFinished"])
    assert worst_case <= MAX_NIGHT_S, f"{where}: a night may hold GPUs {worst_case / 3600:.1f} h"


# -- runtime_env -----------------------------------------------------------------------------

def runtime_env() -> dict:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def test_runtime_env_enables_the_dashboards_train_page():
    """Ray 2.60 records Train runs for the dashboard only with this set (default off)."""
    assert runtime_env()["env_vars"].get(STATE_TRACKING) == "1"


def test_runtime_env_values_are_strings():
    env_vars = runtime_env()["env_vars"]
    # Ray rejects a runtime_env whose env_vars values are not strings.
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()), env_vars


def test_runtime_env_holds_no_credentials():
    env = runtime_env()
    assert "working_dir" not in env, "the working dir is given on the command line (--working-dir .)"
    for key, value in env.get("env_vars", {}).items():
        assert not SECRET_NAME.search(key), f"runtime_env sets {key}; credentials come from the nodes"
        assert not key.startswith("AWS_"), f"runtime_env sets {key}; S3 settings come from the nodes"
        assert not any(p.search(value) for p in SECRET_TEXT), f"{key} looks like a credential"


def test_runtime_env_excludes_what_must_not_be_uploaded():
    """Checked with the matcher Ray itself applies to working_dir uploads."""
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(ROOT, runtime_env()["excludes"])
    for rel in [".venv", ".venv/bin/python", "runs", "runs/demo/metrics.json", "shards",
                "shards/css-synth-small/manifest.json", ".git", ".git/HEAD",
                "composeae/__pycache__/x.pyc"]:
        assert excluded(ROOT / rel), f"{rel} would be uploaded with every job"
    for rel in ["composeae/train.py", "jobs/train.py", "jobs/configs/css-synth-full.yaml",
                "ray_config.yaml", "pyproject.toml", "composeae/storage.py"]:
        assert not excluded(ROOT / rel), f"{rel} would be left out of the job's working dir"


@pytest.mark.parametrize("where,spec", rayjob_specs(), ids=lambda v: str(v)[:60])
def test_rayjob_runtime_env_matches_runtime_env_yaml(where, spec):
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    reference = runtime_env()
    assert env["env_vars"].get(STATE_TRACKING) == "1", f"{where}: the Train page stays empty"
    assert env["env_vars"] == reference["env_vars"], f"{where}: env_vars differ"
    assert env["excludes"] == reference["excludes"], f"{where}: excludes differ"
    assert env["working_dir"] == "/home/ray/composeae", f"{where}: working_dir"


# -- no credentials anywhere -----------------------------------------------------------------

def _literal_secret_envs(node: Any, where: str) -> Iterator[str]:
    """Kubernetes env entries / env_vars mappings that give a secret-named variable a value."""
    if isinstance(node, dict):
        if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
            yield f"{where}: env {node['name']} has a literal value"
        for key, value in node.items():
            if key == "env_vars" and isinstance(value, dict):
                yield from (f"{where}: env_vars.{k}" for k in value if SECRET_NAME.search(k))
            if key == "runtimeEnvYAML" and isinstance(value, str):
                yield from _literal_secret_envs(yaml.safe_load(value), where)
            if key == "data" and isinstance(value, dict):  # ConfigMap payloads
                for text in value.values():
                    for inner in yaml.safe_load_all(str(text).replace(NIGHT_PLACEHOLDER, NIGHT)):
                        yield from _literal_secret_envs(inner, where)
            yield from _literal_secret_envs(value, where)
    elif isinstance(node, list):
        for item in node:
            yield from _literal_secret_envs(item, where)


def test_no_credentials_in_cluster_files():
    problems = []
    for path in CLUSTER.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text()
        problems += [f"{path.name}: matches {p.pattern}" for p in SECRET_TEXT if p.search(text)]
        if path.suffix in {".yaml", ".yml"}:
            for doc in docs(path):
                problems += list(_literal_secret_envs(doc, path.name))
    assert not problems, "\n".join(problems)


# -- KubeRay manifests -----------------------------------------------------------------------

def test_kinds_and_api_versions():
    assert [d["kind"] for d in docs(KUBERAY / "raycluster.yaml")] == ["RayCluster"]
    assert [d["kind"] for d in docs(KUBERAY / "rayjob-train.yaml")] == ["RayJob"]
    assert [d["kind"] for d in docs(KUBERAY / "raycronjob-nightly.yaml")] == [
        "ServiceAccount", "Role", "RoleBinding", "RayCronJob"]
    for kind in ["RayCluster", "RayJob", "RayCronJob"]:
        for where, doc in docs_of_kind(kind):
            assert doc["apiVersion"] == "ray.io/v1", where


@pytest.mark.parametrize("where,spec", rayjob_specs(), ids=lambda v: str(v)[:60])
def test_rayjob_fields(where, spec):
    assert set(spec) <= RAYJOB_FIELDS, f"{where}: unknown RayJob fields {set(spec) - RAYJOB_FIELDS}"
    assert spec["shutdownAfterJobFinishes"] is True, f"{where}: the GPUs would stay up"
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1, \
        f"{where}: no retry, so a failed run never resumes"
    assert isinstance(spec.get("activeDeadlineSeconds"), int), f"{where}: a hung job runs forever"


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=lambda v: str(v)[:60])
def test_cluster_specs(where, spec):
    assert set(spec) <= RAYCLUSTER_FIELDS, \
        f"{where}: unknown RayCluster fields {set(spec) - RAYCLUSTER_FIELDS}"
    # The image's Ray, the cluster's rayVersion and the Ray the project pins must agree.
    assert spec["rayVersion"] == importlib.metadata.version("ray"), where
    assert spec["authOptions"] == {"mode": "token"}, f"{where}: token auth is off"
    images = {c["image"] for c in containers(spec)}
    assert len(images) == 1, f"{where}: head and workers run different images {images}"
    for group in spec["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{where}: CPU-only workers"


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=lambda v: str(v)[:60])
def test_ray_containers_enable_the_train_page(where, spec):
    """Every Ray process inherits it, so runs of jobs submitted without runtime_env.yaml (to
    raycluster.yaml by hand) are listed on the dashboard's Train page too."""
    for c in containers(spec):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get(STATE_TRACKING) == "1", f"{where}: {c['name']}"


def test_all_kuberay_manifests_use_one_image():
    images = {c["image"] for _, spec in cluster_specs() for c in containers(spec)}
    assert len(images) == 1, images


@pytest.mark.parametrize("where,spec", rayjob_specs(), ids=lambda v: str(v)[:60])
def test_rayjob_cluster_fits_the_job(where, spec, monkeypatch):
    """A RayJob whose cluster has fewer GPUs or CPUs than the job asks for waits forever."""
    from composeae.config import load_config, worker_range

    monkeypatch.chdir(ROOT)
    args = argv(spec["entrypoint"])
    cfg = load_config(ROOT / option_values(args, "--config")[0], option_values(args, "--set"))
    gpus, pods_cpu = 0, []
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            limits = c["resources"]["limits"]
            gpus += group["replicas"] * int(limits["nvidia.com/gpu"])
            pods_cpu.append(float(limits["cpu"]) / int(limits["nvidia.com/gpu"]))
    workers = worker_range(cfg.ray)[1]
    assert gpus >= workers, f"{where}: {gpus} GPUs for {workers} workers"
    assert min(pods_cpu) >= cfg.ray.cpus_per_worker, f"{where}: too few CPUs per GPU"


def test_raycronjob_nightly():
    (where, doc), = docs_of_kind("RayCronJob")
    spec = doc["spec"]
    assert set(spec) <= RAYCRONJOB_FIELDS_1_6, f"{where}: not a KubeRay 1.6 RayCronJob field"
    assert spec["schedule"] == "0 2 * * *"
    assert spec.get("suspend") in (None, False)


def test_nightly_rayjobs_agree():
    """The RayCronJob's template and the fallback's RayJob are the same job; only the RayCronJob
    needs a submitter pod of its own, to read the night's date."""
    (_, cron), = docs_of_kind("RayCronJob")
    template = dict(cron["spec"]["jobTemplate"])
    fallback = dict(fallback_rayjob()["spec"])
    assert template.pop("entrypoint").replace(NIGHT_FILE_EXPR, NIGHT) == fallback.pop("entrypoint")
    assert template.pop("submissionMode") == "K8sJobMode" == fallback.pop("submissionMode",
                                                                          "K8sJobMode")
    template.pop("submitterPodTemplate")
    assert template == fallback
    one_off = dict(next(spec for w, spec in rayjob_specs() if w.endswith("rayjob-train.yaml")))
    assert one_off["rayClusterSpec"] == template["rayClusterSpec"]


def _raycronjob_objects() -> dict[str, dict]:
    return {d["kind"]: d for d in docs(KUBERAY / "raycronjob-nightly.yaml")}


def _night_reader(pod: dict) -> dict:
    (init,) = pod["initContainers"]
    return init


def test_raycronjob_submitter_wiring():
    """The submitter pod reads its own RayJob (RBAC: get rayjobs only) and hands the date to the
    submitting container through a shared volume at the path the entrypoint reads."""
    objs = _raycronjob_objects()
    namespaces = {d["metadata"].get("namespace") for d in objs.values()}
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    sa, role, binding, cron = (objs[k] for k in ["ServiceAccount", "Role", "RoleBinding",
                                                   "RayCronJob"])
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    (rule,) = role["rules"]
    assert rule == {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get"]}

    spec = cron["spec"]["jobTemplate"]
    # HTTPMode would send `$(cat ...)` unexpanded to the Ray head; SidecarMode has no template.
    assert spec["submissionMode"] == "K8sJobMode"
    pod = spec["submitterPodTemplate"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"
    (volume,) = pod["volumes"]
    assert volume == {"name": volume["name"], "emptyDir": {}}
    night_dir = os.path.dirname(NIGHT_FILE)
    init = _night_reader(pod)
    (submitter,) = pod["containers"]  # KubeRay fills in the command of container 0
    assert "command" not in submitter and "args" not in submitter
    assert submitter["image"] == containers(spec["rayClusterSpec"])[0]["image"], \
        "the submitter must run the Ray version of the cluster"
    for container in (init, submitter):
        (mount,) = container["volumeMounts"]
        assert mount["name"] == volume["name"] and mount["mountPath"] == night_dir
    (env,) = init["env"]
    # KubeRay names the submitter Job after the RayJob; Kubernetes labels the Job's pods with it.
    assert env == {"name": "RAYJOB_NAME", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}}
    script = init["args"][0]
    assert init["command"] == ["/bin/bash", "-c"]
    assert NIGHT_FILE in script and SCHEDULED_ANNOTATION.replace(".", "\\.") in script
    subprocess.run(["bash", "-n", "-c", script], check=True)


def _run_night_reader(tmp_path: Path, kubectl_output: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    """Runs the init container's script against a stub `kubectl` that prints `kubectl_output`
    for `kubectl get rayjob composeae-nightly-x7k2p ...` (or fails when it is None)."""
    pod = _raycronjob_objects()["RayCronJob"]["spec"]["jobTemplate"]["submitterPodTemplate"]["spec"]
    init = _night_reader(pod)
    night_dir = tmp_path / "night"
    night_dir.mkdir()
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    (tmp_path / "out").write_text(kubectl_output or "")
    stub.write_text("#!/usr/bin/env bash\n"
                    '[ "$1 $2 $3" = "get rayjob composeae-nightly-x7k2p" ] || exit 3\n'
                    f"{'exit 1' if kubectl_output is None else ''}\n"
                    f'cat "{tmp_path / "out"}"\n')
    stub.chmod(0o755)
    script = init["args"][0].replace(os.path.dirname(NIGHT_FILE), str(night_dir))
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}",
           "RAYJOB_NAME": "composeae-nightly-x7k2p"}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                            timeout=30)
    return result, night_dir / os.path.basename(NIGHT_FILE)


@pytest.mark.parametrize("kubectl_output,night", [
    # created by the RayCronJob, late (operator restart): the scheduled night wins
    ("2026-02-01T00:10:00Z 2026-01-31T02:00:00Z", "2026-01-31"),
    ("2026-01-31T02:00:01Z 2026-01-31T02:00:00Z", "2026-01-31"),
    # created by hand from the template: the day it was created
    ("2026-01-31T09:30:00Z", "2026-01-31"),
    ("2026-01-31T09:30:00Z ", "2026-01-31"),
])
def test_raycronjob_submitter_reads_the_scheduled_date(tmp_path, kubectl_output, night):
    result, night_file = _run_night_reader(tmp_path, kubectl_output)
    assert result.returncode == 0, result.stderr
    assert night_file.read_text() == night


@pytest.mark.parametrize("kubectl_output", [None, "", "garbage"])
def test_raycronjob_submitter_fails_without_a_date(tmp_path, kubectl_output):
    """No date, no submission: the pod fails (and is retried) rather than train `nightly-`."""
    result, night_file = _run_night_reader(tmp_path, kubectl_output)
    assert result.returncode != 0
    assert not night_file.exists()


def test_raycronjob_entrypoint_expands_in_the_submitter_shell(tmp_path):
    """KubeRay 1.6 (K8sJobMode) runs `bash -ce -- "... ray job submit ... -- <entrypoint> ; ..."`
    in the submitter: the night file's content is what Ray receives as the night's date."""
    (_, cron), = docs_of_kind("RayCronJob")
    night_file = tmp_path / "night"
    night_file.write_text(NIGHT)
    entrypoint = cron["spec"]["jobTemplate"]["entrypoint"].replace(NIGHT_FILE, str(night_file))
    echoed = subprocess.run(["bash", "-ce", "--", f"printf '%s\\n' {entrypoint} ;"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert option_values(echoed, "--date") == [NIGHT]


def test_cronjob_fallback_rbac_and_wiring():
    objs = {d["kind"]: d for d in docs(KUBERAY / "cronjob-fallback.yaml")}
    assert set(objs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    namespaces = {d["metadata"].get("namespace") for d in objs.values()}
    assert len(namespaces) == 1, f"objects spread over namespaces {namespaces}"
    sa, role, binding = objs["ServiceAccount"], objs["Role"], objs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"get", "create"} <= set(rule["verbs"])

    cron = objs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    script = container["args"][0]
    (key,) = objs["ConfigMap"]["data"]
    assert f"{mount['mountPath']}/{key}" in script, "the script reads another path than the mount"
    subprocess.run(["bash", "-n", "-c", script], check=True)


def _run_fallback_script(tmp_path: Path, rayjob_exists: bool) -> tuple[subprocess.CompletedProcess, Path]:
    objs = {d["kind"]: d for d in docs(KUBERAY / "cronjob-fallback.yaml")}
    pod = objs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    templates = tmp_path / "templates"
    templates.mkdir()
    for key, text in objs["ConfigMap"]["data"].items():
        (templates / key).write_text(text)
    created = tmp_path / "created.yaml"
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    stub.write_text("#!/usr/bin/env bash\n"
                    f'if [ "$1" = get ]; then exit {0 if rayjob_exists else 1}; fi\n'
                    f'if [ "$1" = create ]; then cat > "{created}"; exit 0; fi\n'
                    "exit 3\n")
    stub.chmod(0o755)
    script = container["args"][0].replace(mount, str(templates))
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}",
           **{e["name"]: e["value"] for e in container.get("env", [])}}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                            timeout=30)
    return result, created


def test_cronjob_fallback_script_creates_tonights_rayjob(tmp_path):
    before = dt.datetime.now(dt.timezone.utc).date().isoformat()
    result, created = _run_fallback_script(tmp_path, rayjob_exists=False)
    after = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert result.returncode == 0, result.stderr
    rayjob = yaml.safe_load(created.read_text())
    night = rayjob["metadata"]["name"].removeprefix("composeae-nightly-")
    assert night in {before, after}, rayjob["metadata"]["name"]
    assert f"--date {night}" in rayjob["spec"]["entrypoint"]
    assert NIGHT_PLACEHOLDER not in created.read_text()


def test_cronjob_fallback_script_leaves_an_existing_rayjob(tmp_path):
    result, created = _run_fallback_script(tmp_path, rayjob_exists=True)
    assert result.returncode == 0, result.stderr
    assert not created.exists(), "a retried creator pod must not create the RayJob twice"


# -- crontab ---------------------------------------------------------------------------------

def test_crontab_has_one_entry_with_escaped_percent():
    (entry,) = crontab_entries()
    fields = entry.split(None, 5)
    assert fields[:5] == ["0", "2", "*", "*", "*"]
    command = fields[5]
    # cron ends the command at the first unescaped % and feeds the rest to its stdin.
    assert "%" in command and not re.search(r"(?<!\\)%", command), "unescaped % in the crontab"
    shell_command = cron_unescape(command)
    subprocess.run(["sh", "-n", "-c", shell_command], check=True)  # cron runs /bin/sh
    assert "RAY_AUTH_MODE=token" in shell_command
    assert f'night="{DATE_EXPR}"' in shell_command
    assert f'--submission-id "nightly-{CRONTAB_NIGHT}"' in shell_command
    assert "--runtime-env cluster/runtime_env.yaml" in shell_command
    assert "--working-dir ." in shell_command
    assert f'--date "{CRONTAB_NIGHT}"' in shell_command


def test_crontab_expands_one_date_for_both_names(tmp_path):
    """What cron's /bin/sh hands to `ray`: the submission id and the night's date, both literal."""
    (entry,) = crontab_entries()
    shell_command = cron_unescape(entry.split(None, 5)[5])
    stub = tmp_path / "composeae" / ".venv" / "bin" / "ray"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$HOME/argv"\n')
    stub.chmod(0o755)
    subprocess.run(["sh", "-c", shell_command], env={**os.environ, "HOME": str(tmp_path)},
                   check=True, timeout=30)
    args = (tmp_path / "argv").read_text().splitlines()
    (night,) = {option_values(args, "--submission-id")[0].removeprefix("nightly-"),
                option_values(args, "--date")[0]}
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", night), args


# -- scripts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert path.stat().st_mode & stat.S_IXUSR, f"{path.name} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")


def test_start_local_uses_the_venv_and_token_auth():
    text = (CLUSTER / "start-local.sh").read_text()
    assert "ray start --head" in text
    assert "--dashboard-host=127.0.0.1" in text and "--dashboard-port=8265" in text
    assert 'PATH="${venv}/bin:${PATH}"' in text, "jobs' `python` must resolve to the venv"
    assert "RAY_AUTH_MODE=token" in text and "ray job submit" in text
    # Exported before `ray start`, so every process of the head inherits it.
    export = f"export {STATE_TRACKING}=1"
    assert export in text and text.index(export) < text.index("ray start --head"), \
        "the dashboard's Train page stays empty for jobs submitted without runtime_env.yaml"


# -- ray up ----------------------------------------------------------------------------------

def test_aws_gpu_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))


def test_aws_gpu_config_facts():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]
    assert "InstanceMarketOptions" not in head, "a spot head takes the whole cluster down with it"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(
        t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    # Token auth: every node starts Ray in token mode and has the cluster's token.
    assert "~/.ray/auth_token" in config["file_mounts"]
    for key in ["head_start_ray_commands", "worker_start_ray_commands"]:
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
        assert all(f"{STATE_TRACKING}=1 ray start" in c for c in start), key
    assert any("--head" in c for c in config["head_start_ray_commands"])
    setup = " ".join(config["setup_commands"])
    assert "-c ~/composeae/constraints.txt" in setup, "nodes must install the pinned versions"
    assert "--python 3.11" in setup
    assert set(config["rsync_exclude"]) >= {".venv", "runs", "shards", ".git"}
