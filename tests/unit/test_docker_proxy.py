"""The Docker API proxy behind the offline `sam local` setup rewrites SAM's Lambda containers only."""

from __future__ import annotations

from local.docker_proxy import CLIENT_LABEL, rewrite_create


def sam_create_body() -> dict:
    return {
        "Image": "samcli/lambda-python:3.13-x86_64-abc",
        "Entrypoint": ["/var/rapid/aws-lambda-rie", "--log-level", "error"],
        "ExposedPorts": {"8080/tcp": {}},
        "Labels": {"sam.cli.container.type": "lambda"},
        "HostConfig": {"PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "5458"}]}},
    }


def test_a_sam_lambda_container_gets_the_host_network_and_listens_on_loopback() -> None:
    body = rewrite_create(sam_create_body(), client_pid=4242)
    assert body["HostConfig"]["NetworkMode"] == "host"
    assert "PortBindings" not in body["HostConfig"] and "ExposedPorts" not in body
    entrypoint = body["Entrypoint"]
    assert entrypoint[:3] == ["/var/rapid/aws-lambda-rie", "--runtime-interface-emulator-address", "127.0.0.1:5458"]
    assert entrypoint[3] == "--runtime-api-address" and entrypoint[4].startswith("127.0.0.1:")
    assert entrypoint[5:] == ["--log-level", "error"]
    assert body["Labels"][CLIENT_LABEL] == "4242"


def test_any_other_container_is_left_alone() -> None:
    body = {"Image": "busybox", "Labels": {"purpose": "build"}, "HostConfig": {"PortBindings": {"80/tcp": []}}}
    assert rewrite_create(dict(body)) == body
