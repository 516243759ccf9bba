"""template.yaml: the security and wiring properties a deploy must have, checked before any deploy.

The template is read with a loader that keeps CloudFormation's short tags (``!Ref``, ``!If``
...) as their long forms; ``resolve`` evaluates the few intrinsics that decide the auth mode,
so each mode can be checked as CloudFormation would deploy it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
SAM = ROOT / ".venv-sam" / "bin" / "sam"
NO_VALUE = object()


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns ``!Name x`` into ``{"Fn::Name": x}`` (``!Ref`` into ``{"Ref": x}``)."""


def _construct_tag(loader: _CfnLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _construct_tag)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)


def resolve(value: Any, template: dict[str, Any], params: dict[str, str]) -> Any:
    """Evaluate Fn::If (on Fn::Equals/Fn::Not conditions over parameters) and AWS::NoValue."""
    if isinstance(value, list):
        return [v for v in (resolve(v, template, params) for v in value) if v is not NO_VALUE]
    if not isinstance(value, dict):
        return value
    if value == {"Ref": "AWS::NoValue"}:
        return NO_VALUE
    if set(value) == {"Fn::If"}:
        name, if_true, if_false = value["Fn::If"]
        chosen = if_true if _condition(template["Conditions"][name], template, params) else if_false
        return resolve(chosen, template, params)
    resolved = {k: resolve(v, template, params) for k, v in value.items()}
    return {k: v for k, v in resolved.items() if v is not NO_VALUE}


def _condition(expr: Any, template: dict[str, Any], params: dict[str, str]) -> bool:
    if "Fn::Equals" in expr:
        left, right = (str(_param(v, template, params)) for v in expr["Fn::Equals"])
        return left == right
    if "Fn::Not" in expr:
        return not _condition(expr["Fn::Not"][0], template, params)
    if "Fn::And" in expr:
        return all(_condition(e, template, params) for e in expr["Fn::And"])
    if "Condition" in expr or "Fn::Condition" in expr:  # !Condition, as sam build writes it or as read here
        return condition(expr.get("Condition") or expr["Fn::Condition"], template, params)
    raise AssertionError(f"condition form not handled by this test: {expr}")


def condition(name: str, template: dict[str, Any], params: dict[str, str]) -> bool:
    """Whether the template's condition ``name`` holds with these parameters (the rest at their defaults)."""
    return _condition(template["Conditions"][name], template, params)


def _param(value: Any, template: dict[str, Any], params: dict[str, str]) -> Any:
    if isinstance(value, dict) and "Ref" in value:
        name = value["Ref"]
        return params.get(name, str(template["Parameters"][name].get("Default", "")))
    return value


def handler_routes() -> dict[str, str]:
    """The route table the API function serves (quantfn.wire.routes.ROUTES) as path -> method."""
    from quantfn.wire.routes import ROUTES

    return {path: route.method for path, route in ROUTES.items()}


