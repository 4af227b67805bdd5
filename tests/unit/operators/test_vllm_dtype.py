"""vLLM on a CPU runs in the dtype the CPU computes natively: bfloat16 only with AVX-512 BF16 / AMX (issue 24)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from airflow_provider_synth.engine.vllm import runner as vllm_runner
from airflow_provider_synth.engine.vllm.config import RunnerConfig
from airflow_provider_synth.engine.vllm.process import cpu_dtype
from airflow_provider_synth.engine.vllm.runner import engine_kwargs

REPO = Path(__file__).resolve().parents[3]
# the machine of issue 24: AVX2, no AVX-512 (an AMD EPYC; most laptops are like it)
EPYC = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2\n")
SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8\n"
ICELAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"  # AVX-512 without its BF16 extension
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha3 sve bf16 i8mm\n"


@pytest.mark.parametrize(("cpuinfo", "dtype"), [(EPYC, "float32"), (ICELAKE, "float32"),
                                                (SAPPHIRE_RAPIDS, "bfloat16"), (GRAVITON3, "bfloat16")],
                         ids=["avx2", "avx512-no-bf16", "amx", "aarch64-bf16"])
def test_bfloat16_only_where_the_cpu_has_it(cpuinfo: str, dtype: str) -> None:
    chosen, why = cpu_dtype(cpuinfo)
    assert chosen == dtype
    assert ("natively" in why) == (dtype == "bfloat16")
    assert "/proc/cpuinfo" in why


def test_this_machine_is_judged_by_its_own_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))
    assert cpu_dtype()[0] == ("bfloat16" if native else "float32")


def test_auto_on_a_cpu_node_becomes_the_native_dtype_and_says_why(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_runner, "cpu_dtype", lambda: cpu_dtype(EPYC))
    cfg = RunnerConfig(input="-", output="-", model="/m", llm_kwargs={"dtype": "auto", "enforce_eager": True})
    assert engine_kwargs(cfg, "/v1/chat/completions", on_cpu=True)["dtype"] == "float32"
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["synth_vllm"] == "dtype" and event["dtype"] == "float32"
    assert "no native bfloat16" in event["message"]
    # no dtype at all is vLLM's "auto" too
    assert engine_kwargs(RunnerConfig(input="-", output="-", model="/m"), "/v1/chat/completions",
                         on_cpu=True)["dtype"] == "float32"


def test_a_chosen_dtype_and_a_gpu_are_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    chosen = RunnerConfig(input="-", output="-", model="/m", llm_kwargs={"dtype": "bfloat16"})
    assert engine_kwargs(chosen, "/v1/chat/completions", on_cpu=True)["dtype"] == "bfloat16"
    gpu = RunnerConfig(input="-", output="-", model="/m", llm_kwargs={"dtype": "auto"})
    assert engine_kwargs(gpu, "/v1/chat/completions", on_cpu=False)["dtype"] == "auto"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(("cpuinfo", "dtype"), [(EPYC, "float32"), (SAPPHIRE_RAPIDS, "bfloat16")])
def test_the_quickstart_starts_vllm_in_the_native_dtype(cpuinfo: str, dtype: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_synth.engine.vllm import process as vllm_process

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    monkeypatch.delitem(sys.modules, "quickstart", raising=False)
    import quickstart

    monkeypatch.setattr(vllm_process, "cpu_dtype", lambda: cpu_dtype(cpuinfo))
    argv = quickstart.vllm_command(Path("/models/smollm2"), 8000)
    assert argv[argv.index("--dtype") + 1] == dtype
