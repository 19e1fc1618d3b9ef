"""benchmarks/container.py without a Docker engine: its table and its RESULTS.md section."""

from __future__ import annotations

from benchmarks.container import BEGIN, END, section_markdown, update_results_md

DATA = {
    "command": "python -m benchmarks.container",
    "date": "2026-12-02",
    "machine": {"cpu": "AMD EPYC", "cpu_cores_logical": 2, "ram_mb": 24000},
    "load_before": [0.4, 0.5, 0.5],
    "load_after": [1.2, 0.8, 0.6],
    "repeat": 3,
    "docker_version": "20.10.24",
    "sizes": {
        "image_mb": 1317.0,
        "base_mb": 982.0,
        "upload_mb": 350.2,
        "upload_s": 41.0,
        "compressor": "pigz",
    },
    "builds": {"image_no_cache_s": 61.0, "image_cached_s": 3.2, "image_code_change_s": 9.8},
    "cases": {
        "FLARE24_small": {
            "local": {"time_s": 5.7, "overhead_s": 1.4, "max_container_mb": None},
            "docker": {"time_s": 6.9, "overhead_s": 2.5, "max_container_mb": 610.4},
        }
    },
}


def test_container_section_states_machine_load_and_every_figure():
    text = section_markdown(DATA)
    assert "AMD EPYC, 2 cores" in text and "a quiet machine" in text
    assert "| unpacked (`docker image inspect`) | 1317 MB |" in text
    assert "| 350 MB (written in 41 s) |" in text
    assert "| image, everything cached | 3 s |" in text
    assert "| FLARE24_small | 5.7 | 6.9 | +1.2 | 1.4 / 2.5 | 610 |" in text
    busy = section_markdown({**DATA, "load_after": [3.0, 2.0, 1.0]})
    assert "the machine was busy" in busy
    busy_before = section_markdown({**DATA, "load_before": [1.6, 1.0, 1.0]})
    assert "the machine was busy" in busy_before
    # the benchmark's own runs raise the load after it: up to one per core is quiet
    own_load = section_markdown({**DATA, "load_after": [1.9, 1.0, 1.0]})
    assert "a quiet machine" in own_load


def test_container_section_goes_before_the_notes_and_is_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## CPU run\nx\n\n## Reading these figures\nnotes\n")
    update_results_md(path, "## Container\nfirst\n")
    text = path.read_text()
    assert text.index(BEGIN) < text.index("## Reading these figures")
    assert text.index("## CPU run") < text.index(BEGIN)
    update_results_md(path, "## Container\nsecond\n")
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "second" in text and "first" not in text and text.endswith("notes\n")
