"""Bad inputs to ``shoal eval``: a bad line of a JSONL task names the file and the line, a bad
device or --outputs path is one line before any work, and --outputs is never half-written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from shoal.cli.main import cli
from shoal.errors import TaskError
from shoal.eval import get_task

GOOD = b'{"prompt": "one two", "target": "three"}\n'


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_one_line(code: int, stderr: str, *fragments: object) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("bad_line, message", [
    (b"{oops", "not valid JSON"),
    (b'{"target": "x"}', "field 'prompt' must be a string"),
    (b'{"prompt": "x"}', "field 'target' must be a string"),
    (b'{"prompt": "caf\xe9", "target": "x"}', "not UTF-8 text (byte 0xe9 at column 16)"),
    (b'{"prompt": "\xff\xfe", "target": "x"}', "not UTF-8 text"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"prompt": "a", "prompt": "b", "target": "x"}', "field 'prompt' appears twice"),
    (b'{"prompt": "a", "target": "x", "c": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "a", "target": "x", "colour": "red"}', "unknown field(s) colour"),
    (b'{"prompt": "a", "target": "x", "split": "nope"}', "unknown split 'nope'"),
])
def test_a_bad_jsonl_line_names_file_and_line(saved_tiny_model, tmp_path, bad_line, message):
    path = tmp_path / "task.jsonl"
    path.write_bytes(GOOD + b"\n" + bad_line + b"\n" + GOOD)  # the bad line is line 3 (line 2 is blank)
    code, _, stderr = run("eval", saved_tiny_model, "--task", f"jsonl:{path}", "--quiet")
    assert_one_line(code, stderr, f"{path}:3:", message)


def test_a_split_folder_names_the_file_and_line(saved_tiny_model, tmp_path):
    (tmp_path / "test.jsonl").write_bytes(GOOD * 2 + b'{"prompt": 3, "target": "x"}\n')
    code, _, stderr = run("eval", saved_tiny_model, "--task", f"jsonl:{tmp_path}", "--quiet")
    assert_one_line(code, stderr, f"{tmp_path / 'test.jsonl'}:3:", "'prompt'")


def test_a_byte_order_mark_and_unicode_separators_are_read_as_text(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + '{"prompt": "a\u2028b", "target": "c"}\r\n'.encode())
    examples = get_task(f"jsonl:{path}").examples("test")
    assert [e.prompt for e in examples] == ["one two", "a\u2028b"] and examples[1].target == "c"
    path.write_bytes(b"\xef\xbb\xbf" + b"\xef\xbb\xbf" + GOOD)  # only one mark, at the start, is a mark
    with pytest.raises(TaskError, match=r"task.jsonl:1: not valid JSON"):
        get_task(f"jsonl:{path}").examples("test")


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device tpu: not a device"), ("x:y:z", "not a device"), ("meta", "shoal runs on cpu"),
])
def test_an_unusable_device_is_one_line(saved_tiny_model, tmp_path, device, message):
    path = tmp_path / "task.jsonl"
    path.write_bytes(GOOD)
    code, _, stderr = run("eval", saved_tiny_model, "--task", f"jsonl:{path}", "--device", device, "--quiet")
    assert_one_line(code, stderr, message)


def test_outputs_paths_are_checked_before_the_evaluation(saved_tiny_model, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(GOOD)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for outputs, message in ((tmp_path, "is a folder"), (afile / "out.jsonl", "is a file, not a folder")):
        code, _, stderr = run("eval", saved_tiny_model, "--task", f"jsonl:{path}", "--outputs", outputs, "--quiet")
        assert_one_line(code, stderr, "--outputs", message)
    assert afile.read_text() == "keep"
    nested = tmp_path / "new" / "folder" / "out.jsonl"  # missing parents are made
    code, _, stderr = run("eval", saved_tiny_model, "--task", f"jsonl:{path}", "--outputs", nested, "--quiet")
    assert code == 0, stderr
    rows = [json.loads(line) for line in nested.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["one two"]
    assert [p.name for p in nested.parent.iterdir()] == ["out.jsonl"]  # no temporary file left
