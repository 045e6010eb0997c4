import json

import pytest

from effllm.analyze.hardware import (
    HARDWARE,
    HARDWARE_FILE_ENV,
    Hardware,
    get_hardware,
    hardware_file,
    list_hardware,
    measure_hardware,
    save_hardware,
)
from effllm.core.errors import ConfigError


@pytest.fixture
def hw_file(tmp_path, monkeypatch):
    path = tmp_path / "hardware.json"
    monkeypatch.setenv(HARDWARE_FILE_ENV, str(path))
    return path


def test_table_holds_the_issue_machines_with_their_datasheet_bandwidths():
    expected = {
        "h100-sxm": 3.35e12,
        "h200": 4.8e12,
        "a100-40g": 1.555e12,
        "a100-80g": 2.039e12,
        "l40s": 864e9,
        "rtx4090": 1008e9,
        "a6000": 768e9,
        "m2-ultra": 800e9,
    }
    assert {name: hw.bandwidth for name, hw in HARDWARE.items()} == expected


def test_hardware_names_are_forgiving():
    assert get_hardware("A100-80G") is HARDWARE["a100-80g"]
    assert get_hardware("H100 SXM") is HARDWARE["h100-sxm"]
    assert get_hardware("Apple M2 Ultra") is HARDWARE["m2-ultra"]
    with pytest.raises(ConfigError, match="unknown hardware"):
        get_hardware("tpu-v9")


def test_measuring_this_machine_gives_positive_figures_and_is_saved_for_reuse(hw_file):
    measured = measure_hardware("cpu", copy_mib=1, matmul_n=32, repeats=1)
    assert measured.name == "local"
    assert measured.bandwidth > 0 and set(measured.peak_flops) == {"fp32", "bf16"}
    copy, read = measured.measured["copy_bandwidth"], measured.measured["read_bandwidth"]
    assert copy > 0 and read > 0 and measured.bandwidth == max(copy, read)  # the roofline takes the faster
    assert measured.memory_bytes > 0
    assert hardware_file() == hw_file
    save_hardware(measured)
    assert get_hardware("local") == measured
    assert "local" in list_hardware()
    assert json.loads(hw_file.read_text())["hardware"]["local"]["bandwidth"] == measured.bandwidth


def test_local_is_a_clear_error_until_measured(hw_file):
    with pytest.raises(ConfigError, match="effllm analyze hardware"):
        get_hardware("local")


def test_hardware_can_come_from_a_json_file(tmp_path, hw_file):
    entry = Hardware("lab-box", 100e9, {"fp32": 1e12, "bf16": 2e12}, 64e9)
    path = save_hardware(entry, tmp_path / "lab.json")
    assert get_hardware(str(path)) == entry
    assert not hw_file.exists()  # only the named file was written


def test_malformed_entries_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        Hardware("x", 0, {"fp32": 1.0})
    with pytest.raises(ConfigError):
        Hardware("x", 1.0, {"fp64": 1.0})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hardware": {"x": {"bandwidth": 1}}}))
    with pytest.raises(ConfigError, match="peak_flops"):
        get_hardware(str(bad))
