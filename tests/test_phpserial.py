"""C_FIELDS must be what PHP's own unserialize() reads back: checked with the real php-cli."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from labsync.phpserial import serialize_strings
from tests.conftest import add_order, add_user
from tests.helpers import RESULTS, events, run_pass

PHP = shutil.which("php")
REQUIRE_PHP = os.environ.get("LABSYNC_REQUIRE_PHP") == "1"
# PHP prints the array back as JSON: exact strings, UTF-8, nothing lost in var_export quoting.
UNSERIALIZE = (
    "$v = unserialize(stream_get_contents(STDIN)); "
    "if ($v === false) { fwrite(STDERR, 'unserialize failed'); exit(3); } "
    "echo json_encode($v, JSON_UNESCAPED_UNICODE);"
)


@pytest.fixture
def php() -> str:
    if PHP is None:
        if REQUIRE_PHP:
            pytest.fail("php-cli is required (LABSYNC_REQUIRE_PHP=1) but not installed")
        pytest.skip("php-cli not installed")
    return PHP


def php_unserialize(php: str, data: str) -> object:
    import json

    done = subprocess.run([php, "-r", UNSERIALIZE], input=data.encode("utf-8"),
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def test_serialize_matches_php_format_byte_lengths():
    assert serialize_strings({"NAME": "Анна"}) == 'a:1:{s:4:"NAME";s:8:"Анна";}'


def test_serialize_refuses_non_strings():
    with pytest.raises(TypeError):
        serialize_strings({"ID": 5})  # type: ignore[dict-item]


@pytest.mark.php
@pytest.mark.parametrize("fields", [
    {"EMAIL": "anna@example.org", "NAME": "Анна", "ORDER_ID": "QL-1",
     "RESULT_URL": "/personal/lab-results/1/"},
    {"NAME": 'quote " semicolon ; brace } colon : s:3:"x";', "EMPTY": ""},
    {"EMOJI": "результат 🧪 готов", "NEWLINE": "a\nb\r\nc", "TAB": "\t", "NUL_FREE": "ё"},
    {"LONG": "Ж" * 5000},
])
def test_php_unserialize_reads_back_exactly_what_was_serialized(php, fields):
    assert php_unserialize(php, serialize_strings(fields)) == fields


@pytest.mark.php
def test_php_reads_the_mail_event_a_pass_queued(php, db, fake_lis, config):
    add_user(db, 7, email="anna@example.org", name="Анна")
    local_id = add_order(db, "QL-77", 7)
    fake_lis.add_order("QL-77", results=RESULTS)
    run_pass(config)

    fields = php_unserialize(php, events(db)[0].C_FIELDS)

    assert isinstance(fields, dict)
    assert fields["EMAIL"] == "anna@example.org" and fields["NAME"] == "Анна"
    assert fields["ORDER_ID"] == "QL-77"
    assert fields["RESULT_URL"] == f"/personal/lab-results/{local_id}/"
    assert all(isinstance(v, str) for v in fields.values())
