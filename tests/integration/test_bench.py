"""Every bench runs end to end and keeps its JSON contract. Numbers are never asserted: speed is measured by
`aperture bench` and scripts/bench.sh, not tested."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_aperture

CONTRACT = {
    "boot": (["-n", "1"], {"boot_to_helper_s_p50", "boot_to_poweroff_s_p50", "debian_boot_to_helper_s_p50",
                           "bzimage_boot_to_helper_s_p50", "restore_to_ready_s_p50", "cold_to_ready_s_p50",
                           "restore_to_running_s_p50"},
             {"built_vs_debian_boot_to_helper", "pvh_vs_bzimage_boot_to_helper", "restore_vs_cold"}),
    "dax": ([], {"memcpy_ram_MBps", "memcpy_devdax_MBps", "memcpy_fsdax_MBps"}, {"devdax_vs_ram", "fsdax_vs_ram"}),
    "device": ([], {"map_rtt_us_p50", "map_rtt_us_p99", "dma_2m_MBps", "host_memcpy_2m_MBps"},
               {"map_rtt_vs_floor", "dma_2m_vs_memcpy"}),
    "driver": ([], {"migrate_64m_MBps", "fault_back_MBps", "peer_map_evict_us_p50", "peer_map_evict_us_p99",
                    "peer_map_hit_us_p50", "host_memcpy_4k_MBps", "map_floor_us"},
               {"migrate_vs_memcpy_4k", "fault_back_vs_memcpy_4k", "peer_map_evict_vs_map_floor"}),
    "soak": (["--duration", "5s"], {"descriptors_fuzzed", "remaps", "host_anon_rss_mib_first_quarter_p50",
                                    "host_anon_rss_mib_last_quarter_p50"}, {"host_anon_rss_last_vs_first_quarter"}),
    "remap": (["-n", "10"], {"remap_pause_ms_p50", "remap_pause_ms_p99", "stopcont_ms_p50", "remap_hotplug_ms_p50"},
              {"remap_pause_vs_stopcont"}),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_bench_prints_figures_and_same_run_ratios(name: str) -> None:
    args, figures, ratios = CONTRACT[name]
    proc = run_aperture("bench", name, *args, "--json", "-q", timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bench"] == name and result["accel"] in ("tcg", "kvm")
    assert figures <= set(result["figures"]) and ratios <= set(result["ratios"]) and result["ratios"]
    for key, value in {**result["figures"], **result["ratios"]}.items():
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (key, value)
    assert all(v > 0 for v in result["ratios"].values()), result["ratios"]
