"""The unixctl reply decoder (`ReplyDecoder`, sans-IO) held to `json.loads` of the whole
reply: any text, any JSON spelling of it, cut into chunks anywhere (inside an escape
sequence, a surrogate pair's escapes, a UTF-8 character), gives the same text, in pieces
that end on whole lines; an error reply or a malformed one raises a clear UnixctlError.
The replies are built here: a real ovs-vswitchd's are read in tests/test_conntrack_ovs.py."""

import json
import re

import pytest
from hypothesis import assume, example, given, strategies as st

from ovsflow.source.unixctl import ReplyDecoder, UnixctlError

METHOD = "dpctl/dump-conntrack"
DUMP_LINE = ("udp,orig=(src=10.10.0.131,dst=10.96.0.45,sport=12154,dport=5000),reply=(src="
             "10.96.0.45,dst=10.10.0.131,sport=5000,dport=12154),id=0,zone=65520,status=0,"
             "timeout=567\n")
# ovs-vswitchd's own spelling (lib/json.c): members in this order, no spaces, `"`, `\\`
# and control characters escaped (\n, \t, ... or \u00XX), UTF-8 passed through
OVS_REPLY = '{{"id":0,"result":{},"error":null}}'


def fed(data: bytes, cuts: list[int]) -> tuple[ReplyDecoder, list[str]]:
    """The decoder fed `data` in chunks cut at `cuts`, and the pieces it returned."""
    decoder, pieces = ReplyDecoder(METHOD), []
    bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        pieces += decoder.feed(data[start:end])
    return decoder, pieces


def assert_whole_lines(pieces: list[str]) -> None:
    assert all(pieces), "an empty piece"
    assert all(piece.endswith("\n") for piece in pieces[:-1]), pieces


text_with_lines = st.lists(st.text(), max_size=8).map("\n".join)
spellings = st.fixed_dictionaries({
    "ensure_ascii": st.booleans(),
    "separators": st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
    "order": st.permutations(["id", "result", "error"]),
    "indent": st.sampled_from([None, 1]),
})


@pytest.mark.fuzz
@given(text=text_with_lines, spelling=spellings,
       cuts=st.lists(st.integers(min_value=0), max_size=20))
@example(text="a\\\nb\"\n\x00\u2028\U0001f600\n", spelling={
    "ensure_ascii": True, "separators": (",", ":"), "order": ["id", "result", "error"],
    "indent": None}, cuts=list(range(200)))
def test_any_text_cut_anywhere_comes_out_as_json_loads_reads_it(text, spelling, cuts):
    reply = {key: {"id": 7, "result": text, "error": None}[key] for key in spelling["order"]}
    data = json.dumps(reply, ensure_ascii=spelling["ensure_ascii"], indent=spelling["indent"],
                      separators=spelling["separators"]).encode()
    decoder, pieces = fed(data, cuts)
    assert decoder.complete
    assert "".join(pieces) == json.loads(data)["result"] == text
    assert_whole_lines(pieces)


@given(lines=st.integers(min_value=1, max_value=300),
       cuts=st.lists(st.integers(min_value=0), max_size=50))
def test_a_dump_comes_out_in_pieces_of_whole_lines(lines, cuts):
    data = OVS_REPLY.format(json.dumps(DUMP_LINE * lines)).encode()
    decoder, pieces = fed(data, cuts)
    assert decoder.complete and "".join(pieces) == DUMP_LINE * lines
    assert all(piece.endswith("\n") for piece in pieces)
    assert len(pieces) <= len(cuts) + 1  # a piece per chunk at most: no line-by-line work


def test_a_piece_is_what_the_chunks_so_far_complete_and_no_more():
    data = OVS_REPLY.format(json.dumps("first\nsecond\nthird")).encode()
    decoder = ReplyDecoder(METHOD)
    cut = data.index(b"sec") + 3
    assert decoder.feed(data[:cut]) == ["first\n"]  # "sec" waits for its line's end
    assert decoder.feed(data[cut:-20]) == ["second\n"]
    assert not decoder.complete
    assert decoder.feed(data[-20:]) == ["third"] and decoder.complete
    assert decoder.feed(b"anything after the reply") == []


