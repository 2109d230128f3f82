"""Smoke test of ``python -m loctex.kernels.bench --device cpu --quick`` (tiny shapes)."""
import csv

from loctex.kernels import bench


def test_bench_quick_cpu_writes_csv_markdown_and_plot(tmp_path, capsys):
    bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    csv_files = list(tmp_path.glob("cpu-*_quick.csv"))
    assert len(csv_files) == 1
    stem = csv_files[0].with_suffix("")
    assert stem.with_suffix(".md").read_text().count("| contrastive_loss |") >= 1
    assert stem.with_suffix(".png").stat().st_size > 1000
    with open(csv_files[0]) as f:
        rows = list(csv.DictReader(f))
    assert {"kernel", "provider", "shape", "metric", "value", "device", "torch", "triton", "date"} <= set(rows[0])
    got = {(r["kernel"], r["provider"], r["metric"]): r for r in rows}
    for kernel in ("render_traces", "trace_attention_loss", "contrastive_loss"):
        ref = got[(kernel, "reference", "full_ms")]
        assert float(ref["value"]) > 0
        assert float(got[(kernel, "reference", "peak_mem_mb")]["value"]) > 0
        # on CPU the Triton provider is skipped with a note, not an error
        assert got[(kernel, "triton", "skipped")]["note"]
    assert float(got[("contrastive_loss", "reference", "bwd_ms")]["value"]) > 0
