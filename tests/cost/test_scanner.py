from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cost.observers import SMALL_BODY_BYTES, SmallBodyFirst, observer_for
from proxy.cost.scanner import JsonScanner, Outcome
from proxy.cost.sse import SseScanner

UNKNOWN = Outcome("unknown")
ERROR = Outcome("error")


def cost(micros: int) -> Outcome:
    return Outcome("cost", micros)


def scan(chunks, *, complete=True, content_type=None, content_encoding=None):
    observer = observer_for(content_type, content_encoding)
    for chunk in chunks:
        observer.feed(chunk)
    return observer.finish(complete)


def scan_json(body: bytes, *, complete=True) -> Outcome:
    return scan([body], complete=complete)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def largest_bytes_attribute(obj: object) -> int:
    """Bytes held by the largest bytes/bytearray attribute (or list of them) of `obj`."""
    sizes = [0]
    for value in vars(obj).values():
        if isinstance(value, (bytes, bytearray)):
            sizes.append(len(value))
        elif isinstance(value, list):
            sizes.append(sum(len(v) for v in value if isinstance(v, (bytes, bytearray))))
    return max(sizes)


IMAGE_BODY = (
    b'   {"created":1769286389027,"data":[{"b64_json":"iVBORw0KGgo+/AAA=","cost":9,'
    b'"error":"nested"}],"latency":6942,"usage":{"cost":7},'
    b'"note":"say \\"cost\\": 5, \\\\\\"error\\": 1 \\\\","cost":0.004}  \n'
)


# --- JSON bodies -------------------------------------------------------------------------------


def test_cost_after_heartbeat_spaces():
    assert scan_json(b"      " + b'{"created":1,"data":[],"latency":6942,"cost":0.004}') == cost(4000)


def test_heartbeats_in_separate_chunks_then_object():
    assert scan([b" ", b" ", b" ", b'{"cost":0.0123}']) == cost(12300)


def test_error_body_after_heartbeat_is_an_error():
    assert scan_json(b'   {"error":{"message":"Insufficient credits","type":"billing"}}') == ERROR


def both_paths(body: bytes) -> list[Outcome]:
    """The outcome through the small-body path (parsed whole) and through the streaming scanner."""
    padded = body[:-1] + b',"pad":"' + b"x" * SMALL_BODY_BYTES + b'"}'
    return [scan_json(body), scan_json(padded), scan(pieces(padded, 7))]


@pytest.mark.parametrize(
    "body, micros",
    [
        (b'{"cost":0.004,"error":{"message":"x"}}', 4000),
        (b'{"error":{"message":"x"},"cost":0.004}', 4000),
        (b'{"error":"boom","cost":0.004}', 4000),
        (b'{"error":true,"cost":1}', 1_000_000),
        (b'{"error":0,"cost":1}', 1_000_000),
        (b'{"error":{"m":1},"cost":0}', 0),
    ],
)
def test_a_top_level_cost_is_charged_even_beside_an_error(body, micros):
    assert both_paths(body) == [cost(micros)] * 3


@pytest.mark.parametrize(
    "body",
    [b'{"error":false}', b'{"error":""}', b'{"error":0}', b'{"error":true}', b'{"error":[1]}', b'{"error":"boom"}'],
)
def test_only_an_error_object_releases_the_hold(body):
    # Anything else is not an ImageRouter error envelope: charge the hold, as for any unknown body.
    assert both_paths(body) == [UNKNOWN] * 3


def test_an_error_object_without_cost_releases():
    assert both_paths(b'{"error":{"message":"Insufficient credits"}}') == [ERROR] * 3


def test_an_unreadable_cost_beside_an_error_charges_the_hold():
    assert both_paths(b'{"error":{"m":1},"cost":"lots"}') == [UNKNOWN] * 3


def test_null_error_is_not_an_error():
    assert scan_json(b'{"error":null,"cost":0.002}') == cost(2000)