@pytest.mark.parametrize("reply", [
    b'{"id":0,"result":null,"error":null}', b'{"id":0,"error":null}', b'{}',
    b'{"id":0,"result":"","error":null}'])
def test_no_text_is_no_piece(reply):
    decoder, pieces = fed(reply, [])
    assert decoder.complete and pieces == []


@pytest.mark.parametrize("error_first", [True, False])
def test_an_error_reply_raises_ovs_vswitchds_message(error_first):
    # as ovs-vswitchd sends it (`ovs-appctl dpctl/dump-conntrack zone=1` without a
    # netdev datapath), and with the members the other way round
    message = "ovs-vswitchd: datapath not found (Invalid argument)\n"
    members = [f'"error":{json.dumps(message)}', '"id":0', '"result":null']
    data = ("{" + ",".join(members if error_first else members[::-1]) + "}").encode()
    with pytest.raises(UnixctlError) as caught:
        fed(data, [5, 17, 40])
    assert str(caught.value) == f"{METHOD}: {message}"


@pytest.mark.parametrize("data, says", [
    (b'<html>', "expected { at '<html>'"),
    (b'{"id":0,"result":42,"error":null}', "result 42 is not text"),
    (b'{"id":0,"result":"a\\x","error":null}', "Invalid \\escape"),
    (b'{"id":0,"result":"a\nb","error":null}', "Invalid control character"),
    (b'{"id":nul,"result":"","error":null}', "id: Expecting value"),
    (b'{"id":0 "result":""}', "expected , or } at '\"result\":\"\"}'"),
    (b'{"id":0,}', "expected \" at '}'"),
    (b'{"id" 0}', "expected : at '0}'"),
    (b'{"id":[1}', "id: Expecting ',' delimiter"),
    (b'{"result":"\xff\xfe"}', "not UTF-8"),
])
def test_a_malformed_reply_raises_a_clear_error(data, says):
    with pytest.raises(UnixctlError) as caught:
        fed(data, [])
    assert str(caught.value).startswith(f"{METHOD}: malformed reply from ovs-vswitchd: ")
    assert says in str(caught.value)


@pytest.mark.fuzz
@given(text=text_with_lines, position=st.integers(min_value=0), junk=st.text(max_size=3),
       drop=st.integers(min_value=0, max_value=3),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_a_mangled_reply_is_read_as_json_reads_it_or_raises(text, position, junk, drop,
                                                            cuts):
    """Characters replaced at any place: where json (reading the first value of the text, as
    the decoder does from a stream) reads a reply, the decoder gives its text; where json
    fails, the decoder raises UnixctlError or waits for more."""
    reply = json.dumps({"id": 0, "result": text, "error": None}, ensure_ascii=False)
    position %= len(reply) + 1
    mangled = reply[:position] + junk + reply[position + drop:]
    assume(mangled != reply)
    try:
        start = re.match(r"[ \t\n\r]*", mangled).end()
        expected, _ = json.JSONDecoder().raw_decode(mangled, start)
    except json.JSONDecodeError:
        expected = None
    try:
        decoder, pieces = fed(mangled.encode(errors="surrogatepass"), cuts)
    except UnixctlError as err:
        assert expected is None or not isinstance(expected, dict) or (
            expected.get("error") is not None or not isinstance(expected.get("result"),
                                                                (str, type(None)))), err
        return
    if expected is None:
        assert not decoder.complete  # a truncated reply waits for the rest
    else:
        assert decoder.complete and isinstance(expected, dict)
        assert expected.get("error") is None
        assert "".join(pieces) == (expected.get("result") or "")
