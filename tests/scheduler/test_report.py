"""The summaries `lockstep compile` prints."""

from scheduler.report import summary_json, summary_text


def test_summary_json_fields(tiny_program):
    summary = summary_json(tiny_program)
    assert summary["plan_hash"] == tiny_program.plan_hash
    assert summary["devices_used"] == 1 and summary["num_devices"] == 1
    assert summary["predictions"] == tiny_program.data["predictions"]


def test_summary_text_elides_long_stage_lists(big_program):
    text = summary_text(big_program)
    stages = len(big_program.data["stages"])
    assert stages > 12
    assert f"({stages - 12} more stages)" in text
    assert "llama-2-70b" in text and "68.98B params" in text
    assert "lpu:576@ring" in text


def test_summary_text_lists_every_bucket(tiny_program):
    lines = summary_text(tiny_program).splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch"))
    rows = [line.split()[0] for line in lines[start + 1:]]
    assert rows == [str(b) for b in tiny_program.data["buckets"]]