def test_last_error_key_wins():
    assert both_paths(b'{"error":{"m":1},"error":null}') == [UNKNOWN] * 3
    assert both_paths(b'{"error":null,"error":{"m":1}}') == [ERROR] * 3


def test_missing_cost_is_unknown():
    assert scan_json(b'{"created":1,"data":[{"b64_json":"AAAA"}],"latency":5}') == UNKNOWN


def test_broken_stream_is_unknown_even_with_a_cost():
    assert scan_json(IMAGE_BODY, complete=False) == UNKNOWN


@pytest.mark.parametrize("cut", [1, 10, 60, len(IMAGE_BODY.rstrip()) - 1])
def test_truncated_object_is_unknown(cut):
    assert scan_json(IMAGE_BODY[:cut]) == UNKNOWN


def test_representative_body_has_its_top_level_cost():
    assert scan_json(IMAGE_BODY) == cost(4000)


def test_every_split_point_gives_the_same_outcome():
    for i in range(len(IMAGE_BODY) + 1):
        assert scan([IMAGE_BODY[:i], IMAGE_BODY[i:]]) == cost(4000), i


def test_byte_by_byte_gives_the_same_outcome():
    assert scan(pieces(IMAGE_BODY, 1)) == cost(4000)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":"\\"","cost":0.001}',
        b'{"a":"\\\\","cost":0.001}',
        b'{"a":"\\\\\\"","cost":0.001}',
        b'{"a":"x\\\\\\\\\\\\","cost":0.001}',
        b'{"a\\"b":"\\"}\\"","cost":0.001}',
        b'{"a":"\\u0022cost\\u0022: 5 \\ud83d\\ude00","cost":0.001}',
        b'{"co\\u0073t":0.001}',
        b'{"a":"\\"x\\\\y\\\\\\\\\\"z\\\\\\"\\\\","cost":0.001}',
        b'{"a":[1, -2.5e3 ,true,false,null,\n0,{"cost":9},"s",[2,3]],"cost":0.001}',
        b'{"\\u0063\\u006f\\u0073\\u0074":"0.001"}',
        b'{"\\u0065rror":null,"cost":0.001}',
        '{"caf\u00e9":"\u00fcml\u00e4ut \u2603","cost":0.001}'.encode(),
    ],
)
def test_escapes_at_every_split_point(body):
    assert json.loads(body)  # the case is valid JSON
    for i in range(len(body) + 1):
        assert scan([body[:i], body[i:]]) == cost(1000), i
    assert scan(pieces(body, 1)) == cost(1000)


def test_unicode_escaped_error_key_is_an_error():
    assert both_paths(b'{"\\u0065rror":{"message":"x"}}') == [ERROR] * 3


