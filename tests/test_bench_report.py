"""`make bench`'s runner writes one table and one JSON per machine in the agreed schema (toy sizes)."""

import json

from experiments.bench import run_all


def test_runner_writes_the_results_schema(tmp_path):
    md = run_all.main(["--out", str(tmp_path), "--only", "tokenizer", "--toy", "--repeats", "1"])
    report = json.loads(md.with_suffix(".json").read_text())
    assert report["machine"] == md.stem and report["cpu_cores"] >= 1 and report["torch_threads"] >= 1
    assert {"jax", "torch", "python"} <= set(report["versions"])
    rows = report["results"]
    assert [r["name"] for r in rows] == ["tokenizer, with_repeats", "tokenizer, distinct"]
    for r in rows:
        assert {"name", "unit", "ours", "reference", "ratio", "target"} <= set(r)
        assert r["ours"] > 0 and r["reference"] > 0 and r["target"] == 10.0
        assert abs(r["ratio"] - r["ours"] / r["reference"]) < 1e-9
    table = md.read_text()
    assert "| tokenizer, distinct | captions/s |" in table and "CLIP tokenizer" in table
    # On a CPU the run measures the machine's attainable peak first; rows without FLOPs get no ceiling.
    peak = report["measured_peak"]
    assert peak["peak_flops_per_s"] == max(peak["kernels"].values()) > 0
    assert set(peak["kernels"]) == {"jax matmul", "torch matmul", "jax conv3x3", "torch conv3x3"}
    assert "Ceiling:" in table and all("ceiling" not in r for r in rows)


def test_roofline_ceiling_is_the_ratio_at_the_measured_peak():
    import jax
    import jax.numpy as jnp

    from experiments.bench import harness

    m, k, n = 64, 96, 80
    flops = harness.xla_flops(jax.jit(jnp.matmul), jnp.ones((m, k)), jnp.ones((k, n)))
    assert flops == 2 * m * k * n  # XLA counts a multiply-add as two FLOPs, as the peak kernels do
    settings = harness.Settings(accelerator=False, peak_flops_per_s=1e11)
    row = harness.Result("model", "images/s", ours=20.0, reference=16.0, target=1.3)
    harness.add_roofline(row, flops_per_call=8 * 5e9, items_per_call=8, settings=settings)
    # 5 GFLOP per image at 100 GFLOP/s is 20 images/s: ours runs at the peak, the ceiling is 20 / 16.
    assert row.detail["flops_per_item"] == 5e9 and abs(row.detail["ours_peak_fraction"] - 1.0) < 1e-12
    assert abs(row.detail["ceiling"] - 1.25) < 1e-12 and row.met is False
    without_peak = harness.Result("model", "images/s", ours=20.0, reference=16.0, target=1.3)
    assert harness.add_roofline(without_peak, 4e10, 8, harness.Settings(accelerator=False)).detail == {}
    info = {"backend": "cpu", "device_kind": "cpu", "devices": 1, "cpu": "x", "cpu_cores": 2, "torch_threads": 2,
            "load_average_15min": 0.0, "versions": {"python": "3", "jax": "0", "torch": "0"},
            "measured_peak": {"peak_flops_per_s": 1e11, "kernels": {"jax matmul": 1e11}, "shapes": "s"}}
    table = harness.to_markdown(info, [harness.Section("S", "setup", [row])], 1.0)
    assert "| model | images/s | 20.00 | 16.00 | **1.25x** | >= 1.3x | **no** | 1.25x |" in table
    assert "- model: 5 GFLOP per image, ours 100 GFLOP/s = 100% of the measured peak" in table


def test_sides_take_turns_in_blocks_so_short_calls_do_not_start_in_the_others_wake():
    from experiments.bench import harness

    calls = []
    side = lambda name: lambda: calls.append(name) or 1.0  # noqa: E731
    result = harness.compare("toy", "items/s", 1, side("o"), side("r"), check=None, target=None, repeats=20)
    assert calls[:2] == ["o", "r"]  # the warm-up call of each side
    assert "".join(calls[2:]) == "oorr" * 10  # 20 timed calls a side, in blocks of 20 // 10
    assert result.ours > 0 and result.reference > 0
    calls.clear()
    harness.compare("toy", "items/s", 1, side("o"), side("r"), check=None, target=None, repeats=7, block=3)
    assert "".join(calls[2:]) == "ooorrrooorrror"  # the last block is what is left


def test_accelerator_mode_reports_mfu_and_bandwidth_and_no_cpu_targets_against_a_host_reference(monkeypatch):
    """`make bench` on a GPU/TPU (toy sizes, run here on the CPU as if it were one, with a known peak):
    the training step runs without the CPU-only reference and gets an MFU row, cached decoding gets a
    bandwidth row, and rows whose PyTorch reference runs on the host carry no CPU target."""
    from experiments.bench import clip_train_bench, dalle_sample_bench, dvae_bench, harness, peaks

    flops_peak, bandwidth = 2e12, 5e11
    monkeypatch.setattr(peaks, "peak", lambda kind: (flops_peak, bandwidth))
    settings = harness.Settings(accelerator=True, repeats=1, toy=True)
    assert settings.cpu_target(1.3) is None and harness.Settings(accelerator=False).cpu_target(1.3) == 1.3

    train = clip_train_bench.run(settings)
    rows = {r.name: r for r in train.results}
    step, mfu = rows["CLIP train step"], rows["CLIP train step MFU"]
    assert step.reference is None and step.target is None and step.met is None and "bfloat16" in train.setup
    achieved = step.detail["achieved_flops_per_s"]
    assert achieved > 0 and abs(mfu.ours - 100 * achieved / flops_peak) < 1e-9 * mfu.ours
    assert mfu.target == clip_train_bench.TARGET_MFU and mfu.met == (mfu.ours >= mfu.target)

    sampling = dalle_sample_bench.run(settings)
    cached, decode = sampling.results
    assert cached.reference > 0 and cached.target is None  # 16 image tokens: the 10x target is for 1,024
    assert decode.name == "KV-cache decode, 16 tokens" and decode.target == dalle_sample_bench.TARGET_BANDWIDTH
    assert abs(decode.ours - 100 * cached.detail["decode_bytes_per_s"] / bandwidth) < 1e-9 * decode.ours

    dvae = dvae_bench.run(settings)
    assert all(r.reference > 0 and r.target is None and r.met is None for r in dvae.results)

    info = {**harness.machine_info(), "backend": "gpu", "measured_peak": None}
    table = harness.to_markdown(info, [train, sampling, dvae], 1.0)
    assert "| CLIP train step MFU | % of bf16 peak |" in table and "| KV-cache decode, 16 tokens |" in table
    assert "run on the host CPU" in table and "dVAE encode | images/s" in table
