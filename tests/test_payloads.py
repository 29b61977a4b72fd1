"""Command and log payloads: parsing, validation and the exact wire texts of SPEC.md sections 3 and 4."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cc_proxy.errors import ProxyError
from cc_proxy.payloads import (
    SIGNAL_NAMES,
    AttachVM,
    Hyper,
    LogEntry,
    RegisterVM,
    Signal,
    decode_json,
    encode_json,
    io_response,
    parse_connect_shim,
    parse_unregister,
    relocate,
)

pytestmark = pytest.mark.timeout(30)


def j(value) -> bytes:
    return json.dumps(value).encode()


def refused(func, *args) -> str:
    with pytest.raises(ProxyError) as info:
        func(*args)
    return str(info.value)


# -- RegisterVM / AttachVM / UnregisterVM / ConnectShim ---------------------------------------------------

def test_register_vm_fields():
    vm = RegisterVM.parse(j({"containerId": "pod", "ctlSerial": "/c", "ioSerial": "/i", "console": "/k",
                             "numIOStreams": 2, "unknown": [1]}))
    assert vm == RegisterVM("pod", "/c", "/i", "/k", 2)
    assert RegisterVM.parse(j({"containerId": "pod", "ctlSerial": "/c", "ioSerial": "/i"})) == RegisterVM(
        "pod", "/c", "/i", "", 0)


@pytest.mark.parametrize("missing", ["containerId", "ctlSerial", "ioSerial"])
def test_register_vm_missing_field_is_malformed(missing):
    obj = {"containerId": "pod", "ctlSerial": "/c", "ioSerial": "/i"}
    del obj[missing]
    assert refused(RegisterVM.parse, j(obj)) == "malformed RegisterVM command"
    obj[missing] = ""
    assert refused(RegisterVM.parse, j(obj)) == "malformed RegisterVM command"
    obj[missing] = None
    assert refused(RegisterVM.parse, j(obj)) == "malformed RegisterVM command"


def test_register_vm_empty_payload_is_malformed():
    assert refused(RegisterVM.parse, b"") == "malformed RegisterVM command"


def test_attach_vm():
    assert AttachVM.parse(j({"containerId": "c", "numIOStreams": 1})) == AttachVM("c", 1)
    assert AttachVM.parse(j({"containerId": "c"})) == AttachVM("c", 0)


@pytest.mark.parametrize("count", [-1, 100_000])
def test_num_io_streams_bounds(count):
    assert "numIOStreams" in refused(AttachVM.parse, j({"containerId": "c", "numIOStreams": count}))


@pytest.mark.parametrize("value", ["1", 1.5, True, [1]])
def test_num_io_streams_must_be_integer(value):
    assert refused(AttachVM.parse, j({"containerId": "c", "numIOStreams": value})) == (
        "AttachVM: numIOStreams must be an integer")


def test_unregister_and_connect_shim():
    assert parse_unregister(j({"containerId": "pod"})) == "pod"
    assert parse_connect_shim(j({"token": "t0k"})) == "t0k"
    assert parse_connect_shim(b"") == ""


@pytest.mark.parametrize("payload", [b"{", b"\xff", b"[1]", b'"s"', b"null"])
def test_invalid_json_is_refused(payload):
    text = refused(decode_json, payload, "Hyper")
    assert text.startswith("Hyper: ")


def test_io_response_shape():
    assert json.loads(io_response("unix:///run/p.sock", ["a", "b"])) == {
        "io": {"URL": "unix:///run/p.sock", "tokens": ["a", "b"]}}
    raw = io_response("unix:///run/p.sock", [])
    assert json.loads(raw) == {"io": {"URL": "unix:///run/p.sock", "tokens": None}}
    assert b'"tokens":null' in raw


def test_encode_json_keeps_unicode_compact():
    assert encode_json({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()


# -- Hyper --------------------------------------------------------------------------------------------------

def test_hyper_parse():
    hyper = Hyper.parse(j({"hyperName": "startpod", "data": {"hostname": "h"}}))
    assert (hyper.name, hyper.tokens, hyper.data) == ("startpod", [], {"hostname": "h"})
    assert hyper.encoded_data() == b'{"hostname":"h"}'


def test_hyper_absent_data_sends_nothing_null_data_sends_null():
    assert Hyper.parse(j({"hyperName": "ping"})).encoded_data() == b""
    assert Hyper.parse(j({"hyperName": "ping", "data": None})).encoded_data() == b"null"


@pytest.mark.parametrize("tokens", ["tok", [1], [None], {"a": 1}])
def test_hyper_bad_tokens(tokens):
    assert refused(Hyper.parse, j({"hyperName": "execcmd", "tokens": tokens})) == (
        "Hyper: tokens must be a list of strings")


@pytest.mark.parametrize("name", ["newcontainer", "execcmd"])
def test_relocated_commands_take_zero_or_one_token(name):
    assert Hyper.parse(j({"hyperName": name})).check_tokens() is None
    assert Hyper.parse(j({"hyperName": name, "tokens": ["t"]})).check_tokens() == "t"
    hyper = Hyper.parse(j({"hyperName": name, "tokens": ["a", "b", "c"]}))
    assert refused(hyper.check_tokens) == "expected 0 or 1 token, got 3"


@pytest.mark.parametrize(("tokens", "text"), [(["a"], "1 token(s)"), (["a", "b"], "2 token(s)")])
def test_other_commands_take_no_tokens(tokens, text):
    hyper = Hyper.parse(j({"hyperName": "killcontainer", "tokens": tokens}))
    assert refused(hyper.check_tokens) == f"killcontainer doesn't need tokens but {text} were given"
    assert Hyper.parse(j({"hyperName": "killcontainer", "tokens": []})).check_tokens() is None


def new_container(process=None, **extra):
    data = {"id": "ctr", "rootfs": "rootfs", "image": "img", "process": process, **extra}
    return Hyper.parse(j({"hyperName": "newcontainer", "tokens": ["t"], "data": data}))


def test_relocate_sets_stdio_and_stderr_and_keeps_unknown_fields():
    process = {"terminal": False, "args": ["sh"], "envs": [{"env": "A", "value": "1"}], "futureField": {"x": 1}}
    payload, container_id = relocate(new_container(process, fsmap=[{"a": 1}], unknownTop=7), 5)
    data = json.loads(payload)
    assert container_id == "ctr"
    assert data == {"id": "ctr", "rootfs": "rootfs", "image": "img", "fsmap": [{"a": 1}], "unknownTop": 7,
                    "process": {**process, "stdio": 5, "stderr": 6}}


def test_relocate_terminal_has_no_stderr():
    payload, _ = relocate(new_container({"terminal": True, "args": ["sh"]}), 3)
    process = json.loads(payload)["process"]
    assert process["stdio"] == 3
    assert "stderr" not in process


def test_relocate_accepts_explicit_zero():
    payload, _ = relocate(new_container({"stdio": 0, "stderr": 0, "args": []}), 7)
    process = json.loads(payload)["process"]
    assert (process["stdio"], process["stderr"]) == (7, 8)


def test_relocate_does_not_mutate_the_request():
    hyper = new_container({"args": []})
    relocate(hyper, 3)
    assert hyper.data["process"] == {"args": []}


def test_relocate_execcmd_has_no_container_id():
    hyper = Hyper.parse(j({"hyperName": "execcmd", "data": {"container": "ctr", "process": {"args": ["ls"]}}}))
    payload, container_id = relocate(hyper, 1)
    assert container_id == ""
    assert json.loads(payload) == {"container": "ctr", "process": {"args": ["ls"], "stdio": 1, "stderr": 2}}


@pytest.mark.parametrize(("key", "label"), [("stdio", "Stdio"), ("stderr", "Stderr")])
def test_relocate_refuses_preset_sequence_numbers(key, label):
    assert refused(relocate, new_container({key: 4}), 3) == f"expected process.{label} to be 0, got 4"


@pytest.mark.parametrize("data", [{"id": "c"}, {"id": "c", "process": None}, {"process": "x"}, None, [1]])
def test_relocate_without_process_is_an_error_not_a_crash(data):
    hyper = Hyper.parse(j({"hyperName": "newcontainer", "data": data}))
    assert refused(relocate, hyper, 3) == "newcontainer: data.process must be a JSON object"


def test_relocate_with_absent_data():
    assert refused(relocate, Hyper.parse(j({"hyperName": "execcmd"})), 3) == (
        "execcmd: data.process must be a JSON object")


# -- Signal ------------------------------------------------------------------------------------------------

def test_signal_names_are_gos():
    assert len(SIGNAL_NAMES) == 31
    assert SIGNAL_NAMES[9] == "killed"
    assert SIGNAL_NAMES[15] == "terminated"
    assert SIGNAL_NAMES[28] == "window changed"


def test_signal_parse():
    assert Signal.parse(j({"signalNumber": 15})) == Signal(15, 0, 0)
    winch = Signal.parse(j({"signalNumber": 28, "columns": 80, "rows": 24}))
    assert (winch.columns, winch.rows, winch.is_winsize, winch.ends_process) == (80, 24, True, False)
    assert Signal.parse(j({"signalNumber": 9})).ends_process
    assert Signal.parse(j({"signalNumber": 15})).name == "terminated"
    assert Signal.parse(j({"signalNumber": 0})) == Signal(0, 0, 0)
    assert Signal.parse(j({"signalNumber": 30})).name == "power failure"


@pytest.mark.parametrize("number", [-1, 31, 64, 1000])
def test_invalid_signal_number(number):
    assert refused(Signal.parse, j({"signalNumber": number})) == f"invalid signal number {number}"


@pytest.mark.parametrize(("columns", "rows"), [(0, 0), (80, 0), (0, 24)])
def test_sigwinch_needs_a_size(columns, rows):
    text = refused(Signal.parse, j({"signalNumber": 28, "columns": columns, "rows": rows}))
    assert text == f"received SIGWINCH but terminal size is invalid ({columns},{rows})"


@pytest.mark.parametrize(
    ("number", "columns", "rows", "text"),
    [
        (15, 1, 2, "received a terminal size (1,2) for signal terminated"),
        (9, 0, 5, "received a terminal size (0,5) for signal killed"),
        (2, 3, 0, "received a terminal size (3,0) for signal interrupt"),
        (1, 80, 24, "received a terminal size (80,24) for signal hangup"),
    ],
)
def test_size_with_other_signal(number, columns, rows, text):
    assert refused(Signal.parse, j({"signalNumber": number, "columns": columns, "rows": rows})) == text


# -- log ---------------------------------------------------------------------------------------------------

def test_log_entry():
    entry = LogEntry.parse(j({"source": "shim", "containerId": "c", "level": "warn", "msg": "hi", "x": 1}))
    assert entry == LogEntry("shim", "warn", "hi", "c")
    assert LogEntry.parse(j({"source": "runtime", "level": "debug", "msg": "m"})).container_id == ""


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        ({"source": "agent", "level": "info", "msg": "m"}, "invalid source: agent"),
        ({"level": "info", "msg": "m"}, "invalid source: "),
        ({"source": "shim", "level": "warning", "msg": "m"}, "invalid level: warning"),
        ({"source": "shim", "msg": "m"}, "invalid level: "),
        ({"source": "shim", "level": "info", "msg": ""}, "no message specified"),
        ({"source": "shim", "level": "info"}, "no message specified"),
    ],
)
def test_log_entry_errors(obj, text):
    assert refused(LogEntry.parse, j(obj)) == text


# -- hostile input -----------------------------------------------------------------------------------------

PARSERS = [RegisterVM.parse, AttachVM.parse, Hyper.parse, Signal.parse, LogEntry.parse, parse_unregister,
           parse_connect_shim]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10,
)
KEYS = st.sampled_from(["containerId", "ctlSerial", "ioSerial", "console", "numIOStreams", "hyperName", "tokens",
                        "data", "signalNumber", "columns", "rows", "source", "level", "msg", "token"])


@given(st.binary(max_size=100))
def test_random_bytes_only_raise_proxy_error(payload):
    for parse in PARSERS:
        try:
            parse(payload)
        except ProxyError:
            pass


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(KEYS, JSON_VALUES, max_size=6))
def test_random_objects_only_raise_proxy_error(obj):
    payload = j(obj)
    for parse in PARSERS:
        try:
            parse(payload)
        except ProxyError:
            pass
    try:
        relocate(Hyper.parse(j({"hyperName": "execcmd", "data": obj})), 3)
    except ProxyError:
        pass


def test_deeply_nested_json_is_a_proxy_error():
    depth = 100_000
    with pytest.raises(ProxyError):
        Hyper.parse(b'{"hyperName":"ping","data":' + b"[" * depth + b"]" * depth + b"}")