@pytest.mark.parametrize("run", range(1, 9))
def test_backslash_run_split_across_chunks(run):
    # A string ending in `run` backslashes before its closing quote (escaped when odd) continues.
    value = b"ab" + b"\\" * run + b'"' + (b'"' if run % 2 else b"")
    body = b'{"v":"' + value + b',"cost":0.002}'
    assert json.loads(body)["v"].endswith("\\" * (run // 2) + '"' * (run % 2))
    start = body.index(b"ab") + 2
    for i in range(start, start + run + 3):
        for j in range(i, start + run + 4):
            assert scan([body[:i], body[i:j], body[j:]]) == cost(2000), (i, j)


def test_escaped_quotes_inside_a_long_string():
    filler = b"A" * 70_000
    body = b'{"v":"' + filler + b'\\"' + filler + b"\\\\" + b'","cost":0.003}'
    assert scan(pieces(body, 65_536)) == cost(3000)
    assert scan(pieces(body, 4096)) == cost(3000)


def test_nested_cost_and_error_are_ignored():
    body = b'{"data":[{"cost":5,"error":{"m":1}}],"usage":{"cost":1,"error":"x"},"x":[[{"cost":2}]]}'
    assert scan_json(body) == UNKNOWN
    assert scan_json(body[:-1] + b',"cost":0.0001}') == cost(100)


def test_cost_text_inside_a_string_is_ignored():
    assert scan_json(b'{"revised_prompt":"{\\"cost\\": 5, \\"error\\": 1}"}') == UNKNOWN
    assert scan_json(b'{"p":"\\"cost\\":5","cost":0.5}') == cost(500_000)


def test_duplicate_cost_last_wins():
    assert scan_json(b'{"cost":0.001,"cost":0.002}') == cost(2000)
    assert scan_json(b'{"cost":0.001,"cost":"abc"}') == UNKNOWN
    assert scan_json(b'{"cost":"abc","cost":0.003}') == cost(3000)
    assert scan_json(b'{"cost":0.001,"cost":null}') == UNKNOWN
    assert scan_json(b'{"cost":0.001,"cost":[1]}') == UNKNOWN


@pytest.mark.parametrize(
    ("token", "micros"),
    [
        (b"0.004", 4000),
        (b"0.0000123", 13),
        (b"0.0000001", 1),
        (b"1e-30", 1),
        (b"1e-99999999", 1),
        (b"1e-3", 1000),
        (b"2.5E+2", 250_000_000),
        (b"0", 0),
        (b"-0", 0),
        (b"3", 3_000_000),
        (b"1000000000", 10**15),
        (b'"0.004"', 4000),
        (b'"0.0000123"', 13),
        (b'"12"', 12_000_000),
        (b'"\\u0030.5"', 500_000),
    ],
)
def test_cost_rounds_up_to_the_micro_dollar(token, micros):
    assert scan_json(b'{"cost":' + token + b"}") == cost(micros)


@pytest.mark.parametrize(
    "token",
    [
        b"-0.001",
        b'"-0.001"',
        b'"abc"',
        b'"1e-3"',
        b'" 0.1"',
        b'""',
        b'"NaN"',
        b"1000000000.000001",
        b"1e400",
        b"0." + b"0" * 70 + b"1",
        b'"0.' + b"0" * 70 + b'1"',
        b"null",
        b"true",
        b"[0.1]",
        b'{"usd":0.1}',
    ],
)
def test_invalid_cost_is_unknown(token):
    body = b'{"cost":' + token + b"}"
    assert scan_json(body) == UNKNOWN
    assert scan(pieces(body, 1)) == UNKNOWN


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"    ",
        b'[{"cost":0.1}]',
        b"<html><body>502 Bad Gateway</body></html>",
        b'"cost"',
        b"0.004",
        b"null",
        b'{"cost":0.1}}',
        b'{"cost":0.1} {"cost":0.2}',
        b'{"cost":0.1} x',
        b'{"cost":0.1,}',
        b'{"a":[1,],"cost":0.1}',
        b'{"a":[1,01],"cost":0.1}',
        b'{"a":[1,1x],"cost":0.1}',
        b'{"a":[1,tru],"cost":0.1}',
        b'{"a":[1,2 3],"cost":0.1}',
        b'{"a":[1,2},"cost":0.1}',
        b'{"a":[1,-],"cost":0.1}',
        b'{"a" 1,"cost":0.1}',
        b'{"a":1 "cost":0.1}',
        b'{"a":01,"cost":0.1}',
        b'{"a":1.,"cost":0.1}',
        b'{"a":.5,"cost":0.1}',
        b'{"a":-,"cost":0.1}',
        b'{"a":1e,"cost":0.1}',
        b'{"a":tru,"cost":0.1}',
        b'{"a":nulls,"cost":0.1}',
        b'{"a":NaN,"cost":0.1}',
        b'{"a":[}],"cost":0.1}',
        b'{"a":{]},"cost":0.1}',
        b'{"a":[1},"cost":0.1}',
        b'{"a":{"b":1],"cost":0.1}',
        b'{"a\\x":1,"cost":0.1}',
        b"{cost:0.1}",
    ],
)
def test_anything_but_one_json_object_is_unknown(body):
    assert scan_json(body) == UNKNOWN
    assert scan(pieces(body, 1)) == UNKNOWN


