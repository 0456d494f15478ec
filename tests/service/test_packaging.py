"""What runs without a container engine: the API and the client start without torch, the worker
imports without touching torch before the fork, and compose / Dockerfile match the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from pydantic import ValidationError
from stack_helpers import REPO, free_port

from infra.settings import Settings

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors"):
                raise ImportError(f"{name} is not installed in the API image")
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)


def _run(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "LINEARIZE_DATA_DIR": str(tmp_path / "data"),
        "LINEARIZE_API_KEYS": "alpha:ka",
        # Nothing listens there: a submit must still be accepted (stored as queued).
        "LINEARIZE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_api_starts_and_answers_with_torch_unimportable(tmp_path):
    code = BLOCK_TORCH + textwrap.dedent(
        """
        import infra.artifacts, infra.modelcheck, infra.queueing, infra.store
        import service.main
        from fastapi.testclient import TestClient

        key = {"Authorization": "Bearer ka"}
        with TestClient(service.main.app) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            ds = client.post("/v1/datasets", content=b"text " * 100, headers=key).json()["id"]
            job = client.post("/v1/jobs", headers=key, json={
                "kind": "compress", "model": "smollm2-135m", "layers": 2,
                "data": {"dataset_id": ds}})
            assert job.status_code == 202, job.text
            assert client.get("/openapi.json").status_code == 200
        loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "linearize")]
        assert not loaded, loaded
        print("ok")
        """
    )
    result = _run(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_client_and_its_commands_import_and_build_a_spec_with_torch_unimportable(tmp_path):
    code = BLOCK_TORCH + textwrap.dedent(
        """
        import argparse
        import linearize_client, linearize_client.commands, linearize_client.options
        assert "httpx" not in sys.modules, "the package imports its client lazily"

        from linearize_client import ApiError, IntegrityError, LinearizeClient
        from linearize_client.commands import _build_spec, add_submit_arguments

        parser = argparse.ArgumentParser()
        add_submit_arguments(parser)
        args = parser.parse_args(["--data", "wikitext2", "--layers", "2", "--heal-steps", "0"])
        spec = _build_spec(args, {"builtin": "wikitext2"})
        assert spec.kind == "compress" and spec.layers == 2 and spec.heal_steps == 0
        with LinearizeClient("http://127.0.0.1:9", token="t"):
            pass
        engine = ("torch", "transformers", "safetensors", "linearize", "service", "worker", "infra")
        loaded = [m for m in sys.modules if m.split(".")[0] in engine]
        assert not loaded, loaded
        print("ok")
        """
    )
    result = _run(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# Which top-level packages each layer may import (statically, anywhere in the file): the API
# front and the shared infra stay free of the engine, and the worker reaches the store through
# infra, never through the HTTP front.
FORBIDDEN_IMPORTS = {
    "infra": {"torch", "transformers", "safetensors", "linearize", "service", "worker"},
    "service": {"torch", "transformers", "safetensors", "linearize", "worker"},
    "worker": {"service"},
    # The HTTP client and the submit/serve commands: a room of their own, apart from the engine;
    # `serve` starts the API and the worker as processes, it imports neither.
    "linearize_client": {
        "torch",
        "transformers",
        "safetensors",
        "linearize",
        "infra",
        "service",
        "worker",
    },
}


def _imported_roots(path) -> set[str]:
    import ast

    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_layers_import_only_what_the_dependency_rule_allows(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    offenders = {
        str(f.relative_to(REPO)): sorted(_imported_roots(f) & FORBIDDEN_IMPORTS[package])
        for f in files
    }
    assert not {f: bad for f, bad in offenders.items() if bad}


def test_worker_modules_do_not_import_torch_before_the_fork(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        import worker.app, worker.tasks, worker.runner, worker.webhooks
        assert worker.app.app.conf.task_acks_late and worker.app.app.conf.task_reject_on_worker_lost
        assert worker.app.app.conf.worker_prefetch_multiplier == 1
        assert worker.app.app.conf.worker_max_tasks_per_child == 1
        loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        assert not loaded, loaded
        print("ok")
        """
    )
    result = _run(code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_worker_config_keeps_the_redis_redelivery_trap_closed():
    from infra.queueing import celery_config

    settings = Settings(broker_url="redis://127.0.0.1:6379/0")
    config = celery_config(settings)
    assert config["task_soft_time_limit"] < config["task_time_limit"]
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    with pytest.raises(ValidationError, match="visibility_timeout_s must exceed"):
        Settings(task_time_limit_s=100, task_soft_time_limit_s=90, visibility_timeout_s=100)


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_commands_and_environment_match_the_code():
    services = _compose()["services"]
    assert {
        "redis",
        "postgres",
        "minio",
        "createbucket",
        "api",
        "worker",
        "worker-cpu",
        "webhooks",
        "migrate",
    } <= set(services)
    defaults = Settings()
    fields = {f"LINEARIZE_{name.upper()}" for name in Settings.model_fields}

    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd

    assert " ".join(services["api"]["command"]).startswith("uvicorn service.main:app")
    for name, queue in [
        ("worker", defaults.job_queue),
        ("worker-cpu", defaults.job_queue),
        ("webhooks", defaults.webhook_queue),
    ]:
        command = " ".join(services[name]["command"])
        assert command.startswith(f"celery -A worker.app worker -Q {queue} "), (name, command)
    assert " -c 1 " in " ".join(services["worker"]["command"])  # one process per GPU

    for name in ("api", "worker", "worker-cpu", "webhooks"):
        env = services[name]["environment"]
        unknown = {k for k in env if k.startswith("LINEARIZE_")} - fields
        assert not unknown, (name, unknown)
        for required in (
            "LINEARIZE_BROKER_URL",
            "LINEARIZE_DATABASE_URL",
            "LINEARIZE_ARTIFACT_URL",
            "LINEARIZE_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "LINEARIZE_MODEL_ROOTS",
            "LINEARIZE_MAX_UPLOAD_MB",
            "LINEARIZE_API_KEYS",
        ):
            assert required in env, (name, required)
        assert env["LINEARIZE_BROKER_URL"].startswith("redis://redis:")
        assert env["LINEARIZE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["LINEARIZE_ARTIFACT_URL"].startswith("s3://linearize/")
        assert env["LINEARIZE_S3_ENDPOINT_URL"] == "http://minio:9000"
        # Nothing shared on disk: only Redis, PostgreSQL and the bucket (any host can run it).
        named = [m.split(":")[0] for m in services[name].get("volumes", []) if ":" in m]
        assert all(source.startswith("./") for source in named), (name, named)
        for one_shot in ("createbucket", "migrate"):  # the store is at head before any start
            assert services[name]["depends_on"][one_shot] == {
                "condition": "service_completed_successfully"
            }
        # The settings parse as the containers would see them (limits ordered, etc.).
        Settings(
            **{
                k.removeprefix("LINEARIZE_").lower(): v
                for k, v in env.items()
                if "${" not in str(v)
            }
        )

    for name in ("redis", "postgres", "minio", "api", "worker", "worker-cpu"):
        assert "healthcheck" in services[name], name
    migrate = services["migrate"]
    assert migrate["command"] == ["python", "-m", "infra.migrate", "upgrade"]
    assert migrate["image"] == services["api"]["image"]  # torch-free
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert (
        migrate["environment"]["LINEARIZE_DATABASE_URL"]
        == (services["api"]["environment"]["LINEARIZE_DATABASE_URL"])
    )
    assert "mc mb --ignore-existing local/linearize" in services["createbucket"]["entrypoint"][-1]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["worker"]["profiles"] == ["gpu"] and services["worker-cpu"]["profiles"] == [
        "cpu"
    ]
    assert "artifacts" not in _compose()["volumes"]


def test_dockerfile_builds_an_api_image_without_torch_and_a_worker_image_with_it():
    text = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    assert {"build", "build-worker", "api", "worker"} <= set(stages)
    assert "'.[api]'" in stages["build"] and "torch" not in stages["build"]
    # Every top-level package is copied in (`linearize submit` lives in linearize_client).
    packages = {d.name for d in REPO.iterdir() if (d / "__init__.py").is_file()}
    assert "linearize_client" in packages
    assert {p for p in packages if f"COPY {p} ./{p}\n" not in stages["build"]} == set()
    assert "torch" not in stages["api"] and "/wheels/api" in stages["api"]
    assert "torch==" in stages["build-worker"] and "[worker]" in stages["worker"]
    assert 'CMD ["uvicorn", "service.main:app"' in stages["api"]
    assert f'"-Q", "{Settings().job_queue}", "-c", "1"' in stages["worker"]


def test_every_setting_is_documented_with_its_variable():
    doc = (REPO / "docs" / "SERVICE.md").read_text()
    missing = [
        f"LINEARIZE_{name.upper()}"
        for name in Settings.model_fields
        if f"`LINEARIZE_{name.upper()}`" not in doc
    ]
    assert not missing
