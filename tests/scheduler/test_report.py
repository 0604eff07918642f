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


def test_summary_text_shows_every_step_by_key_bucket_and_the_promised_tpots(tiny_program):
    lines = summary_text(tiny_program).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("phase"))
    keys = [int(k) for k in lines[start].split()[3:]]
    assert keys == tiny_program.data["key_buckets"]
    rows = [line.split() for line in lines[start + 1:-2]]
    shown = {(r[0], int(r[1]), int(r[2])) for r in rows}
    assert shown == {(x["phase"], x["batch"], x["tokens"]) for x in tiny_program.data["steps"]}
    assert all(len(r) == 3 + 2 * len(keys) or "-" in r for r in rows)  # "N unit" per key bucket, "-" if none
    assert lines[-2].startswith("promised TPOT, alone") and len(lines[-2].split()) == 3 + 2 * len(keys)
    assert lines[-1].startswith("promised TPOT, company") and len(lines[-1].split()) == 3 + 2 * len(keys)
    summary = summary_json(tiny_program)
    assert summary["steps"] == tiny_program.data["steps"] and len(summary["cadence"]) == len(keys)