def test_trailing_whitespace_is_fine():
    assert scan_json(b'{"cost":0.1} \r\n\t ') == cost(100_000)


def test_nesting_deeper_than_the_limit_is_unknown():
    deep = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b',"cost":0.1}'
    assert scan(pieces(deep, 1000)) == UNKNOWN
    shallow = b'{"a":' + b"[" * 500 + b"]" * 500 + b',"cost":0.1}'
    assert scan(pieces(shallow, 1000)) == cost(100_000)


def test_long_number_is_streamed_not_held():
    body = b'{"a":[1' + b"0" * (1 << 20) + b'.5e-3],"cost":0.1}'
    scanner = JsonScanner()
    for chunk in pieces(body, 65_536):
        scanner.feed(chunk)
        assert largest_bytes_attribute(scanner) <= 4096
    assert scanner.finish() == cost(100_000)


def test_feed_after_invalid_is_ignored_and_releases_state():
    scanner = JsonScanner()
    scanner.feed(b'{"a":[[[[' + b"x")
    scanner.feed(b'"]]]],"cost":0.1}')
    assert largest_bytes_attribute(scanner) == 0
    assert scanner.finish() == UNKNOWN


def test_twenty_mib_image_in_64_kib_chunks_keeps_little_state():
    payload = b"iVBORw0KGgoAAAANSUhEUgAA+/" * (20 * 2**20 // 26)
    body = (
        b"   " * 5
        + b'{"created":1769286389027,"data":[{"b64_json":"'
        + payload
        + b'","revised_prompt":"a \\"cat\\""}],"latency":6942,"cost":0.004}'
    )
    scanner = JsonScanner()
    largest = 0
    for chunk in pieces(body, 65_536):
        scanner.feed(chunk)
        largest = max(largest, largest_bytes_attribute(scanner))
    assert scanner.finish() == cost(4000)
    assert largest <= 4096


# --- SSE streams -------------------------------------------------------------------------------

SSE = "text/event-stream; charset=utf-8"


def chat_stream(eol: bytes = b"\n") -> bytes:
    events = [
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"delta":{"content":"Hi"}}]}',
        b": keep-alive comment",
        b'data: {"id":"c1","choices":[{"delta":{"content":" there \\"cost\\": 9"}}]}',
        b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2},"cost":0.0012}',
        b"data: [DONE]",
    ]
    return b"".join(event + eol + eol for event in events)


def test_chat_stream_final_chunk_cost():
    assert scan([chat_stream()], content_type=SSE) == cost(1200)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_line_endings_at_every_split_point(eol):
    body = chat_stream(eol)
    for i in range(len(body) + 1):
        assert scan([body[:i], body[i:]], content_type=SSE) == cost(1200), i
    assert scan(pieces(body, 1), content_type=SSE) == cost(1200)


def test_responses_api_completed_event_cost():
    body = (
        b"event: response.created\n"
        b'data: {"type":"response.created","response":{"id":"r1","status":"in_progress"}}\n\n'
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"Hello"}\n\n'
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":{"id":"r1","status":"completed",'
        b'"usage":{"input_tokens":3,"output_tokens":1},"cost":0.0001}}\n\n'
    )
    assert scan(pieces(body, 7), content_type="Text/Event-Stream") == cost(100)


def test_sse_data_lines_join_with_newline_and_space_is_optional():
    assert scan([b'data:{"usage":{},\ndata: "cost":\ndata:  0.002}\n\n'], content_type=SSE) == cost(2000)


def test_sse_crlf_multi_line_data_at_every_split_point():
    body = b'data: {"cost":\r\ndata: 0.002}\r\n\r\n'
    for i in range(len(body) + 1):
        assert scan([body[:i], body[i:]], content_type=SSE) == cost(2000), i


