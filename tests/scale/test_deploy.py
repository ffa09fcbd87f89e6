"""deploy/: the compose file validates with Debian's docker-compose and names real commands; the
Dockerfile runs what the package installs. (The nginx configuration is tested for real in
test_two_instances.py, in front of two running instances.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT

DEPLOY = ROOT / "deploy"


def test_compose_file_validates(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose)")
    for name in ("compose.yaml", "nginx.conf", "dubhe.toml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    shutil.copy(DEPLOY / "dubhe.env.example", tmp_path / "dubhe.env")
    checked = subprocess.run([compose, "-f", str(tmp_path / "compose.yaml"), "config"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(checked.stdout)
    services = resolved["services"]
    assert set(services) == {"postgres", "redis", "dubhe-1", "dubhe-2", "nginx"}
    for name in ("dubhe-1", "dubhe-2"):
        service = services[name]
        assert service["environment"]["DUBHE_REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["DUBHE_DATABASE_URL"].startswith("postgresql+asyncpg://")
        # The command the image runs is one the CLI accepts.
        command = service["command"]
        ran = subprocess.run([str(BIN / "dubhe"), *command, "--help"], capture_output=True,
                             text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr


def test_dockerfile_runs_as_non_root_from_a_multi_stage_build() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and " AS build" in stages[0]
    assert "USER 10001:10001" in lines  # the dubhe user, numeric for Kubernetes runAsNonRoot
    assert any(line.startswith("COPY --from=build /app/.venv") for line in lines)
    # Its entry point is the console script pyproject.toml installs.
    assert 'dubhe = "dubhe.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert 'ENTRYPOINT ["dubhe"]' in lines


def test_kubernetes_and_grafana_examples_parse_and_use_real_names() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = {document["kind"] for document in documents}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget"}
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    # Every metric the dashboard plots is one Dubhe exports.
    from dubhe.metrics import RATE_LIMIT_REJECTIONS, REDIS_FAILURES, REQUESTS
    from dubhe.metrics.requests import COST, LATENCY, TOKENS

    exported = {metric._name for metric in (REQUESTS, RATE_LIMIT_REJECTIONS, REDIS_FAILURES,
                                            LATENCY, TOKENS, COST)}
    for name in re.findall(r"dubhe_[a-z_]+", exprs):
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert base in exported, name
