"""Which request paths spend money: every spelling of a spending route is guarded."""

from __future__ import annotations

import pytest

from proxy.http.routing import RouteTable, canonical_path
from proxy.policy.model import default_policy

GEN = "/v1/openai/images/generations"


@pytest.fixture
def table() -> RouteTable:
    return RouteTable((r.path, r.kind, r.enabled) for r in default_policy().routes)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"/v1/openai/images/generations", GEN),
        (b"//v1//openai///images/generations", GEN),
        (b"/v1/./openai/images/./generations", GEN),
        (b"/v1/x/../openai/images/generations", GEN),
        (b"/v1/openai/images/generations/", GEN),
        (b"/v1/openai/images/generations/.", GEN),
        (b"/V1/OpenAI/IMAGES/Generations", GEN),
        (b"/v1/openai/images/%67enerations", GEN),
        (b"/v1/openai/images/%2e/generations", GEN),
        (b"/v1/openai/images/x/%2e%2e/generations", GEN),
        (b"/../../v1/openai/images/generations", GEN),  # `..` above the root stays at the root
        (b"/v1/openai/images%2Fgenerations", GEN),
        (b"/v1/openai/images%5cgenerations", GEN),
        (b"/v1/openai/images\\generations", GEN),
        (b"/v1/openai/images/generations/..", "/v1/openai/images"),
        (b"/", "/"),
        (b"", "/"),
        (b"/..", "/"),
        (b"/v1/openai/images/generations%252F", "/v1/openai/images/generations%2f"),  # decoded once only
    ],
)
def test_canonical_path(raw, canonical):
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/openai/images/generations",
        b"//v1/openai/images/generations",
        b"/v1/openai//images/generations",
        b"/v1/./openai/images/generations",
        b"/v1/x/../openai/images/generations",
        b"/v1/openai/images/generations/",
        b"/v1/openai/images/generations//",
        b"/V1/OPENAI/IMAGES/GENERATIONS",
        b"/v1/openai/images/%67enerations",
        b"/%76%31/openai/images/generations",
        b"/../v1/openai/images/generations",
        b"/v1/../../v1/openai/images/generations",
    ],
)
def test_every_spelling_of_a_spending_route_is_guarded_and_unambiguous(table, raw):
    match = table.classify("POST", raw)
    assert match.kind == "image"
    assert match.path == GEN
    assert match.enabled and not match.ambiguous


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/openai/images%2Fgenerations",
        b"/v1/openai/images%2fgenerations",
        b"/v1/openai%2Fimages%2Fgenerations",
        b"/v1/openai/images/generations%2F",
        b"/v1/openai/images%5Cgenerations",
        b"/v1/openai/images%5cgenerations",
        b"/v1/openai/images\\generations",
    ],
)
def test_encoded_separator_on_a_spending_route_is_ambiguous(table, raw):
    match = table.classify("POST", raw)
    assert match.kind == "image"
    assert match.ambiguous


def test_encoded_separator_on_another_path_is_just_passed_through(table):
    match = table.classify("POST", b"/v1/some%2Fother/path")
    assert match.kind is None and not match.ambiguous


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"/v1/openai/images/edits", "image"),
        (b"/v1/openai/videos/generations", "video"),
        (b"/v1/openai/chat/completions", "text"),
        (b"/V1/OpenAI/Responses/", "text"),
    ],
)
def test_default_routes_and_their_kinds(table, raw, kind):
    assert table.classify("POST", raw).kind == kind


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "get"])
def test_other_methods_on_a_spending_path_do_not_spend(table, method):
    match = table.classify(method, b"/v1/openai/images/generations")
    assert match.kind is None
    assert match.path == GEN


def test_method_is_case_insensitive_for_post(table):
    assert table.classify("post", b"/v1/openai/images/generations").kind == "image"


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/openai/images/generation",
        b"/v1/openai/images/generations/x",
        b"/v1/openai/images",
        b"/v1/openai/images/generations/..",
        b"/v1/credits",
        b"/v2/models",
        b"/v1/openai/images/generations.json",
        b"/v1/openai/images/%67enerations.json",
        b"/v1/other/%2567enerations",
    ],
)
def test_non_spending_paths(table, raw):
    assert table.classify("POST", raw).kind is None


def test_disabled_route_is_flagged(table):
    routes = RouteTable([(GEN, "image", True), ("/v1/openai/videos/generations", "video", False)])
    assert routes.classify("POST", b"/v1/openai/videos/generations").enabled is False
    assert routes.classify("POST", b"/V1/openai/videos/generations/").enabled is False
    assert routes.classify("POST", GEN.encode()).enabled is True


def test_custom_route_is_matched_on_its_canonical_form():
    routes = RouteTable([("/V2/Custom/Gen/", "video", True)])
    match = routes.classify("POST", b"/v2/custom//gen")
    assert match.kind == "video" and match.path == "/v2/custom/gen"


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/openai/images/%2567enerations",
        b"/v1/openai/images/%252567enerations",  # three layers
        b"/v1/openai/images%252fgenerations",
        b"/v1/openai/images%255Cgenerations",
        b"/v1/openai/images/generations%252F",
        b"/%2576%2531/openai/videos/generations",
        b"/v1/openai/images/generations/%2578",  # under the route once decoded twice
        b"/v1/openai/%2569mages/x/%252e%252e/generations",
        b"/v1/openai/images/%25" + b"25" * 12 + b"67enerations",  # nested past MAX_DECODES
    ],
)
@pytest.mark.parametrize("method", ["POST", "GET", "PUT", "delete"])
def test_a_path_still_encoded_after_one_decode_on_a_spending_route_is_ambiguous_on_every_method(table, raw, method):
    # Express decodes once; a layer in between that decodes twice must not find an unguarded
    # spending call here, so the guard refuses these whatever the method.
    match = table.classify(method, raw)
    assert match.kind is not None
    assert match.ambiguous


@pytest.mark.parametrize(
    "raw", [b"/v1/credits%2525", b"/v2/models/%2567", b"/v1/openai/images/%2578", b"/other/%252e%252e/x"]
)
def test_a_double_encoded_path_elsewhere_passes_through(table, raw):
    match = table.classify("POST", raw)
    assert match.kind is None and not match.ambiguous


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "PROPFIND"])
def test_a_method_that_may_write_to_an_unlisted_path_is_unknown(table, method):
    for raw in (b"/v1/responses", b"/v1/openai/images/variations", b"/V1/openai/audio/speech/"):
        match = table.classify(method, raw)
        assert (match.kind, match.unknown, match.free) == (None, True, False)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "get"])
def test_reading_an_unlisted_path_is_a_passthrough(table, method):
    match = table.classify(method, b"/v1/responses")
    assert (match.kind, match.unknown, match.free) == (None, False, False)


def test_a_free_route_is_known_only_for_its_own_path():
    routes = RouteTable([(GEN, "image", True), ("/v1/Auth/Test", "free", True), ("/v1/off", "free", False)])
    assert routes.classify("POST", b"/v1/auth/test/").free is True
    assert routes.classify("PUT", b"/v1/auth/test").free is False  # only a POST is counted as free
    assert routes.classify("PUT", b"/v1/auth/test").unknown is False
    assert routes.classify("POST", b"/v1/auth/test/x").unknown is True
    assert routes.classify("POST", b"/v1/off").unknown is True  # a disabled free route is unlisted
    assert routes.classify("POST", GEN.encode()).kind == "image"
