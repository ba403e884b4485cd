"""The request body the operator sends: JSON that reads the same as YAML (server-side apply).

PyYAML stands in here for the API server's YAML reader (both refuse raw C1 controls and read
NEL and U+2028 as line breaks); test_k8s_lifecycle.py sends the same text to the real one.
"""

from __future__ import annotations

import json

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qmodel_operator.kube import encode_body

# Any text JSON carries and the API server holds (UTF-8: no lone surrogates).
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(TEXT, TEXT | st.lists(TEXT, max_size=3), max_size=4))
def test_any_text_reads_back_the_same_as_json_and_as_yaml(body):
    data = encode_body(body)
    assert json.loads(data) == body
    assert yaml.safe_load(data.decode()) == body


def test_the_characters_yaml_refuses_are_escaped_and_the_rest_kept():
    body = {"a": "\U0001f600 \x85\x9f\x7f\u2028\ufeff é\t"}
    text = encode_body(body).decode()
    assert "\U0001f600" in text and "é" in text  # raw UTF-8, not surrogate-pair escapes
    for escaped in ("\\u0085", "\\u009f", "\\u007f", "\\u2028", "\\ufeff", "\\t"):
        assert escaped in text
    assert yaml.safe_load(text) == body