def test_sse_cost_counts_only_in_the_final_event():
    # An earlier release took the last cost seen, though events without one followed it.
    body = b'data: {"cost":0.001}\n\ndata: {"cost":0.005}\n\ndata: {"choices":[]}\n\n'
    assert scan([body], content_type=SSE) == UNKNOWN
    assert scan([b'data: {"cost":0.001}\n\ndata: {"cost":0.005}\n\ndata: [DONE]\n\n'], content_type=SSE) == cost(5000)
    early = (
        b'data: {"choices":[{"delta":{"content":"h"}}],"cost":0.0001}\n\n'
        b'data: {"choices":[{"delta":{"content":"i"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    )
    assert scan([early], content_type=SSE) == UNKNOWN
    assert scan(pieces(early, 1), content_type=SSE) == UNKNOWN
    # Comments and an event with no data are not events: the cost stays final.
    assert scan([b'data: {"cost":0.002}\n\n: keep-alive\n\nevent: ping\n\n'], content_type=SSE) == cost(2000)
    # An unreadable event after the cost may be anything.
    assert scan([b'data: {"cost":0.002}\n\ndata: {"choi\n\n'], content_type=SSE) == UNKNOWN


def test_sse_error_after_output_is_not_a_release():
    # An earlier release released the hold (charged $0) for a stream that failed after content went out.
    chunk = b'data: {"id":"c1","choices":[{"delta":{"content":"Hi"}}]}\n\n'
    failure = b'data: {"error":{"message":"upstream failed"}}\n\n'
    assert scan([chunk + failure], content_type=SSE) == UNKNOWN
    assert scan([chunk + failure + b"data: [DONE]\n\n"], content_type=SSE) == UNKNOWN
    assert scan([failure + chunk], content_type=SSE) == UNKNOWN  # output after the error
    assert scan([chunk + failure + b'data: {"cost":0.0003}\n\n'], content_type=SSE) == cost(300)
    # Before any output an error is a release, in either API.
    assert scan([b'data: {"id":"c1","choices":[]}\n\n' + failure], content_type=SSE) == ERROR
    created = b'event: response.created\ndata: {"type":"response.created","response":{"id":"r1"}}\n\n'
    error = b'event: error\ndata: {"type":"error","error":{"message":"x"}}\n\n'
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"H"}\n\n'
    assert scan([created + error], content_type=SSE) == ERROR
    assert scan([created + delta + error], content_type=SSE) == UNKNOWN


def test_sse_error_event():
    body = b'data: {"id":"c1","choices":[]}\n\ndata: {"error":{"message":"upstream failed"}}\n\n'
    assert scan([body], content_type=SSE) == ERROR


def test_sse_cost_beats_error():
    body = b'data: {"error":{"message":"x"}}\n\ndata: {"cost":0.001}\n\n'
    assert scan([body], content_type=SSE) == cost(1000)


def test_sse_without_cost_is_unknown():
    body = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n'
    assert scan([body], content_type=SSE) == UNKNOWN
    assert scan([b""], content_type=SSE) == UNKNOWN


def test_sse_stream_cut_after_the_cost_event_keeps_the_cost():
    body = chat_stream()
    cut = body.index(b"data: [DONE]") + 3
    assert scan([body[:cut]], content_type=SSE, complete=False) == cost(1200)


def test_sse_final_event_without_blank_line():
    body = b'data: {"choices":[]}\n\ndata: {"cost":0.0007}'
    assert scan([body], content_type=SSE) == cost(700)
    assert scan([body + b"\n"], content_type=SSE) == cost(700)
    # A broken stream may have cut that event short: it is not trusted.
    assert scan([body], content_type=SSE, complete=False) == UNKNOWN


def test_sse_invalid_cost_is_unknown():
    assert scan([b'data: {"cost":-1}\n\n'], content_type=SSE) == UNKNOWN
    assert scan([b'data: {"cost":0.001}\n\ndata: {"cost":"abc"}\n\n'], content_type=SSE) == UNKNOWN
    # The last cost-bearing event could not be read: an earlier error does not settle it.
    assert scan([b'data: {"error":{"m":1}}\n\ndata: {"cost":"abc"}\n\n'], content_type=SSE) == UNKNOWN