def _of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def _http_api_events(function: dict[str, Any]) -> list[dict[str, Any]]:
    events = function["Properties"].get("Events", {}).values()
    return [e["Properties"] for e in events if e["Type"] == "HttpApi"]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_sam_validate_lint_finds_no_problem():
    if not SAM.exists():
        pytest.skip(f"{SAM} is absent; `make test` installs it (target .venv-sam/.installed)")
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_EC2_METADATA_DISABLED": "true"}
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    result = subprocess.run(
        [str(SAM), "validate", "--lint", "--template-file", str(TEMPLATE)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_functions_run_python313_on_the_architecture_parameter(template):
    # Given the Globals, When no function overrides them, Then every function is python3.13 on the
    # Architecture parameter's choice (x86_64 by default, or arm64), and the runtime layer is built for it
    parameter = template["Parameters"]["Architecture"]
    assert parameter["Default"] == "x86_64"
    assert sorted(parameter["AllowedValues"]) == ["arm64", "x86_64"]
    chosen = {"Ref": "Architecture"}
    function_globals = template["Globals"]["Function"]
    assert function_globals["Runtime"] == "python3.13"
    assert function_globals["Architectures"] == [chosen]
    for name, function in _of_type(template, "AWS::Serverless::Function").items():
        assert function["Properties"].get("Runtime", "python3.13") == "python3.13", name
        assert function["Properties"].get("Architectures", [chosen]) == [chosen], name
    for name, layer in _of_type(template, "AWS::Serverless::LayerVersion").items():
        assert layer["Properties"]["CompatibleRuntimes"] == ["python3.13"], name
        assert layer["Metadata"]["BuildArchitecture"] == chosen, name
    runtime_layer = template["Resources"]["RuntimeLayer"]["Properties"]
    assert runtime_layer["CompatibleArchitectures"] == [chosen]


def test_functions_start_numpy_without_an_openblas_thread_pool(template):
    # numpy's OpenBLAS would start a thread per CPU at import (cold start); no function may undo it
    assert template["Globals"]["Function"]["Environment"]["Variables"]["OPENBLAS_NUM_THREADS"] == "1"
    for name, function in _of_type(template, "AWS::Serverless::Function").items():
        variables = function["Properties"].get("Environment", {}).get("Variables", {})
        assert "OPENBLAS_NUM_THREADS" not in variables, name


def _definition(template: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    return resolve(template["Resources"]["HttpApi"]["Properties"]["DefinitionBody"], template, params)


def test_key_authorization_is_the_default_on_every_route(template):
    auth_mode = template["Parameters"]["AuthMode"]
    assert auth_mode["Default"] == "KEY"
    assert set(auth_mode["AllowedValues"]) == {"KEY", "IAM", "JWT", "NONE"}
    # When deployed with default parameters, Then each route asks the key authorizer, and only that scheme exists
    body = _definition(template, {})
    operations = [op for path in body["paths"].values() for op in path.values()]
    assert operations and all(operation.get("security") == [{"ApiKey": []}] for operation in operations)
    (scheme,) = body["components"]["securitySchemes"].values()
    authorizer = scheme["x-amazon-apigateway-authorizer"]
    # a REQUEST authorizer reading the header the OpenAI and Cohere clients send, answering {isAuthorized, context}
    assert authorizer["type"] == "request" and authorizer["identitySource"] == "$request.header.Authorization"
    assert (authorizer["authorizerPayloadFormatVersion"], authorizer["enableSimpleResponses"]) == ("2.0", True)
    assert (
        isinstance(authorizer["authorizerResultTtlInSeconds"], int) and authorizer["authorizerResultTtlInSeconds"] > 0
    )
    assert "${AuthorizerFunction.Arn}" in authorizer["authorizerUri"]["Fn::Sub"]


def test_iam_mode_demands_sigv4_on_every_route(template):
    body = _definition(template, {"AuthMode": "IAM"})
    operations = [op for path in body["paths"].values() for op in path.values()]
    assert operations and all(operation.get("security") == [{"AWS_IAM": []}] for operation in operations)
    assert body["components"]["securitySchemes"] == {
        "AWS_IAM": {
            "type": "apiKey",
            "name": "Authorization",
            "in": "header",
            "x-amazon-apigateway-authtype": "awsSigv4",
        }
    }


def test_the_key_authorizer_exists_only_in_key_mode_and_reads_only_its_stacks_key_records(template):
    from quantfn.auth.store import keys_prefix

    resources = template["Resources"]
    parts = ("AuthorizerFunction", "AuthorizerFunctionRole", "AuthorizerFunctionLogs", "AuthorizerPermission")
    assert all(resources[name]["Condition"] == "UseKeyAuth" for name in parts)
    assert condition("UseKeyAuth", template, {}) and not condition("UseKeyAuth", template, {"AuthMode": "IAM"})
    function = resources["AuthorizerFunction"]["Properties"]
    module, _, attr = function["Handler"].rpartition(".")
    assert re.search(rf"^def {attr}\(", (ROOT / Path(*module.split("."))).with_suffix(".py").read_text(), re.M)
    assert not function.get("Events")  # API Gateway calls it as an authorizer, never as a route
    # the function reads the path `quantfn keys --stack <stack>` writes
    prefix = function["Environment"]["Variables"]["QUANTFN_AUTH_KEYS_PREFIX"]
    assert prefix == {"Fn::Sub": keys_prefix("${AWS::StackName}")}
    statements = [
        s
        for p in resources["AuthorizerFunctionRole"]["Properties"]["Policies"]
        for s in p["PolicyDocument"]["Statement"]
    ]
    assert {a for s in statements for a in _as_list(s["Action"])} == {
        "logs:CreateLogStream", "logs:PutLogEvents", "ssm:GetParameter"
    }  # fmt: skip
    (read,) = [s for s in statements if s["Action"] == "ssm:GetParameter"]
    assert read["Resource"]["Fn::Sub"].endswith(":parameter" + keys_prefix("${AWS::StackName}") + "*")
    permission = resources["AuthorizerPermission"]["Properties"]
    assert permission["Principal"] == "apigateway.amazonaws.com"
    assert permission["SourceArn"]["Fn::Sub"].endswith(":${HttpApi}/authorizers/*")


def test_jwt_mode_puts_the_jwt_authorizer_on_every_route(template):
    params = {"AuthMode": "JWT", "JwtIssuer": "https://issuer.example"}
    body = resolve(template["Resources"]["HttpApi"]["Properties"]["DefinitionBody"], template, params)
    for path in body["paths"].values():
        for operation in path.values():
            assert operation.get("security") == [{"Jwt": []}]
    schemes = body["components"]["securitySchemes"]
    assert set(schemes) == {"Jwt"}
    authorizer = schemes["Jwt"]["x-amazon-apigateway-authorizer"]
    assert authorizer["type"] == "jwt"
    assert authorizer["jwtConfiguration"] == {"issuer": {"Ref": "JwtIssuer"}, "audience": {"Ref": "JwtAudience"}}
    assert "JwtNeedsIssuerAndAudience" in template["Rules"]


def test_none_mode_is_the_only_way_to_open_a_route(template):
    for mode in ("KEY", "IAM", "JWT"):
        body = resolve(template["Resources"]["HttpApi"]["Properties"]["DefinitionBody"], template, {"AuthMode": mode})
        assert all(op.get("security") for path in body["paths"].values() for op in path.values()), mode
    body = resolve(template["Resources"]["HttpApi"]["Properties"]["DefinitionBody"], template, {"AuthMode": "NONE"})
    assert all("security" not in op for path in body["paths"].values() for op in path.values())


def test_every_handler_route_is_wired_and_secured(template):
    # Given the routes the handler serves, Then each is an HttpApi event (payload 2.0) of the API
    # function and an operation of the API's definition (where its security lives), and nothing else is.
    wanted = {(path, method.upper()) for path, method in handler_routes().items()}
    events = _http_api_events(template["Resources"]["ApiFunction"])
    wired = {(e["Path"], e["Method"].upper()) for e in events}
    assert wired == wanted
    for event in events:
        assert event["ApiId"] == {"Ref": "HttpApi"}
        assert event["PayloadFormatVersion"] == "2.0"
    paths = template["Resources"]["HttpApi"]["Properties"]["DefinitionBody"]["paths"]
    defined = {(path, method.upper()) for path, ops in paths.items() for method, op in ops.items() if "security" in op}
    assert defined == wanted
    # No other function may attach routes to the API: they would bypass the definition's security.
    for name, function in _of_type(template, "AWS::Serverless::Function").items():
        for event in _http_api_events(function):
            assert (event["Path"], event["Method"].upper()) in defined, name


def test_api_function_handler_environment_and_layers(template):
    props = template["Resources"]["ApiFunction"]["Properties"]
    module, _, attr = props["Handler"].rpartition(".")
    source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
    assert re.search(rf"^def {attr}\(", source, re.MULTILINE)
    assert props["Timeout"] <= 29
    assert props["Layers"] == [{"Ref": "RuntimeLayer"}, {"Ref": "ModelLayer"}]
    env = props["Environment"]["Variables"]
    assert env["QUANTFN_MODELS_ROOT"] == "/opt/models"
    assert env["QUANTFN_MODELS"] == {"Ref": "Models"}
    # Every QUANTFN_ variable the template sets is one config.py reads (a typo would be ignored silently).
    config = (ROOT / "shared" / "quantfn" / "config.py").read_text()
    for name in (n for n in env if n.startswith("QUANTFN_")):
        assert f'"{name}"' in config, name
    default = "all-minilm-l6-v2=layer:all-minilm-l6-v2,intent-minilm-l6-v2=layer:intent-minilm-l6-v2"
    assert template["Parameters"]["Models"]["Default"] == default
    pattern = re.compile(template["Parameters"]["Models"]["AllowedPattern"])
    assert pattern.match("a=layer:x,b=s3://bucket-name/models/y/,layer:z")
    assert not pattern.match("a=http://x") and not pattern.match("a=layer:x,")


def test_api_is_throttled_logged_and_strict(template):
    props = template["Resources"]["HttpApi"]["Properties"]
    assert props["FailOnWarnings"] is True
    for setting in ("ThrottlingBurstLimit", "ThrottlingRateLimit"):
        parameter = template["Parameters"][props["DefaultRouteSettings"][setting]["Ref"]]
        assert int(parameter["Default"]) > 0 and int(parameter["MinValue"]) >= 1, setting
    log_group = props["AccessLogSettings"]["DestinationArn"]["Fn::GetAtt"][0]
    assert template["Resources"][log_group]["Type"] == "AWS::Logs::LogGroup"
    assert template["Resources"][log_group]["Properties"]["RetentionInDays"] > 0
    assert "$context.requestId" in props["AccessLogSettings"]["Format"]


def test_model_bucket_is_private_encrypted_versioned_and_retained(template):
    bucket = template["Resources"]["ModelBucket"]
    assert bucket["DeletionPolicy"] == "Retain"
    props = bucket["Properties"]
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms", "aws:kms:dsse"}
    assert props["VersioningConfiguration"]["Status"] == "Enabled"


def _tls_denies(policy: dict[str, Any], service: str) -> list[dict[str, Any]]:
    return [
        s
        for s in policy["Properties"]["PolicyDocument"]["Statement"]
        if s["Effect"] == "Deny"
        and s["Principal"] == "*"
        and s["Action"] in (f"{service}:*", [f"{service}:*"])
        and s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    ]


@pytest.mark.parametrize("bucket", ["ModelBucket", "JobBucket", "JobAccessLogBucket"])
def test_every_bucket_refuses_requests_without_tls(template, bucket):
    policies = [
        p for p in _of_type(template, "AWS::S3::BucketPolicy").values() if p["Properties"]["Bucket"] == {"Ref": bucket}
    ]
    assert len(policies) == 1
    (deny,) = _tls_denies(policies[0], "s3")
    assert {"Fn::GetAtt": [bucket, "Arn"]} in deny["Resource"]
    assert {"Fn::Sub": f"${{{bucket}.Arn}}/*"} in deny["Resource"]


def test_every_queue_is_encrypted_and_refuses_requests_without_tls(template):
    queues = _of_type(template, "AWS::SQS::Queue")
    assert set(queues) == {"JobQueue", "JobDeadLetterQueue"}
    assert all(q["Properties"]["SqsManagedSseEnabled"] is True for q in queues.values())
    (policy,) = _of_type(template, "AWS::SQS::QueuePolicy").values()
    (deny,) = _tls_denies(policy, "sqs")
    assert sorted(deny["Resource"], key=str) == sorted([{"Fn::GetAtt": [q, "Arn"]} for q in queues], key=str)


def test_batch_jobs_report_partial_failures_and_dead_letter_with_an_alarm(template):
    resources = template["Resources"]
    (event,) = resources["BatchFunction"]["Properties"]["Events"].values()
    assert event["Type"] == "SQS"
    assert event["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert event["Properties"]["Queue"] == {"Fn::GetAtt": ["JobQueue", "Arn"]}
    queue = resources["JobQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["JobDeadLetterQueue", "Arn"]}
    assert queue["VisibilityTimeout"] >= 6 * resources["BatchFunction"]["Properties"]["Timeout"]
    alarm = resources["JobDeadLetterAlarm"]["Properties"]
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["JobDeadLetterQueue", "QueueName"]}}]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (0, "GreaterThanThreshold")


XRAY_WRITES = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"]


def _without_xray(statements: list[dict]) -> list[dict]:
    """The statements other than X-Ray's two write actions, which alone may (and must) name Resource "*"."""
    xray = [s for s in statements if any(str(a).startswith("xray:") for a in _as_list(s["Action"]))]
    assert len(xray) == 1 and xray[0]["Action"] == XRAY_WRITES and xray[0]["Resource"] == "*"
    return [s for s in statements if s is not xray[0]]


@pytest.mark.parametrize("function", ["ApiFunction", "BatchFunction"])
def test_every_function_is_traced_with_only_the_xray_write_actions(template, function):
    properties = template["Resources"][function]["Properties"]
    assert properties["Tracing"] == {"Ref": "TracingMode"}
    assert template["Parameters"]["TracingMode"]["Default"] == "Active"
    role = template["Resources"][properties["Role"]["Fn::GetAtt"][0]]["Properties"]
    policies = [p for p in resolve(role["Policies"], template, {}) if p is not NO_VALUE]
    _without_xray([s for p in policies for s in p["PolicyDocument"]["Statement"]])


@pytest.mark.parametrize(
    ("function", "parameter"),
    [("ApiFunction", "ApiReservedConcurrency"), ("BatchFunction", "BatchReservedConcurrency")],
)
def test_reserved_concurrency_is_a_parameter_off_by_default(template, function, parameter):
    reserved = template["Resources"][function]["Properties"]["ReservedConcurrentExecutions"]
    assert template["Parameters"][parameter]["Default"] == -1
    assert resolve(reserved, template, {parameter: "-1"}) is NO_VALUE
    assert resolve(reserved, template, {parameter: "10"}) == {"Ref": parameter}


def test_job_bucket_is_versioned_and_both_buckets_are_access_logged_to_a_private_bucket(template):
    resources = template["Resources"]
    job = resources["JobBucket"]["Properties"]
    assert job["VersioningConfiguration"] == {"Status": "Enabled"}
    assert job["LoggingConfiguration"]["DestinationBucketName"] == {"Ref": "JobAccessLogBucket"}
    logs = resources["JobAccessLogBucket"]["Properties"]
    assert all(logs["PublicAccessBlockConfiguration"].values())
    assert logs["LifecycleConfiguration"]["Rules"][0]["ExpirationInDays"] == 90
    (policy,) = [
        p
        for p in _of_type(template, "AWS::S3::BucketPolicy").values()
        if p["Properties"]["Bucket"] == {"Ref": "JobAccessLogBucket"}
    ]
    (grant,) = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Allow"]
    assert grant["Principal"] == {"Service": "logging.s3.amazonaws.com"} and grant["Action"] == "s3:PutObject"
    sources = [{"Fn::GetAtt": [bucket, "Arn"]} for bucket in ("JobBucket", "ModelBucket")]
    assert grant["Condition"]["ArnLike"] == {"aws:SourceArn": sources}
    assert resources["ModelBucket"]["Properties"]["LoggingConfiguration"]["LogFilePrefix"] == "model-bucket/"


@pytest.mark.parametrize("group", ["ApiFunctionLogs", "BatchFunctionLogs", "HttpApiAccessLogs"])
def test_every_log_group_is_explicit_with_a_retention(template, group):
    assert template["Resources"][group]["Type"] == "AWS::Logs::LogGroup"
    assert template["Resources"][group]["Properties"]["RetentionInDays"] > 0


def test_batch_role_reaches_only_its_queue_job_bucket_models_and_logs(template):
    role = template["Resources"]["BatchFunctionRole"]["Properties"]
    statements = _without_xray([s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]])
    for statement in statements:
        assert statement["Effect"] == "Allow"
        assert all(not a.endswith("*") for a in _as_list(statement["Action"]))
        for resource in _as_list(resolve(statement["Resource"], template, {})):
            assert resource != "*"
            target = json.dumps(resource)
            allowed = ("JobQueue", "JobDeadLetterQueue", "JobBucket", "ModelBucket", "BatchFunctionLogs")
            assert any(name in target for name in allowed), target
    writes = [s for s in statements if {"s3:PutObject", "sqs:SendMessage"} & set(_as_list(s["Action"]))]
    assert {json.dumps(s["Resource"]) for s in writes} == {
        json.dumps({"Fn::Sub": "${JobBucket.Arn}/*"}),
        json.dumps({"Fn::GetAtt": ["JobQueue", "Arn"]}),
        json.dumps({"Fn::GetAtt": ["JobDeadLetterQueue", "Arn"]}),  # a bad job message, dead-lettered at once
    }
    variables = template["Resources"]["BatchFunction"]["Properties"]["Environment"]["Variables"]
    assert variables["QUANTFN_BATCH_DEAD_LETTER_URL"] == {"Ref": "JobDeadLetterQueue"}


def test_function_role_grants_only_its_logs_and_model_reads(template):
    function = template["Resources"]["ApiFunction"]["Properties"]
    assert "Policies" not in function  # SAM would add a role with AWSLambdaBasicExecutionRole (Resource "*")
    role_name = function["Role"]["Fn::GetAtt"][0]
    role = template["Resources"][role_name]
    assert role["Type"] == "AWS::IAM::Role"
    assert "ManagedPolicyArns" not in role["Properties"]
    policies = [p for p in resolve(role["Properties"]["Policies"], template, {}) if p is not NO_VALUE]
    statements = _without_xray([s for p in policies for s in p["PolicyDocument"]["Statement"]])
    actions = {a for s in statements for a in _as_list(s["Action"])}
    assert actions == {"logs:CreateLogStream", "logs:PutLogEvents", "s3:GetObject"}  # no GPU endpoint: no invoke
    assert all(s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s for s in statements)
    object_arns = re.compile(r"^(\$\{ModelBucket\.Arn\}|arn:\$\{AWS::Partition\}:s3:::\$\{ModelBucketName\})/\*$")
    for statement in statements:
        for mode in ({}, {"ModelBucketName": "other-models"}):
            for resource in _as_list(resolve(statement["Resource"], template, mode)):
                assert resource != "*"
                if "s3:GetObject" in _as_list(statement["Action"]):
                    assert object_arns.match(resource["Fn::Sub"]), resource
                else:
                    assert resource == {"Fn::GetAtt": [function["LoggingConfig"]["LogGroup"]["Ref"], "Arn"]}


def test_with_a_gpu_image_the_api_may_invoke_that_endpoint_only(template):
    gpu = {"GpuImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/quantfn-gpu:1"}
    role = template["Resources"]["ApiFunctionRole"]["Properties"]
    policies = [p for p in resolve(role["Policies"], template, gpu) if p is not NO_VALUE]
    invoke = [
        s
        for p in policies
        for s in p["PolicyDocument"]["Statement"]
        if "sagemaker:InvokeEndpoint" in _as_list(s["Action"])
    ]
    assert invoke == [{"Effect": "Allow", "Action": "sagemaker:InvokeEndpoint", "Resource": {"Ref": "GpuEndpoint"}}]
    variables = template["Resources"]["ApiFunction"]["Properties"]["Environment"]["Variables"]
    assert resolve(variables["QUANTFN_ENDPOINT_NAME"], template, gpu) == {"Fn::GetAtt": ["GpuEndpoint", "EndpointName"]}
    assert resolve(variables["QUANTFN_ENDPOINT_NAME"], template, {}) == ""
    for name in ("GpuEndpointRole", "GpuModel", "GpuEndpointConfig", "GpuEndpoint"):
        assert template["Resources"][name]["Condition"] == "HasGpu"


def test_every_makefile_built_resource_has_its_make_target(template):
    makefile = (ROOT / "Makefile").read_text()
    built = [n for n, r in template["Resources"].items() if r.get("Metadata", {}).get("BuildMethod") == "makefile"]
    assert {"ApiFunction", "RuntimeLayer", "ModelLayer"} <= set(built)
    for name in built:
        assert re.search(rf"^build-{name}:", makefile, re.MULTILINE), name


# Each alarm and its off switch: the parameter and the value that removes it.
ALARMS = {
    "Api5xxAlarm": ("Alarm5xxRatePercent", "0"),
    "ApiLatencyAlarm": ("AlarmP99LatencyMs", "0"),
    "ThrottleAlarm": ("AlarmThrottles", "false"),
    "JobDeadLetterAlarm": ("AlarmDeadLetter", "false"),
    "CircuitOpenAlarm": ("AlarmCircuitOpen", "false"),
}
GPU = {"GpuImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/quantfn-gpu:1"}


def test_every_alarm_is_on_by_default_off_by_its_parameter_and_notifies_the_topic(template):
    alarms = _of_type(template, "AWS::CloudWatch::Alarm")
    assert set(alarms) == set(ALARMS)
    for name, (parameter, off) in ALARMS.items():
        alarm = alarms[name]
        assert condition(alarm["Condition"], template, GPU), name
        assert not condition(alarm["Condition"], template, GPU | {parameter: off}), name
        actions = alarm["Properties"]["AlarmActions"]
        assert resolve(actions, template, {"AlarmTopicArn": "arn:aws:sns:us-east-1:1:t"}) == [{"Ref": "AlarmTopicArn"}]
        assert alarm["Properties"]["TreatMissingData"] == "notBreaching"
    # the circuit breaker's alarm exists only with a GPU endpoint
    assert not condition(alarms["CircuitOpenAlarm"]["Condition"], template, {})


def test_the_dashboard_and_the_per_route_metrics_it_reads_follow_one_parameter(template):
    dashboard = template["Resources"]["OperationsDashboard"]
    assert condition(dashboard["Condition"], template, {})
    assert not condition(dashboard["Condition"], template, {"Dashboard": "false"})
    settings = template["Resources"]["HttpApi"]["Properties"]["DefaultRouteSettings"]
    assert resolve(settings["DetailedMetricsEnabled"], template, {}) is True
    assert resolve(settings["DetailedMetricsEnabled"], template, {"Dashboard": "false"}) is False
