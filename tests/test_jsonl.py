"""The one JSONL reader of the application (synstrip_vit.writers.scan_jsonl)
and its views: the strict ``read_jsonl``, metrics repair and the report."""

import json

import pytest

from experiments import tables
from synstrip_vit import integrity, writers

GOOD = [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 0.5}]


def _write(path, lines):
  path.write_bytes(b"".join(line + b"\n" for line in lines))
  return path


def _good_lines():
  return [json.dumps(r).encode() for r in GOOD]


@pytest.mark.parametrize("bad", [b'{"epoch": 2, "lo', b"\xff\xfe", b"[1, 2]",
                                 b'{"epoch": "2"}', b'{"loss": 1.0}'])
def test_scan_counts_each_kind_of_damaged_line(tmp_path, bad):
  path = _write(tmp_path / "m.jsonl", [_good_lines()[0], bad, b"",
                                       _good_lines()[1]])
  assert writers.scan_jsonl(path) == writers.JsonlRecords(GOOD, [2], 4)


def test_missing_file_reads_empty(tmp_path):
  assert writers.scan_jsonl(tmp_path / "none") == ([], [], 0)
  assert writers.read_jsonl(tmp_path / "none") == []


def test_read_jsonl_ignores_a_damaged_last_line_only(tmp_path):
  path = _write(tmp_path / "m.jsonl", _good_lines() + [b'{"epoch": 2, "lo'])
  assert writers.read_jsonl(path) == GOOD
  path = _write(tmp_path / "m.jsonl", [b'{"epo'] + _good_lines())
  with pytest.raises(ValueError, match=r"m\.jsonl:1: malformed"):
    writers.read_jsonl(path)


def test_metrics_repair_drops_damaged_lines(tmp_path):
  path = _write(tmp_path / "m.jsonl", [_good_lines()[0], b"garbage",
                                       _good_lines()[1]])
  kept, warning = integrity.reconcile_metrics(path, epoch=2,
                                              checkpointed=None)
  assert kept == GOOD
  assert "dropped 1 unreadable line" in warning
  assert writers.scan_jsonl(path) == (GOOD, [], 2)


def test_report_keeps_the_last_record_of_an_epoch(tmp_path):
  later = {"epoch": 0, "loss": 9.0}
  path = _write(tmp_path / "m.jsonl", _good_lines()[::-1] + [
      b"garbage", json.dumps(later).encode()])
  assert tables.read_records(path) == [later, GOOD[1]]