def test_sse_oversized_event_is_skipped_and_makes_the_outcome_unknown():
    big = b'data: {"cost":0.001,"pad":"' + b"x" * (1 << 20) + b'"}\n\n'
    scanner = SseScanner()
    for chunk in pieces(b'data: {"error":{"m":1}}\n\n' + big, 65_536):
        scanner.feed(chunk)
        assert largest_bytes_attribute(scanner) <= (1 << 20) + 65_536
    assert scanner.finish() == UNKNOWN


def test_sse_oversized_event_drops_what_it_held():
    scanner = SseScanner()
    for chunk in pieces(b"data: " + b"x" * (2 << 20), 65_536):
        scanner.feed(chunk)
    assert largest_bytes_attribute(scanner) == 0


def test_sse_oversized_event_after_a_cost_makes_it_unknown():
    big = b'data: {"cost":0.002,"pad":"' + b"x" * (1 << 20) + b'"}\n\n'
    assert scan(pieces(b'data: {"cost":0.001}\n\n' + big, 65_536), content_type=SSE) == UNKNOWN


def test_sse_cost_after_an_oversized_event_counts():
    big = b"data: " + b"x" * (2 << 20) + b"\n\n"
    assert scan(pieces(big + b'data: {"cost":0.002}\n\n', 65_536), content_type=SSE) == cost(2000)


# --- encodings ---------------------------------------------------------------------------------

ENCODED_BODY = b"   " + b'{"data":[{"b64_json":"' + b"QUJD" * 20_000 + b'"}],"cost":0.004}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),
    ],
)
def test_compressed_body_in_small_chunks(encoding, encode):
    data = encode(ENCODED_BODY)
    assert scan(pieces(data, 1), content_encoding=encoding) == cost(4000)
    assert scan(pieces(data, 100), content_encoding=encoding) == cost(4000)
    assert scan(pieces(data, 100), content_encoding=encoding, complete=False) == UNKNOWN
    assert scan(pieces(data[:-10], 100), content_encoding=encoding) == UNKNOWN
    # The JSON is whole but the compressed stream lacks its end (gzip trailer, adler32).
    assert scan(pieces(data[:-4], 100), content_encoding=encoding) == UNKNOWN


def test_compressed_sse_stream():
    data = gzip.compress(chat_stream())
    assert scan(pieces(data, 5), content_type=SSE, content_encoding="gzip") == cost(1200)


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", b"not gzip at all, just text"),
        ("gzip", gzip.compress(ENCODED_BODY) + b"trailing"),
        ("deflate", b"\x78\x9c" + b"\xff" * 50),
        ("gzip", b"\x1f"),
    ],
)
def test_undecodable_compressed_body_is_unknown(encoding, data):
    assert scan(pieces(data, 7), content_encoding=encoding) == UNKNOWN


def test_decompression_bomb_is_fed_in_bounded_pieces(monkeypatch):
    largest_feed = 0
    original_feed = JsonScanner.feed

    def spy(self, chunk):
        nonlocal largest_feed
        largest_feed = max(largest_feed, len(chunk))
        original_feed(self, chunk)

    monkeypatch.setattr(JsonScanner, "feed", spy)
    body = b'{"pad":"' + b"A" * (64 << 20) + b'","cost":0.001}'
    data = gzip.compress(body)
    assert len(data) < 1 << 20
    assert scan([data], content_encoding="gzip") == cost(1000)
    assert largest_feed <= 256 << 10


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_unreadable_encoding_is_unknown(encoding):
    assert scan([b'{"cost":0.004}'], content_encoding=encoding) == UNKNOWN


