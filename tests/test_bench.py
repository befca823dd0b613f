"""`glmrt bench` and the GPU-machine report tooling, on the CPU provider: what they report is
consistent with itself (medians, rates, the bandwidth ceiling) and with the model's manifest."""
import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from glmrt.benchmark import bench, format_report
from glmrt.cli import main

REPO = Path(__file__).resolve().parents[1]


def check_report(r, manifest_bytes):
    for n, p in r["prefill"].items():
        assert p["ms"] > 0 and p["tok_s"] == pytest.approx(int(n) / (p["ms"] / 1e3))
    assert r["ttft_ms"] == r["prefill"][min(r["prefill"])]["ms"]
    c = r["ceiling"]
    assert c["bytes_per_token"] == manifest_bytes
    assert c["ms"] == pytest.approx(1e3 * manifest_bytes / (c["tbps"] * 1e12))
    for d in r["decode"].values():
        assert d["tok_s"] == pytest.approx(1e3 / d["ms"])
        assert d["pct_of_ceiling"] == pytest.approx(100 * c["ms"] / d["ms"])


def test_bench_on_the_cpu_form(exported):
    folder = exported("tiny")
    r = bench(folder, device="cpu", prompt_lengths=(8, 16), contexts=(8, 32), decode_steps=4, repeats=2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert r["form"] == "concat" and r["greedy"] == "host argmax" and not r["cuda_graph"]
    assert set(r["prefill"]) == {8, 16} and set(r["decode"]) == {8, 32}
    assert "decode_host_logits" not in r
    check_report(r, manifest["streamed_bytes_per_token"])
    assert "greedy: host argmax" in format_report(r)


def test_bench_on_the_cuda_form_times_bursts_and_both_greedy_paths(exported, tmp_path):
    folder = exported("quant", "int4", target="cuda")
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(folder), "--device", "cpu", "--prompt-lengths", "8",
                                    "--contexts", "8,16", "--decode-steps", "4", "--repeats", "1",
                                    "--burst", "2", "--json", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "greedy: device argmax" in res.output and "logits copied to the host" in res.output
    assert "one sync per token" in res.output and "(bursts of 2 above)" in res.output
    r = json.loads(out.read_text())
    assert r["form"] == "gqa" and r["greedy"] == "device argmax" and r["burst"] == 2
    assert r["decode_sync_per_token"]["context"] == 8 and r["decode_sync_per_token"]["ms"] > 0
    assert r["decode_host_logits"]["context"] == 8 and r["decode_host_logits"]["ms"] > 0
    r["prefill"] = {int(k): v for k, v in r["prefill"].items()}
    check_report(r, json.loads((folder / "manifest.json").read_text())["streamed_bytes_per_token"])


def load_bench_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_report_from_an_ncu_csv(tmp_path, capsys):
    """Two steps of three kernels: per-kernel, per-class and per-matrix rows add up."""
    kernels = load_bench_script("kernels")
    rows = ['"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"']
    launches = [("MatMulFloat4BitsKernelM1", "(576, 1, 1)", 8000, 10_600_000),
                ("SkipLayerNormKernelSmall", "(1, 1, 1)", 3000, 16_000),
                ("MatMulFloat4BitsKernelM1", "(3424, 1, 1)", 25000, 63_100_000)] * 2
    for i, (name, grid, ns, read) in enumerate(launches):
        rows.append(f'"{i}","{name}","{grid}","gpu__time_duration.sum","ns","{ns:,}"')
        rows.append(f'"{i}","{name}","{grid}","dram__bytes_read.sum","byte","{read:,}"')
    csv = tmp_path / "k.csv"
    csv.write_text("==PROF== a log line ncu writes\n" + "\n".join(rows) + "\n")
    kernels.report(type("A", (), {"csv": csv, "steps": 2, "layers": 1, "title": "t",
                                  "json": str(tmp_path / "k.json")})())
    text = capsys.readouterr().out
    assert "GPU-busy time per step 36.0 µs" in text
    assert "| int4 GEMV (MatMulNBits) | 2 | 33.0 |" in text              # per class, per step
    assert "| `MatMulFloat4BitsKernelM1` | (576, 1, 1) | 1 | 8.00 | 10.6 | 1.32 TB/s |" in text
    assert "| `MatMulFloat4BitsKernelM1` | (3424, 1, 1) | 1 | 25.00 | 63.1 | 2.52 TB/s |" in text
    saved = json.loads((tmp_path / "k.json").read_text())
    assert saved["busy_us_per_step"] == pytest.approx(36.0)


def test_engine_kernel_report_from_an_ncu_csv(tmp_path, capsys, monkeypatch):
    """cuda_engine_check.py ncu-report: the last `steps` decode steps of a 1-layer engine (6
    launches each); a prefill launch before them and other programs' kernels are left out."""
    check = load_bench_script("cuda_engine_check")
    monkeypatch.setattr(check, "OUT", tmp_path)
    rows = ['"ID","Kernel Name","Grid Size","Metric Name","Metric Unit","Metric Value"']
    step = [("qkv_first", 8000, 10_000_000), ("attention", 6000, 100_000), ("o_proj", 5000, 9_000_000),
            ("gate_up", 20000, 60_000_000), ("down", 10000, 30_000_000), ("lm_head", 300000, 1_200_000_000)]
    launches = [("gate_up", 99999, 1)] + [("MatMulFloat4BitsKernelM1", 7, 7)] + step * 2
    for i, (name, ns, read) in enumerate(launches):
        rows.append(f'"{i}","{name}","(264, 1, 1)","gpu__time_duration.sum","ns","{ns:,}"')
        rows.append(f'"{i}","{name}","(264, 1, 1)","dram__bytes_read.sum","byte","{read:,}"')
    csv = tmp_path / "e.csv"
    csv.write_text("==PROF== a log line ncu writes\n" + "\n".join(rows) + "\n")
    check.part_ncu_report(type("A", (), {"model": str(csv), "layers": 1, "steps": 2, "tag": "t"})())
    text = capsys.readouterr().out
    assert "| gate_up | 1 | 20.00 | 5.7% | 60.00 MB | 3.00 |" in text
    assert "| lm_head | 1 | 300.00 | 86.0% | 1200.00 MB | 4.00 |" in text
    assert "kernels' time per step: 349.0 us" in text
    saved = json.loads((tmp_path / "engine-ncu-t.json").read_text())
    assert [k["kernel"] for k in saved["kernels"]] == ["qkv_first", "attention", "o_proj", "gate_up", "down", "lm_head"]


def test_engine_stall_report_from_an_ncu_source_page(tmp_path, capsys, monkeypatch):
    """cuda_engine_check.py ncu-stalls: the stall reasons' shares over a kernel's SASS (ncu's
    source page as CSV, after ncu's own log lines) and its instructions with the most samples,
    each with its main reason; rows of another width are left out."""
    check = load_bench_script("cuda_engine_check")
    monkeypatch.setattr(check, "OUT", tmp_path)
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_barrier",
            "stall_long_sb", "stall_barrier (Not Issued)"]
    rows = [["0x10", "  LDG.E R2, [R4]", "30", "128", "0", "30", "0"],
            ["0x20", "  BAR.SYNC 0x0", "10", "256", "10", "0", "10"],
            ["0x30", "  FFMA R1, R2, R3, R1", "0", "512", "0", "0", "0"],
            ["0x40", "a short row"]]
    text = "==PROF== profiling\n" + "\n".join(",".join(f'"{c}"' for c in r) for r in [head] + rows) + "\n"
    csv = tmp_path / "s.csv"
    csv.write_text(text)
    check.part_ncu_stalls(type("A", (), {"model": str(csv), "top": 2, "tag": "t"})())
    out = capsys.readouterr().out
    assert "3 SASS instructions, 40 stall samples, 896 warp instructions executed" in out
    assert "long_sb           75.0% of the samples" in out and "barrier           25.0% of the samples" in out
    listed = [ln for ln in out.splitlines() if ln.startswith("       ")]
    assert len(listed) == 2 and "LDG.E" in listed[0] and "long_sb" in listed[0] and "BAR.SYNC" in listed[1]
    saved = json.loads((tmp_path / "engine-ncu-stalls-t.json").read_text())
    assert saved["reasons"] == {"barrier": 0.25, "long_sb": 0.75}
    with pytest.raises(SystemExit, match="no source page"):
        (tmp_path / "x.csv").write_text("nothing\n")
        check.part_ncu_stalls(type("A", (), {"model": str(tmp_path / "x.csv"), "top": 2, "tag": ""})())


