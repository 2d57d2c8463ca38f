"""Reading the price fields out of request bodies, and undoing a request Content-Encoding."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import pytest

from proxy.errors import Rejected
from proxy.http.body import PriceFields, decode_content, read_price_fields

MP = "multipart/form-data; boundary=XyZ"


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"XyZ", preamble: bytes = b"") -> bytes:
    out = preamble
    for headers, value in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def field(name: str, value: bytes) -> tuple[bytes, bytes]:
    return (f'Content-Disposition: form-data; name="{name}"'.encode(), value)


def rejected(status: int, fn, *args) -> Rejected:
    with pytest.raises(Rejected) as info:
        fn(*args)
    assert info.value.status == status
    assert info.value.error_type == "invalid_request_error"
    return info.value


# -- JSON ------------------------------------------------------------------------------------


def test_json_fields_are_read():
    body = json.dumps(
        {"model": "google/veo-3.1", "prompt": "a cat", "seconds": 8, "quality": "high", "size": "1024x1024"}
    ).encode()
    assert read_price_fields(body, "application/json; charset=utf-8") == PriceFields(
        "google/veo-3.1", seconds="8", seconds_number=8.0, quality="high", size="1024x1024"
    )


def test_json_text_fields_stream_and_max_tokens():
    body = json.dumps({"model": "m", "stream": True, "max_tokens": 100, "messages": []}).encode()
    fields = read_price_fields(body, "application/json", text=True)
    assert fields.stream is True and fields.max_tokens == 100
    # An image or video call is priced without token counts: they are not read, nor refused.
    assert read_price_fields(body, "application/json").max_tokens is None
    odd = json.dumps({"model": "m", "max_tokens": "many", "n": {}}).encode()
    assert read_price_fields(odd, "application/json") == PriceFields("m")


def test_json_odd_types_do_not_pass_as_stream():
    body = json.dumps({"model": "m", "stream": "yes", "max_tokens": True}).encode()
    fields = read_price_fields(body, "application/json")
    assert fields == PriceFields("m", stream=False, max_tokens=None)


@pytest.mark.parametrize("model", [" m", "m ", "m\n", "m\x00", "\u202em", "m\ud800", "m\x85"])
def test_a_model_imagerouter_would_not_run_as_priced_is_refused(model):
    # ImageRouter runs the string as sent; the guard does not trim, it refuses.
    body = json.dumps({"model": model}).encode()
    err = rejected(400, read_price_fields, body, "application/json")
    assert "model" in err.message


@pytest.mark.parametrize(
    "ctype",
    [
        None,
        "",
        "application/vnd.api+json",
        "text/json",
        "application/json; charset=utf-16le",
        "application/json; charset=utf8",
    ],
)
def test_json_express_json_would_not_parse_is_refused(ctype):
    # express.json() parses application/json only, and body-parser 415s a charset not "utf-*".
    rejected(400, read_price_fields, b'{"model": "m"}', ctype)


def test_json_last_duplicate_key_wins_as_in_json_parse():
    fields = read_price_fields(b'{"model": "test/test", "model": "google/veo-3.1"}', "application/json")
    assert fields.model == "google/veo-3.1"


def test_json_unicode_escapes_in_keys_and_values_are_decoded():
    body = b'{"m\\u006fdel": "google/veo-3.1", "model": "x", "mod\\u0065l": "google/v\\u0065o-3.1"}'
    assert read_price_fields(body, "application/json").model == "google/veo-3.1"


def test_json_one_leading_bom_is_dropped_as_body_parser_does():
    assert read_price_fields(b'\xef\xbb\xbf{"model": "m"}', "application/json").model == "m"
    rejected(400, read_price_fields, b'\xef\xbb\xbf\xef\xbb\xbf{"model": "m"}', "application/json")


@pytest.mark.parametrize(
    "body", [b'{"model": "m", "n": NaN}', b'{"model": "m", "n": -Infinity}', b"\xff\xfe{\x00}\x00"]
)
def test_json_that_json_parse_rejects_is_refused(body):
    rejected(400, read_price_fields, body, "application/json")


@pytest.mark.parametrize("body", [b"not json", b"", b"[1, 2]", b'"model"', b"\xff\xfe{}"])
def test_unreadable_json_is_400(body):
    rejected(400, read_price_fields, body, "application/json")


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "a cat"}',
        b'{"model": ""}',
        b'{"model": "   "}',
        b'{"model": 5}',
        b'{"model": null}',
        b'{"model": ["a"]}',
    ],
)
def test_missing_model_is_400(body):
    err = rejected(400, read_price_fields, body, "application/json")
    assert "model" in err.message


@pytest.mark.parametrize("ctype", ["text/plain", "application/octet-stream", "image/png"])
def test_unpriceable_content_type_is_400(ctype):
    rejected(400, read_price_fields, b'{"model": "m"}', ctype)


def test_nested_model_field_is_not_read():
    rejected(400, read_price_fields, b'{"input": {"model": "m"}}', "application/json")


# -- multipart -------------------------------------------------------------------------------


def test_multipart_fields_are_read():
    body = multipart([field("prompt", b"a cat"), field("model", b"openai/gpt-image-1"), field("size", b"1024x1024")])
    assert read_price_fields(body, MP) == PriceFields("openai/gpt-image-1", size="1024x1024")


def test_multipart_file_part_containing_the_word_model_is_not_read():
    image = (
        b'Content-Disposition: form-data; name="image"; filename="model.png"\r\nContent-Type: image/png',
        b'\x89PNG model name="model"\r\n\r\nfree/model',
    )
    body = multipart([image, field("model", b"openai/gpt-image-1")])
    assert read_price_fields(body, MP).model == "openai/gpt-image-1"


def test_a_delimiter_followed_by_junk_inside_a_file_is_refused():
    # busboy ends the file at "\r\n--XyZ" and drops the rest up to the next delimiter.
    image = (b'Content-Disposition: form-data; name="image"; filename="a.png"', b"\x89PNG\r\n--XyZ-not-a-boundary")
    rejected(400, read_price_fields, multipart([image, field("model", b"m")]), MP)


@pytest.mark.parametrize(
    "disposition",
    [
        b'form-data; name="model"; filename="x.txt"',
        b'form-data; name="model"; filename=""',
        b"form-data; name=model; filename*=utf-8''x",
    ],
)
def test_multipart_model_part_that_is_a_file_is_refused(disposition):
    file_part = (b"Content-Disposition: " + disposition, b"cheap/model")
    err = rejected(400, read_price_fields, multipart([file_part, field("model", b"openai/gpt-image-1")]), MP)
    assert "file" in err.message or "extended" in err.message


def test_multipart_model_part_of_type_octet_stream_is_a_file_and_refused():
    part = (b'Content-Disposition: form-data; name="model"\r\nContent-Type: application/octet-stream', b"m")
    err = rejected(400, read_price_fields, multipart([part]), MP)
    assert "file" in err.message


def test_multipart_quoted_boundary():
    body = multipart([field("model", b"m/q")], boundary=b"a b=c")
    assert read_price_fields(body, 'multipart/form-data; boundary="a b=c"').model == "m/q"


def test_multipart_boundary_parameter_in_any_case_and_position():
    body = multipart([field("model", b"m/q")], boundary=b"----WebKitFormBoundary7MA4YWxk")
    ctype = "Multipart/Form-Data; charset=utf-8; BOUNDARY=----WebKitFormBoundary7MA4YWxk"
    assert read_price_fields(body, ctype).model == "m/q"


def test_multipart_unquoted_name_and_preamble():
    part = (b"content-disposition: form-data; name=model", b"m/unquoted")
    body = multipart([part], preamble=b"this is a preamble\r\n")
    assert read_price_fields(body, MP).model == "m/unquoted"


def test_multipart_duplicate_price_field_is_400():
    body = multipart([field("model", b"test/test"), field("model", b"google/veo-3.1")])
    err = rejected(400, read_price_fields, body, MP)
    assert "more than once" in err.message


def test_multipart_duplicate_non_price_field_is_fine():
    body = multipart([field("image[]", b"a"), field("image[]", b"b"), field("model", b"m")])
    assert read_price_fields(body, MP).model == "m"


def _smuggled() -> bytes:
    # Parts delimited by a decoy boundary sit in the real body's preamble, where a multipart
    # parser using the real boundary (busboy, behind the upstream's multer) never looks.
    decoy = multipart([field("model", b"test/test")], boundary=b"decoy")
    return decoy + multipart([field("model", b"google/veo-3.1"), field("prompt", b"a cat")], boundary=b"real")


@pytest.mark.parametrize(
    "ctype",
    [
        "multipart/form-data; xboundary=decoy; boundary=real",
        'multipart/form-data; note="x; boundary=decoy;"; boundary=real',
    ],
)
def test_multipart_boundary_is_the_boundary_parameter_not_a_lookalike(ctype):
    try:
        fields = read_price_fields(_smuggled(), ctype)
    except Rejected as exc:  # refusing an odd Content-Type is fine too
        assert exc.status == 400
    else:
        assert fields.model == "google/veo-3.1"


SWAPPED_NAMES = multipart(
    [
        (b'Content-Disposition: form-data; foo="; name=model;"; name="prompt"', b"test/test"),
        (b'Content-Disposition: form-data; bar="; name=prompt;"; name="model"', b"google/veo-3.1"),
    ]
)
FAKE_FILENAME = multipart(
    [
        (b'Content-Disposition: form-data; name="model"; note="no filename here"', b"google/veo-3.1"),
        (b'Content-Disposition: form-data; foo="; name=model;"; name="prompt"', b"test/test"),
    ]
)


@pytest.mark.parametrize("body", [SWAPPED_NAMES, FAKE_FILENAME], ids=["quoted-name", "quoted-filename"])
def test_multipart_part_names_respect_quoted_parameter_values(body):
    try:
        fields = read_price_fields(body, MP)
    except Rejected as exc:
        assert exc.status == 400
    else:
        assert fields.model == "google/veo-3.1"


def test_multipart_decoy_preamble_does_not_confuse_a_plain_boundary():
    assert read_price_fields(_smuggled(), "multipart/form-data; boundary=real").model == "google/veo-3.1"


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (multipart([field("model", b"m")]), "multipart/form-data"),  # no boundary
        (multipart([field("model", b"m")]), "multipart/form-data; boundary=Other"),
        (multipart([field("model", b"m")])[:-10], MP),  # truncated: no closing delimiter
        (b'--XyZ\r\nContent-Disposition: form-data; name="model"', MP),
        (multipart([field("model", b"\xff\xfe")]), MP),
        (multipart([field("prompt", b"x")]), MP),  # no model
    ],
)
def test_unreadable_multipart_is_400(body, ctype):
    rejected(400, read_price_fields, body, ctype)


# -- urlencoded ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"prompt=a+cat&model=google%2Fveo-3.1", b"model=test/test&model=google/veo-3.1", b"prompt=x", b"model=\xff"],
)
def test_urlencoded_is_refused_as_imagerouter_reads_no_model_from_it(body):
    # ImageRouter mounts no urlencoded parser: it would run without a model, so nothing is priced.
    err = rejected(400, read_price_fields, body, "application/x-www-form-urlencoded")
    assert "urlencoded" in err.message


# -- Content-Encoding ------------------------------------------------------------------------

JSON_BODY = b'{"model": "openai/gpt-image-1", "prompt": "a cat"}'


@pytest.mark.parametrize("encoding", [None, "", "identity", " Identity "])
def test_identity_is_returned_untouched(encoding):
    assert decode_content(b"\x00raw", encoding, 10, "application/json") == b"\x00raw"


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", " gzip "])
def test_gzip_is_decoded(encoding):
    assert decode_content(gzip.compress(JSON_BODY), encoding, 1024, "application/json") == JSON_BODY


def test_deflate_is_zlib_wrapped_as_nodes_inflate_reads_it():
    assert decode_content(zlib.compress(JSON_BODY), "deflate", 1024, "application/json") == JSON_BODY
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    rejected(400, decode_content, raw.compress(JSON_BODY) + raw.flush(), "deflate", 1024, "application/json")


def test_x_gzip_is_refused_as_body_parser_refuses_it():
    err = rejected(400, decode_content, gzip.compress(JSON_BODY), "x-gzip", 1024, "application/json")
    assert "Content-Encoding" in err.message


def gzip_with_comment(comment: bytes, data: bytes) -> bytes:
    """A gzip member whose header carries `comment` (FCOMMENT): bytes multer would read as they are."""
    member = gzip.compress(data, mtime=0)
    return member[:3] + bytes([member[3] | 0x10]) + member[4:10] + comment + b"\x00" + member[10:]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP"])
@pytest.mark.parametrize("ctype", [MP, "Multipart/Form-Data; boundary=XyZ", "multipart/mixed; boundary=XyZ"])
def test_an_encoded_multipart_body_is_refused_as_multer_reads_it_raw(encoding, ctype):
    # ImageRouter's multer parses the raw bytes: here the gzip comment is a form naming the
    # expensive model, the compressed one names the free one.
    inner = multipart([field("model", b"google/veo-3.1")])
    body = gzip_with_comment(b"\r\n" + inner, multipart([field("model", b"test/test")]))
    assert gzip.decompress(body) == multipart([field("model", b"test/test")])
    err = rejected(400, decode_content, body, encoding, 1 << 20, ctype)
    assert "multipart" in err.message


def test_decoded_body_at_exactly_the_limit_is_accepted():
    body = b"x" * 1000
    assert decode_content(gzip.compress(body), "gzip", 1000, "application/json") == body


def test_decoded_body_one_byte_past_the_limit_is_413():
    rejected(413, decode_content, gzip.compress(b"x" * 1001), "gzip", 1000, "application/json")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_decompression_bomb_is_413(encoding):
    bomb = gzip.compress(b"\0" * 20_000_000) if encoding == "gzip" else zlib.compress(b"\0" * 20_000_000)
    assert len(bomb) < 50_000
    tracemalloc.start()
    try:
        err = rejected(413, decode_content, bomb, encoding, 64 * 1024, "application/json")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "decompressed" in err.message
    assert peak < 2_000_000  # stopped just past the limit, not after inflating 20 MB


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip", "gzip, br"])
def test_unsupported_encoding_is_400(encoding):
    err = rejected(400, decode_content, JSON_BODY, encoding, 1024, "application/json")
    assert "Content-Encoding" in err.message


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_corrupt_compressed_data_is_400(encoding):
    rejected(400, decode_content, b"definitely not compressed", encoding, 1024, "application/json")


def test_multi_member_gzip_is_decoded_whole_or_refused():
    body = gzip.compress(b"model=test/test") + gzip.compress(b"&model=google/veo-3.1")
    try:
        decoded = decode_content(body, "gzip", 1024, "application/json")
    except Rejected as exc:
        assert exc.status == 400
    else:
        assert decoded == b"model=test/test&model=google/veo-3.1"


def test_gzip_then_read_end_to_end():
    decoded = decode_content(gzip.compress(JSON_BODY), "gzip", 1024, "application/json")
    assert read_price_fields(decoded, "application/json").model == "openai/gpt-image-1"


def test_extended_part_name_is_refused_rather_than_guessed():
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ntest/test\r\n'
        b"--b\r\nContent-Disposition: form-data; name*=utf-8''model\r\n\r\ngoogle/veo-3.1\r\n--b--\r\n"
    )
    rejected(400, read_price_fields, body, "multipart/form-data; boundary=b")


# -- ambiguity classes (docs/refusals.md): refused with a message naming what was ambiguous -----
# tests/http/test_parity.py checks every class against the real Express + multer stack; these run
# without Node.

M = b'Content-Disposition: form-data; name="model"'


@pytest.mark.parametrize(
    ("body", "ctype", "says"),
    [
        (b"X--XyZ\r\n" + M + b"\r\n\r\ntest/test\r\n" + multipart([field("prompt", b"x")]), MP, "not right after CRLF"),
        (multipart([field("model", b"m")]).replace(b"\r\n--XyZ--", b"\n--XyZ--"), MP, "not right after CRLF"),
        (multipart([field("prompt", b"see --XyZ")]), MP, "not right after CRLF"),
        (multipart([field("model", b"m")]) + b"--XyZ\r\n", MP, "after the close delimiter"),
        (multipart([field("model", b"m")]).replace(b"--XyZ\r\n", b"--XyZ \r\n"), MP, "transport padding"),
        (multipart([field("model", b"m")]).replace(b"--XyZ\r\n", b"--XyZjunk\r\n"), MP, "other than CRLF"),
        (multipart([(b'Content-Disposition: form-data\r\n ; name="model"', b"m")]), MP, "folded"),
        (multipart([(b"Content-Type: text/plain\r\n " + M, b"m"), field("prompt", b"x")]), MP, "folded"),
        (multipart([(M + b"\r\nContent-Type: text/plain; charset=latin1", b"m")]), MP, "charset 'latin1'"),
        (multipart([(M + b"\r\nContent-Type: text/plain; charset=utf-16le", b"m\x00")]), MP, "charset 'utf-16le'"),
        (multipart([(M + b"\r\nContent-Type: text/plain; charset=us-ascii", b"m\xe9")]), MP, "not valid us-ascii"),
        (multipart([(M + b"\r\nContent-Type: text/plain; charset", b"m")]), MP, "malformed"),
        (multipart([(M + b"\r\nContent-Transfer-Encoding: base64", b"bQ==")]), MP, "Content-Transfer-Encoding"),
        (multipart([(M + b"\r\nContent-Type: application/octet-stream", b"m")]), MP, "file"),
        (multipart([(M + b'; filename="m.txt"', b"m")]), MP, "file"),
        (multipart([(M + b"; x*=bogus''y", b"m")]), MP, "extended"),
        (multipart([(b'Content-Disposition: form-data; name="model[]"', b"m")]), MP, "bracket"),
        (multipart([(b'Content-Disposition: form-data; name="model[0]"', b"m")]), MP, "bracket"),
        (multipart([(b'Content-Disposition: attachment; name="model"', b"m")]), MP, "not form-data"),
        (multipart([(b"Content-Disposition: form-data", b"m")]), MP, "no name"),
        (multipart([(b'Content-Disposition: form-data; name=""', b"m")]), MP, "no name"),
        (multipart([(b'Content-Disposition: form-data; name="model";', b"m")]), MP, "malformed"),
        (multipart([(b'Content-Disposition: form-data; name = "model"', b"m")]), MP, "around '='"),
        (multipart([(b'Content-Disposition: form-data; name="mod\\el"', b"m")]), MP, "backslash"),
        (multipart([(b'Content-Disposition: form-data; name="prompt"\r\n' + M, b"m")]), MP, "more than once"),
        (multipart([(b'Content-Disposition : form-data; name="model"', b"m")]), MP, "malformed header line"),
        (multipart([(M + b"\x01", b"m")]), MP, "malformed header line"),
        (multipart([(b"X: " + b"a" * 17000 + b"\r\n" + M, b"m")]), MP, "16 KiB"),
        (b"--XyZ\r\n\r\nm\r\n--XyZ--\r\n", MP, "no headers"),
        (b"--XyZ\r\n" + M + b"\r\n--XyZ--\r\n", MP, "do not end before"),
        (multipart([field("prompt", b"x" * (1 << 20)), field("model", b"m")]), MP, "1 MiB"),
        (
            multipart([field("model", b"m")], boundary=b"x" * 71),
            "multipart/form-data; boundary=" + "x" * 71,
            "RFC 2046",
        ),
        (multipart([field("model", b"m")]), "multipart/form-data;\tboundary=XyZ", "malformed"),
        (multipart([field("model", b"m")]), "multipart/form-data; boundary=XyZ; boundary=Q", "more than once"),
    ],
)
def test_a_body_a_lenient_parser_could_read_differently_is_refused(body, ctype, says):
    err = rejected(400, read_price_fields, body, ctype)
    assert says in err.message


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (multipart([(M + b"\r\nContent-Type: text/plain; charset=US-ASCII", b"m")]), MP),
        (multipart([(M + b"\r\nContent-Type: text/plain;charset=utf8", b"m")]), MP),
        (multipart([(M + b"\r\nContent-Transfer-Encoding: 8bit", b"m")]), MP),
        (multipart([(b"CONTENT-DISPOSITION:FORM-DATA;NAME=model", b"m")]), MP),
        (multipart([(b'Content-Disposition: form-data; note="a; name=x"; name="model"', b"m")]), MP),
        (multipart([field("model", b"m")], boundary=b"'()+_,-./:=?"), 'multipart/form-data; boundary="\'()+_,-./:=?"'),
        (multipart([field("model", b"m")])[:-2] + b" the epilogue", MP),
        (b"\r\n" + multipart([field("model", b"m")]), MP),
    ],
)
def test_every_parser_reads_these_alike_so_they_are_priced(body, ctype):
    assert read_price_fields(body, ctype).model == "m"


def test_the_smuggling_bodies_are_refused():
    from tests.parity.corpus import SMUGGLING_CASES

    for label, body, ctype in SMUGGLING_CASES:
        assert isinstance(rejected(400, read_price_fields, body, ctype), Rejected), label


def test_echo_cuts_and_drops_control_characters():
    from proxy.untrusted import EXCERPT_MAX_CHARS, excerpt

    assert excerpt("a\x00b\r\nc\x1b[31m\u202ed\x85") == "abc[31md"
    assert excerpt("m" * 500) == "m" * EXCERPT_MAX_CHARS + "…"
    assert excerpt("vendor/model é") == "vendor/model é"


# -- text routes: what bounds a call's tokens (docs/text-holds.md) ----------------------------


def text_fields(body: bytes, ctype: str = "application/json") -> PriceFields:
    return read_price_fields(body, ctype, text=True)


def test_text_fields_are_read_from_json():
    body = json.dumps(
        {"model": "m", "max_tokens": 10, "max_completion_tokens": 20, "max_output_tokens": 30, "n": 3}
    ).encode()
    fields = text_fields(body)
    assert (fields.max_tokens, fields.max_completion_tokens, fields.max_output_tokens, fields.n) == (10, 20, 30, 3)
    assert fields.input_bytes == len(body) and fields.media_parts == 0


@pytest.mark.parametrize(
    ("literal", "count"),
    [
        # JSON.parse reads every number as a double: these are all 100.
        (b"100", 100),
        (b"100.0", 100),
        (b"1e2", 100),
        (b"1E+2", 100),
        (b"100.000000000000001", 100),
        (b"0.5", 1),
        (b"99.01", 100),  # a fraction is rounded up: a hold never guesses low
        (b"9007199254740993", 9007199254740992),  # past 2^53, as the double JSON.parse makes
        # Other values as Number() reads them.
        (b'"100"', 100),
        (b'" 12 "', 12),
        (b'"0x10"', 16),
        (b'"1e3"', 1000),
        (b'"0b11"', 3),
        (b'"\\u00a07\\n"', 7),
        (b"true", 1),
        (b"[100]", 100),
        (b'["0x10"]', 16),
        (b"[[5]]", 5),
        # Not a positive finite number: the request names no maximum.
        (b"0", None),
        (b"-0", None),
        (b"-5", None),
        (b"1e400", None),
        (b"1" + b"0" * 400, None),
        (b"null", None),
        (b"false", None),
        (b'""', None),
        (b'"  "', None),
        (b"[]", None),
        (b"[null]", None),
        (b'"Infinity"', None),
        (b'"-1"', None),
    ],
)
def test_token_counts_are_read_as_number_reads_them(literal, count):
    body = b'{"model": "m", "max_tokens": %s, "max_completion_tokens": %s, "max_output_tokens": %s}' % (
        literal,
        literal,
        literal,
    )
    fields = text_fields(body)
    assert fields.max_tokens == fields.max_completion_tokens == fields.max_output_tokens == count


def test_text_fields_follow_json_parse_on_duplicates_and_escapes():
    body = b'{"model": "m", "max_tokens": 10, "max_tokens": 90000, "\\u006e": 2, "n": 5, "max_\\u006futput_tokens": 7}'
    fields = text_fields(body)
    assert (fields.max_tokens, fields.n, fields.max_output_tokens) == (90000, 5, 7)
    # The last duplicate wins even when it is not a number: then there is no maximum.
    assert text_fields(b'{"model": "m", "max_tokens": 10, "max_tokens": null}').max_tokens is None
    # Nested or prototype-shaped keys are not top-level fields.
    assert text_fields(b'{"model": "m", "__proto__": {"max_tokens": 5}, "extra": {"n": 9}}').max_tokens is None


@pytest.mark.parametrize(
    ("literal", "n"),
    [
        (b"3", 3),
        (b"2.5", 3),
        (b'"3"', 3),
        (b'" 4 "', 4),
        (b'"0x10"', 16),
        (b'"1e1"', 10),
        (b"true", 1),
        (b"[2]", 2),
        (b"0", None),
        (b'""', None),
        (b"-2", None),
        (b"null", None),
        (b'"-Infinity"', None),
    ],
)
def test_n_is_read_as_number_reads_it(literal, n):
    # A numeric string counts too: ImageRouter coercing it would bill every choice.
    assert text_fields(b'{"model": "m", "n": %s}' % literal).n == n


@pytest.mark.parametrize(
    "literal",
    [
        b'"x"',
        b'"1_000"',
        b'"-0x10"',
        b'"0x"',
        b'"1e"',
        b'"."',
        b'"inf"',
        b'"infinity"',
        b'"\\u0663"',
        b'"\\u001f5"',
        b'"1,5"',
        b"[1, 2]",
        b"[true]",
        b"[{}]",
        b"{}",
        b'{"n": 1}',
    ],
)
@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "max_output_tokens", "n"])
def test_a_count_that_is_not_a_number_is_refused(name, literal):
    body = b'{"model": "m", "%s": %s}' % (name.encode(), literal)
    refusal = rejected(400, text_fields, body)
    assert refusal.error_type == "invalid_request_error"
    assert refusal.message.startswith(f"'{name}' is ") and "send a JSON number" in refusal.message


def test_an_infinite_n_is_refused():
    for literal in (b"1e400", b'"Infinity"', b'" +Infinity "'):
        assert rejected(400, text_fields, b'{"model": "m", "n": %s}' % literal).message.startswith("'n' is ")


def test_n_0x10_holds_sixteen_outputs():
    fields = text_fields(b'{"model": "m", "n": "0x10", "max_tokens": 100}')
    assert (fields.n, fields.max_tokens) == (16, 100)


def test_reasoning_budgets_are_read():
    body = json.dumps({"model": "m", "max_tokens": 1, "thinking": {"type": "enabled", "budget_tokens": 32000}})
    assert text_fields(body.encode()).reasoning_tokens == 32000
    body = json.dumps({"model": "m", "reasoning": {"max_tokens": "2000"}, "thinking_budget": 500})
    assert text_fields(body.encode()).reasoning_tokens == 2000  # the largest of those given
    gemini = {"model": "m", "extra_body": {"google": {"thinking_config": {"thinking_budget": 1024}}}}
    assert text_fields(json.dumps(gemini).encode()).reasoning_tokens == 1024
    # -1 (Gemini's "dynamic"), 0 and effort levels set no number of tokens.
    for body in ({"thinking_budget": -1}, {"reasoning": {"effort": "high"}}, {"thinking": {"type": "disabled"}}):
        assert text_fields(json.dumps({"model": "m", **body}).encode()).reasoning_tokens is None
    refusal = rejected(400, text_fields, b'{"model": "m", "thinking": {"budget_tokens": "lots"}}')
    assert refusal.message.startswith("'thinking.budget_tokens' is \"lots\"")


def test_text_fields_are_not_read_for_image_routes():
    body = b'{"model": "m", "max_output_tokens": 5, "n": 3, "messages": [{"role": "user", "content": "hello"}]}'
    assert read_price_fields(body, "application/json") == PriceFields("m")


def test_input_bytes_bound_the_texts_utf8_bytes():
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "héllo 世界"}]}, ensure_ascii=False
    ).encode()
    assert text_fields(body).input_bytes == len(body)
    # Escapes are never shorter than what they decode to: the body's length still bounds the text.
    escaped = json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo 世界"}]}).encode()
    assert text_fields(escaped).input_bytes == len(escaped) > len("héllo 世界".encode())
    assert text_fields(b'\xef\xbb\xbf{"model": "m"}').input_bytes == len(b'{"model": "m"}')  # the BOM is not input


IMAGE = "data:image/png;base64," + "A" * 40_000


def test_media_parts_are_counted_apart_and_their_payload_is_not_input():
    chat = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is in these?"},
                    {"type": "image_url", "image_url": {"url": IMAGE, "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGR" * 1000, "format": "wav"}},
                    {"type": "file", "file": {"file_data": "JVBER" * 1000, "filename": "a.pdf"}},
                ],
            },
        ],
    }
    body = json.dumps(chat).encode()
    fields = text_fields(body)
    # Only the payload leaves the count: the URL, the audio data, the file data.
    payload = len(IMAGE) + len("https://example.com/cat.png") + 5000 + 5000
    assert fields.media_parts == 4
    assert fields.input_bytes == len(body) - payload
    assert fields.input_bytes < 1000  # the text and the JSON around it, not 50 kB of base64


def test_a_media_type_on_the_body_or_a_message_leaves_all_its_text_in_the_count():
    text = "budget " * 30_000
    plain = {"model": "m", "messages": [{"role": "user", "content": text}]}
    for stray in (
        {**plain, "type": "image"},
        {**plain, "messages": [{"role": "user", "type": "image", "content": text}]},
        {**plain, "messages": [{"role": "user", "type": "input_file", "content": [{"type": "text", "text": text}]}]},
    ):
        body = json.dumps(stray).encode()
        fields = text_fields(body)
        assert (fields.input_bytes, fields.media_parts) == (len(body), 0)


def test_only_a_media_parts_payload_leaves_the_count():
    text = "x" * 50_000
    body = json.dumps(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/a.png", "detail": text},
                            "text": text,
                        },
                    ],
                }
            ],
        }
    ).encode()
    fields = text_fields(body)
    assert fields.media_parts == 1
    assert fields.input_bytes == len(body) - len("https://example.com/a.png") > 100_000


def test_a_tool_results_own_content_parts_count_apart():
    body = json.dumps(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {
                                    "type": "image",
                                    "source": {"type": "base64", "media_type": "image/png", "data": IMAGE},
                                },
                            ],
                        },
                    ],
                }
            ],
        }
    ).encode()
    fields = text_fields(body)
    assert (fields.media_parts, fields.input_bytes) == (1, len(body) - len(IMAGE))


def test_responses_media_parts_and_stored_context_count_apart():
    body = json.dumps(
        {
            "model": "m",
            "previous_response_id": "resp_123",
            "prompt": {"id": "pmpt_1", "version": "2"},
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "describe"},
                        {"type": "input_image", "image_url": IMAGE},
                        {"type": "input_file", "file_id": "file-abc"},
                    ],
                }
            ],
        }
    ).encode()
    fields = text_fields(body)
    assert fields.media_parts == 4  # two parts, the stored response, the stored prompt
    assert fields.input_bytes == len(body) - len(IMAGE) - len("file-abc")
    # A plain-text prompt field is text, counted by its bytes, not a stored template.
    assert text_fields(b'{"model": "m", "prompt": "hi", "conversation": ""}').media_parts == 0


def test_a_deeply_nested_text_body_is_measured_without_recursion():
    body = b'{"model": "m", "input": ' + b"[" * 900 + b"]" * 900 + b"}"
    assert text_fields(body).input_bytes == len(body)


def test_a_multipart_text_body_counts_its_whole_length_as_input():
    body = multipart([field("model", b"m"), field("max_tokens", b"5"), field("prompt", b"x" * 100)])
    fields = read_price_fields(body, MP, text=True)
    # Form values are strings, never token counts; every byte of a form may be text.
    assert (fields.model, fields.max_tokens, fields.input_bytes) == ("m", None, len(body))