@pytest.mark.parametrize("encoding", [None, "", "identity", " Identity "])
def test_identity_encoding_passes_through(encoding):
    assert scan([b'{"cost":0.004}'], content_encoding=encoding) == cost(4000)


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("text/event-stream", SseScanner),
        ("TEXT/EVENT-STREAM; charset=utf-8", SseScanner),
        ("application/json", SmallBodyFirst),
        ("text/html", SmallBodyFirst),
        (None, SmallBodyFirst),
    ],
)
def test_observer_for_picks_by_media_type(content_type, kind):
    assert isinstance(observer_for(content_type), kind)


# --- property: random objects, random chunking ----------------------------------------------------

_PLAIN = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def reference_outcome(text: bytes) -> Outcome:
    """The outcome computed from the whole body with json.loads."""
    obj = json.loads(text, parse_float=Decimal)
    assert isinstance(obj, dict)
    if "cost" not in obj:
        return ERROR if isinstance(obj.get("error"), dict) else UNKNOWN
    value = obj["cost"]
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        return UNKNOWN
    if isinstance(value, str):
        if len(value) > 64 or not _PLAIN.fullmatch(value):
            return UNKNOWN
        value = Decimal(value)
    amount = Decimal(value) * 10**6
    if amount < 0:
        return UNKNOWN
    micros = math.ceil(amount)
    return cost(micros) if micros <= 10**15 else UNKNOWN


keys = st.one_of(st.sampled_from(["cost", "error", "data", "b64_json", 'co"st']), st.text(max_size=8))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.sampled_from('ab"\\/\n\t\u00e9\u2603\U0001f600 {}[]:,'), max_size=20),
    st.text(max_size=10),
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)
four_decimal_costs = st.integers(min_value=0, max_value=10**8).map(lambda n: n / 10_000)


@st.composite
def bodies(draw):
    obj = draw(st.dictionaries(keys, values, max_size=6))
    if draw(st.booleans()):
        obj["cost"] = draw(four_decimal_costs)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    return draw(st.sampled_from(["", " ", "   \n"])).encode() + text.encode()


@settings(max_examples=300, deadline=None)
@given(body=bodies(), data=st.data())
def test_random_chunking_matches_json_loads(body, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
    chunks = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert scan(chunks) == reference_outcome(body)
    cut = data.draw(st.integers(0, len(body) - 1))
    assert scan([body[:cut], b""]) == UNKNOWN


@settings(max_examples=300, deadline=None)
@given(body=bodies(), data=st.data())
def test_small_body_fast_path_agrees_with_the_streaming_scanner(body, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
    chunks = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    fast = SmallBodyFirst()
    for chunk in chunks:
        fast.feed(chunk)
    streaming = JsonScanner()
    for chunk in chunks:
        streaming.feed(chunk)
    assert fast.finish() == streaming.finish() == reference_outcome(body)
    cut = data.draw(st.integers(0, len(body) - 1))
    truncated = SmallBodyFirst()
    truncated.feed(body[:cut])
    assert truncated.finish() == UNKNOWN
    assert SmallBodyFirst().finish(complete=False) == UNKNOWN


@pytest.mark.parametrize(
    "body",
    [
        b'{"cost": NaN}',
        b'{"cost": Infinity}',
        b'{"cost": 0.1} x',
        b"[1]",
        b'{"cost": 0.1',
        b'{"error": null, "cost": -1}',
    ],
)
def test_small_body_fast_path_refuses_what_the_scanner_refuses(body):
    fast = SmallBodyFirst()
    fast.feed(body)
    streaming = JsonScanner()
    streaming.feed(body)
    assert fast.finish() == UNKNOWN == streaming.finish()


def test_small_body_fast_path_hands_large_bodies_to_the_scanner():
    fast = SmallBodyFirst()
    fast.feed(b'  {"data":[{"b64_json":"')
    for _ in range(4):
        fast.feed(b"A" * SMALL_BODY_BYTES)
    fast.feed(b'"}],"cost":0.25}')
    assert fast._kept == bytearray() and fast._scanner is not None  # nothing large is kept
    assert fast.finish() == cost(250_000)
