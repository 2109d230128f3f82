"""Smoke test of ``python -m loctex.kernels.bench --device cpu --quick`` (tiny shapes), of its
roofline columns, of ``--roofline`` (the paper's shapes, no timing) and ``--contrastive-large``."""
import csv

import pytest

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
    # the CPU contrastive path is the blocked one; it has no C++ op
    assert float(got[("contrastive_loss", "blocked", "full_ms")]["value"]) > 0
    assert "no C++ contrastive op" in got[("contrastive_loss", "cpp", "skipped")]["note"]
    # roofline beside each case: fused (provider triton) and reference bounds and their ratio
    for kernel in ("render_traces", "trace_attention_loss", "contrastive_loss"):
        fused = float(got[(kernel, "triton", "bound_ms")]["value"])
        ref = float(got[(kernel, "reference", "bound_ms")]["value"])
        assert fused > 0 and ref > 0
        assert float(got[(kernel, "triton", "bound_ratio")]["value"]) == pytest.approx(ref / fused)
        assert float(got[(kernel, "reference", "bytes")]["value"]) > float(got[(kernel, "triton", "bytes")]["value"])
        assert (kernel, "reference", "fraction_of_bound") not in got   # CPU times are not H100 times
    md = stem.with_suffix(".md").read_text()
    assert "## Roofline (H100 SXM, on paper)" in md and "3.35 TB/s" in md and "[not measured]" in md


def test_paper_roofline_checks_the_fused_loss_target(tmp_path, capsys):
    bench.main(["--roofline", "--out", str(tmp_path)])
    md = next(tmp_path.glob("roofline_h100-sxm_*.md")).read_text()
    for shape in ("B=256,L=96,grid=7x7", "B=256,L=96,grid=14x14", "N=1048576,D=512"):
        assert shape in md
    out = capsys.readouterr().out
    assert out.count("[met] issue 14 (paper)") == 2


def test_contrastive_large_runs_each_case_in_a_subprocess(tmp_path, monkeypatch):
    # a reference that "needs" more than the machine has is not run, and says how much it needs
    monkeypatch.setattr(bench, "_mem_available_mb", lambda: 0.0)
    result = bench.contrastive_large(str(tmp_path), ns=(96,), dim=16, log=lambda *_: None)
    rows = {(r["provider"], r["metric"]): r for r in result["rows"]}
    assert float(rows[("blocked", "full_ms")]["value"]) > 0
    assert float(rows[("blocked", "peak_rss_mb")]["value"]) >= 0
    assert rows[("reference", "skipped")]["note"].startswith("not run: needs ~")
