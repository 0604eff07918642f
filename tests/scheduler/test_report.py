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
    end = lines.index("", start)
    rows = [line.split()[0] for line in lines[start + 1:end]]
    assert rows == [str(b) for b in tiny_program.data["buckets"]]


def test_summary_text_shows_every_step_with_mixed_steps_and_their_targets(tiny_program):
    lines = summary_text(tiny_program).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("phase"))
    steps = [line.split() for line in lines[start + 1:]]
    assert [(s[0], int(s[1]), int(s[2])) for s in steps] == [
        (x["phase"], x["batch"], x["new_tokens"]) for x in tiny_program.data["schedules"]]
    assert all(len(s) == 7 for s in steps if s[0] == "mixed")  # step and target, each "N unit"
    assert summary_json(tiny_program)["steps"][-1]["phase"] == "mixed"
