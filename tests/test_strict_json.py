import json
import subprocess
import sys

import pytest

from crypto import strict_json
from crypto.errors import RemoteError
from crypto.messages import MalformedCallMessage, decode_message

NOT_FINITE = [
    "1e400",
    "-1E999",
    "15" + "0" * 308 + ".0",  # 1.5e308 * 10, spelled out in full
    "1.5e+309",
    "NaN",
    "Infinity",
    "-Infinity",
]


@pytest.mark.parametrize("number", NOT_FINITE)
@pytest.mark.parametrize("template", ["{}", "[{}]", '{{"a":{{"b":[1,{}]}}}}'])
def test_non_finite_numbers_are_refused_however_spelled_and_wherever(number, template):
    text = template.format(number)
    assert json.loads(text) is not None  # Python's own json reads it (as an infinity or NaN)
    with pytest.raises(strict_json.StrictJsonError):
        strict_json.loads(text)


@pytest.mark.parametrize(
    "text",
    ['{"a":1,"a":2}', '[{"b":{"a":1,"a":1}}]', '{"x":{"y":{"z":[{"k":0,"k":0}]}}}'],
)
def test_duplicate_names_are_refused_at_any_depth(text):
    with pytest.raises(strict_json.StrictJsonError, match="duplicate name"):
        strict_json.loads(text)


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_a_depth_bomb_is_refused_before_the_parser_recurses(opener):
    closer = "]" if opener == "[" else "}"
    bomb = opener * 100_000 + "0" + closer * 100_000
    with pytest.raises(strict_json.StrictJsonError, match="nested deeper"):
        strict_json.loads(bomb)


def test_depth_up_to_the_limit_is_accepted_and_brackets_in_strings_do_not_count():
    limit = strict_json.MAX_DEPTH
    assert strict_json.loads("[" * limit + "]" * limit) is not None
    with pytest.raises(strict_json.StrictJsonError):
        strict_json.loads("[" * (limit + 1) + "]" * (limit + 1))
    text = json.dumps({"sdp": "[[[[{{{{" * 100, "escaped": '\\"[[[['})
    assert strict_json.loads(text) == json.loads(text)


# Unterminated strings full of escaped quotes: the depth check used to retry a string at every
# quote, 7.8 s for the 64 KiB one and four times that for twice the size.
UNTERMINATED = ['"' + '\\"' * 64_000, '["' + "\\\\" * 64_000, '{"a":"' + '\\"[' * 40_000]


@pytest.mark.parametrize("index", range(len(UNTERMINATED)))
def test_the_depth_check_is_linear_on_unterminated_strings(index):
    # Outcome, not a stopwatch: the refusal comes back at all within a bound that a
    # quadratic scan misses by an order of magnitude (a linear one needs milliseconds).
    script = (
        "from crypto import strict_json\n"
        "from tests.test_strict_json import UNTERMINATED\n"
        f"text = UNTERMINATED[{index}]\n"
        "strict_json.check_depth(text)\n"
        "try:\n"
        "    strict_json.loads(text)\n"
        "except strict_json.StrictJsonError:\n"
        "    print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=True
    )
    assert done.stdout == "refused\n"


def test_escapes_decide_where_strings_end():
    # An escaped backslash ends the escape, so the quote after it closes the string.
    assert strict_json.loads('["\\\\", [1]]') == ["\\", [1]]
    deep = '["\\\\",' + "[" * strict_json.MAX_DEPTH + "]" * strict_json.MAX_DEPTH + "]"
    with pytest.raises(strict_json.StrictJsonError, match="nested deeper"):
        strict_json.loads(deep)
    assert strict_json.loads('["\\"[[[["]') == ['"[[[[']


@pytest.mark.parametrize(
    "text",
    [
        "1.7976931348623157e308",
        "-1e-400",
        "1" + "0" * 400,
        '{"a":[1,2.5,"\\u00e9",null,true],"b":{"a":{}}}',
    ],
)
def test_every_finite_json_value_is_kept(text):
    assert strict_json.loads(text) == json.loads(text)
    assert strict_json.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("text", [b"\xff", "[1,]", "01", "", "{} {}", '"\u0000"'])
def test_what_is_not_json_is_the_same_typed_error(text):
    with pytest.raises(strict_json.StrictJsonError) as refused:
        strict_json.loads(text)
    assert isinstance(refused.value, RemoteError)


def test_dumps_is_canonical_and_refuses_what_is_not_json():
    assert strict_json.dumps({"b": [1, "é"], "a": None}) == b'{"a":null,"b":[1,"\\u00e9"]}'
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            strict_json.dumps([value])


@pytest.mark.parametrize("number", NOT_FINITE)
def test_decode_message_uses_the_strict_decoder(number):
    with pytest.raises(MalformedCallMessage, match="strict JSON"):
        decode_message(f'{{"kind":"app","content":{{"n":{number}}}}}')
