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