def test_bench_picks_the_device_present_and_checks_its_lengths(exported, monkeypatch):
    """Without --device, bench runs where it can (the CPU here); lengths the model cannot hold
    are one clear line naming the value; the defaults are cut to what the model holds; the
    CPU ceiling is this host's measured copy rate, said as such."""
    import onnxruntime as ort

    from glmrt.benchmark import best_device, plan
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert best_device() == "cpu"
    folder = exported("tiny")                                    # 2048 positions
    runner = CliRunner()
    for args, needle in ((["--prompt-lengths", "8,x"], "--prompt-lengths '8,x'"),
                         (["--prompt-lengths", "0"], "positive token counts"),
                         (["--contexts", "9000"], "--contexts 9000"),
                         (["--prompt-lengths", "4096"], "the model holds 2048")):
        r = runner.invoke(main, ["bench", str(folder), *args])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert plan(2048, None, None, 64, 8) == ([128, 512, 2048], [128])
    r = bench(folder, prompt_lengths=[8], contexts=[8], decode_steps=4, repeats=1)
    assert r["device"] == "cpu" and r["threads"] >= 1
    assert r["ceiling"]["source"].startswith("this host's memory copy rate, measured with")
    assert 0.001 < r["ceiling"]["tbps"] < 10
    assert "GB/s (this host's memory copy rate" in format_report(r)


def test_bench_slots_reports_batched_decode_and_the_second_turn(exported, tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["bench", str(exported("tiny")), "--device", "cpu", "--slots", "1,2",
                                  "--decode-steps", "4", "--repeats", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "slots   2:" in r.output and "with the first turn cached" in r.output
    d = json.loads(out.read_text())
    for n, v in d["slots"].items():
        assert v["tok_s_total"] == pytest.approx(int(n) * v["tok_s_per_sequence"])
        assert v["tok_s_per_sequence"] == pytest.approx(1e3 / v["ms_per_step"])
    assert d["slots"]["1"]["vs_one"] == 1.0 and d["prefill_chunk"]["tokens"] == 128
    t = d["second_turn_ttft_ms"]
    assert t["with_reuse"] > 0 and t["without"] > 0
    r = CliRunner().invoke(main, ["bench", str(exported("tiny")), "--slots", "0"])
    assert r.exit_code == 2 and "positive slot counts" in r.output
