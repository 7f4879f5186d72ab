"""The hostile battery (harness/hostile.py), reduced for CI: the sections that run quickly, on the session's
server. Every pack node's base graph runs; relations, shapes (empty batches, 3-D and 5-D latents, sets
of another size, channel count or family), damaged set files, damaged memory files and Redis URLs, and
/interrupt during long runs of every method are answered by name, with the queue idle afterwards and
nothing left behind. The widget literals are walked by test_validation_server.py; the whole battery,
with strace watching network and writes, is `python -m harness.hostile` (see its docstring)."""

from harness.hostile import Battery

SECTIONS = ["base", "relations", "shapes", "damaged", "memory", "interrupts"]


def test_the_reduced_hostile_battery(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    battery = Battery(server, log=lambda text: None)
    battery.setup()
    battery.run_all(outside, SECTIONS)
    failures = battery.failures()
    assert not failures, "\n".join(result.line() for result in failures)
    sections = {result.section for result in battery.results}
    assert sections >= {"base", "relations", "shapes", "files", "memory", "interrupts"}
    assert len(battery.results) > 100
