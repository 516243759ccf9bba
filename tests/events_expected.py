"""What each events/ file must produce: shared by the in-process and the SAM tests."""

from __future__ import annotations

# file -> (status, error code or None)
API_EVENTS: dict[str, tuple[int, str | None]] = {
    "api-embeddings.json": (200, None),
    "api-embeddings-single.json": (200, None),
    "api-embeddings-base64.json": (200, None),
    "api-embeddings-base64-body.json": (200, None),
    "api-models.json": (200, None),
    "api-health.json": (200, None),
    "api-openapi.json": (200, None),
    "api-bad-json.json": (400, "invalid_request"),
    "api-bad-missing-input.json": (400, "invalid_request"),
    "api-bad-empty-input.json": (400, "invalid_request"),
    "api-bad-empty-string.json": (400, "invalid_request"),
    "api-bad-non-string-item.json": (400, "invalid_request"),
    "api-bad-token-array.json": (400, "token_arrays_unsupported"),
    "api-rerank.json": (200, None),
    "api-classify.json": (200, None),  # needs the intent classifier (`make test` builds it)
    "api-rerank-v2.json": (200, None),
    "api-embed-v2.json": (200, None),  # every type: int8/uint8 need the model's calibrated ranges (a current build)
    "api-embed-v1.json": (200, None),
    "api-bad-embed-type.json": (400, "invalid_request"),
    "api-bad-output-dimension.json": (400, "invalid_request"),  # the default model was not trained for Matryoshka
    "api-bad-embed-truncate-none.json": (400, "text_too_long"),
    "api-bad-rerank-no-documents.json": (400, "invalid_request"),
    "api-bad-lone-surrogate.json": (400, "invalid_text"),
    "api-bad-deep-json.json": (400, "too_deep"),
    "api-bad-not-utf8.json": (400, "invalid_request"),
    "api-bad-nothing-to-read.json": (400, "empty_text"),
    # A classify request naming the embedder: the wrong task for the route.
    "api-bad-classify-wrong-task.json": (400, "wrong_model_task"),
    "api-bad-encoding-format.json": (400, "invalid_request"),
    "api-bad-dimensions.json": (400, "invalid_request"),
    "api-bad-unknown-model.json": (404, "model_not_found"),
    "api-bad-unknown-field.json": (400, "invalid_request"),
    "api-bad-method.json": (405, "method_not_allowed"),
    "api-bad-path.json": (404, "not_found"),
    "api-too-many-inputs.json": (413, "too_many_inputs"),
    # 300 inputs: over QUANTFN_MAX_INPUTS, legal for the GPU endpoint; without one configured, a 413 that says so.
    "api-embeddings-oversized.json": (413, "too_many_inputs"),
}

# The keys the authorizer events carry (tests store their records: tests/integration/test_authorizer.py).
EXAMPLE_KEY = "qfn_examplekey01_ExampleSecretForTheTestsOnly-0123456789abcd"  # active
REVOKED_KEY = "qfn_examplekey02_ExampleSecretForTheTestsOnly-0123456789abcd"  # its record revoked

# file -> (isAuthorized, the reason logged, the key id in the answer's context)
AUTHORIZER_EVENTS: dict[str, tuple[bool, str, str]] = {
    "authorizer-key-valid.json": (True, "accepted", "examplekey01"),
    "authorizer-key-valid-cohere.json": (True, "accepted", "examplekey01"),  # "bearer": the scheme in any case
    "authorizer-key-wrong-secret.json": (False, "wrong_secret", "examplekey01"),
    "authorizer-key-unknown.json": (False, "unknown", "unknownkey99"),
    "authorizer-key-revoked.json": (False, "revoked", "examplekey02"),
    "authorizer-key-malformed.json": (False, "malformed", ""),
    "authorizer-key-missing.json": (False, "missing", ""),
}
