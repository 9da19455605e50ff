"""experiments.machine: the instruction set XLA compiles for, and the processor's name."""

import pytest

from experiments import machine

ZEN3 = {"fpu", "sse4_2", "avx", "avx2", "fma"}
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}


@pytest.mark.parametrize(("flags", "xla_flags", "expected"), [
    (ZEN3, "", "AVX2"),
    (SAPPHIRE_RAPIDS, "", "AMX"),
    (SAPPHIRE_RAPIDS, "--xla_cpu_max_isa=AVX2", "AVX2"),
    (SAPPHIRE_RAPIDS, "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=avx",
     "AVX"),  # any case, among other flags
    (SAPPHIRE_RAPIDS, "--xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=SSE4_2", "SSE4_2"),  # the last
    (ZEN3, "--xla_cpu_max_isa=AVX512", "AVX2"),  # a cap never adds what the processor lacks
    (ZEN3, "--xla_cpu_max_isa=BOGUS", "AVX2"),  # XLA warns and ignores an unknown name
    ({"sse4_2", "avx512f"}, "", "SSE4_2"),  # no AVX: the sets are cumulative
    ({"asimd", "fp"}, "", "none"),  # not x86
])
def test_isa_is_the_newest_the_processor_has_capped_by_xla_flags(flags, xla_flags, expected):
    assert machine.isa(flags=flags, xla_flags=xla_flags) == expected


def test_isa_reads_the_environment(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX")
    assert machine.isa() == "AVX"
    monkeypatch.delenv("XLA_FLAGS")
    assert machine.isa() == "AMX"


def test_cpu_id_names_family_model_and_stepping(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {
        "model name": "AMD EPYC", "cpu family": "25", "model": "1", "stepping": "1"})
    assert machine.cpu_id() == "AMD EPYC family 25 model 1 stepping 1"
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": "Some CPU"})
    assert machine.cpu_id() == "Some CPU"


def test_describe_names_the_instruction_set_and_versions():
    import jax
    import jaxlib

    line = machine.describe()
    assert f", XLA for {machine.isa()}, " in line
    assert f"jax {jax.__version__}, jaxlib {jaxlib.__version__} ({jax.default_backend()})" in line
