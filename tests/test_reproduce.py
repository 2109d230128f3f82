"""``loctex reproduce``: the statistics on hand-made numbers, the study configs and the plan they make,
the reuse of finished work, the fair head-only training, the report from hand-made unit results,
and (slow) the whole study end to end at a tiny budget."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loctex.reproduce import stats
from loctex.reproduce.plan import BACKBONES, CAPTIONED, Unit, plan, run_units, write_json_atomic
from loctex.reproduce.study import config_file, flat_overrides, load_study

# ---- statistics ----------------------------------------------------------------------------------


def test_mean_and_sample_sd():
    assert stats.mean([1.0, 2.0, 6.0]) == pytest.approx(3.0)
    # deviations -2, -1, 3: squares 14, / (n - 1) = 7
    assert stats.sd([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0))
    assert math.isnan(stats.sd([4.0]))  # ddof=1 needs two values
    assert stats.summary([0.5, 0.7]) == {"mean": pytest.approx(0.6), "sd": pytest.approx(0.1 * math.sqrt(2)),
                                         "n": 2, "values": [0.5, 0.7]}


@pytest.mark.parametrize("df, q", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)])
def test_t_quantiles_match_the_tables(df, q):
    assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=1e-4)


def test_paired_interval_on_hand_made_numbers():
    a = [0.50, 0.62, 0.58]
    b = [0.40, 0.50, 0.50]  # differences 0.10, 0.12, 0.08: mean 0.10, sd 0.02
    iv = stats.paired_interval(a, b)
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert iv["diff"] == pytest.approx(0.10)
    assert iv["sd"] == pytest.approx(0.02)
    assert (iv["lo"], iv["hi"]) == (pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    assert iv["per_seed"] == pytest.approx([0.10, 0.12, 0.08])
    assert stats.verdict(iv["lo"], iv["hi"]) == "supported"
    # pairing matters: the same numbers unpaired would overlap
    assert stats.verdict(*_lo_hi(stats.paired_interval(b, a))) == "contradicted"


def _lo_hi(iv):
    return iv["lo"], iv["hi"]


def test_two_seeds_use_one_degree_of_freedom():
    iv = stats.paired_interval([0.3, 0.5], [0.2, 0.2])  # differences 0.1, 0.3
    half = 12.706205 * stats.sd([0.1, 0.3]) / math.sqrt(2)
    assert (iv["lo"], iv["hi"]) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert stats.verdict(iv["lo"], iv["hi"]) == "inconclusive"


def test_verdicts():
    assert stats.verdict(0.01, 0.2) == "supported"
    assert stats.verdict(-0.3, -0.01) == "contradicted"
    assert stats.verdict(-0.1, 0.2) == "inconclusive"
    assert stats.verdict(math.nan, math.nan) == "inconclusive"   # one seed
    assert stats.verdict(-0.3, -0.01, higher_is_better=False) == "supported"  # e.g. KL
    with pytest.raises(ValueError):
        stats.paired_interval([1.0, 2.0], [1.0])


def test_crossing_interpolates_in_log_fraction():
    xs = [0.25, 0.5, 1.0]
    assert stats.crossing(xs, [0.2, 0.4, 0.6], 0.3) == ("=", pytest.approx(math.sqrt(0.25 * 0.5)))
    assert stats.crossing(xs, [0.2, 0.4, 0.6], 0.6) == ("=", pytest.approx(1.0))
    assert stats.crossing(xs, [0.5, 0.6, 0.7], 0.45) == ("<=", 0.25)
    assert stats.crossing(xs, [0.2, 0.4, 0.6], 0.65) == (">", 1.0)
    # a dip after the first crossing does not move it
    assert stats.crossing(xs, [0.2, 0.5, 0.4], 0.5) == ("=", pytest.approx(0.5))


# ---- study configs and the plan --------------------------------------------------------------------


def test_quick_plan_schedules_two_seeds_of_every_comparison():
    study = load_study(config_file("reproduce_quick.yaml"))
    units = plan(study)
    assert study.seeds == 2 and study.pretrain.data_fractions == (0.25, 0.5, 1.0)
    assert study.transfer.label_fractions == (0.1, 0.25, 0.5, 1.0)
    pre = {(u.backbone, u.seed, u.data) for u in units if u.kind == "pretrain"}
    assert pre == {("supervised", s, 1.0) for s in (0, 1)} | {
        (b, s, d) for b in CAPTIONED for s in (0, 1) for d in (0.25, 0.5, 1.0)}
    assert {(u.backbone, u.seed) for u in units if u.kind == "head"} == {("contrastive", 0),
                                                                          ("contrastive", 1)}
    transfer = {(u.backbone, u.seed, u.data, u.labels) for u in units if u.kind == "transfer"}
    assert transfer == {(b, s, 1.0, f) for b in BACKBONES for s in (0, 1)
                        for f in (0.1, 0.25, 0.5, 1.0)} | {
        (b, s, d, 1.0) for b in CAPTIONED for s in (0, 1) for d in (0.25, 0.5)}
    assert {(u.backbone, u.seed) for u in units if u.kind == "linear"} == {
        (b, s) for b in BACKBONES for s in (0, 1)}
    assert {(u.backbone, u.seed) for u in units if u.kind == "localization"} == {
        (b, s) for b in CAPTIONED for s in (0, 1)}
    assert len({u.result_path("OUT") for u in units}) == len(units) == 68
    # every measurement comes after what it measures; the head after its pre-training
    order = {u: i for i, u in enumerate(units)}
    for u in units:
        if u.kind != "pretrain" and u.backbone != "random":
            assert order[u.pretraining()] < order[u], u
        if u.kind == "localization" and u.backbone == "contrastive":
            assert order[Unit("head", "contrastive", u.seed)] < order[u]


@pytest.mark.parametrize("name, seeds", [("reproduce_full.yaml", 3), ("reproduce_cuda.yaml", 3)])
def test_full_studies_have_at_least_three_seeds(name, seeds):
    study = load_study(config_file(name))
    assert study.seeds >= seeds and 1.0 in study.pretrain.data_fractions
    assert len(plan(study)) == 34 * study.seeds


def test_study_overrides_and_unknown_keys():
    path = config_file("reproduce_quick.yaml")
    study = load_study(path, ["pretrain.steps=7", "pretrain.engine.train.micro_batch_size=8",
                              "transfer.label_fractions=[0.5,1.0]"])
    assert study.pretrain.steps == 7 and study.transfer.label_fractions == (0.5, 1.0)
    assert "train.micro_batch_size=8" in flat_overrides(study.pretrain.engine)
    assert "optim.warmup_steps=10" in flat_overrides(study.pretrain.engine)  # the file's, kept
    with pytest.raises(ValueError, match="pretrain.stepz"):
        load_study(path, ["pretrain.stepz=7"])
    with pytest.raises(ValueError, match="pretrain_label_fraction"):
        load_study(path, ["transfer.pretrain_label_fraction=0.3"])


# ---- reuse of finished work --------------------------------------------------------------------------


def test_finished_units_are_not_run_again(tmp_path):
    units = [Unit("linear", "random", 0), Unit("linear", "loctex", 0), Unit("linear", "loctex", 1)]
    write_json_atomic(units[1].result_path(tmp_path), {"score": 0.5})
    ran = []

    def execute(unit):
        ran.append(unit)
        return {"score": 0.1 * len(ran)}

    assert run_units(units, tmp_path, execute) == 1
    assert ran == [units[0], units[2]]
    assert json.loads(units[1].result_path(tmp_path).read_text()) == {"score": 0.5}
    assert json.loads(units[2].result_path(tmp_path).read_text()) == {"score": pytest.approx(0.2)}
    assert run_units(units, tmp_path, execute) == 3 and len(ran) == 2  # all done: nothing runs
    assert not list(tmp_path.rglob("*.tmp*"))


def test_a_failed_unit_leaves_no_result(tmp_path):
    unit = Unit("transfer", "random", 0, 1.0, 0.5)

    def fail(_):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        run_units([unit], tmp_path, fail)
    assert not unit.result_path(tmp_path).exists()


def test_another_study_cannot_reuse_an_output_directory(tmp_path):
    import dataclasses

    from loctex.reproduce import check_same_study
    study = load_study(config_file("reproduce_quick.yaml"))
    check_same_study(tmp_path, study)
    check_same_study(tmp_path, dataclasses.replace(study, seeds=3))  # more seeds: reusable
    with pytest.raises(SystemExit, match="image_size"):
        check_same_study(tmp_path, dataclasses.replace(study, image_size=64))


# ---- the fair localization step: only the head trains ------------------------------------------------


def test_head_training_changes_only_the_attention_head():
    from _model_batches import VOCAB, make_batch

    from loctex.config import load_config
    from loctex.models import build_model
    from loctex.reproduce.head import train_attention_head

    cfg = load_config(config_file("embedded_contrastive.yaml"), [
        "model.embed_dim=32", "model.attention_dim=16", "model.text.width=32", "model.text.heads=2",
        "model.text.layers=1", "optim.warmup_steps=0", "optim.lr=0.01"])
    torch.manual_seed(0)
    model = build_model(cfg, len(VOCAB))
    model.train_config = cfg
    assert not any(p.requires_grad for p in model.attention.parameters())  # frozen by pre-training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(4, 64, g) for _ in range(3)]
    losses = train_attention_head(model, batches, steps=3)
    after = model.state_dict()
    head = {k for k in after if k.startswith("attention.")}
    assert head and all(not torch.equal(before[k], after[k]) for k in head)
    for k in after:  # backbone, text tower, contrastive head, BatchNorm statistics
        if k not in head:
            assert torch.equal(before[k], after[k]), k
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


# ---- the supervised baseline -------------------------------------------------------------------------


def test_supervised_baseline_starts_where_the_engine_starts():
    """Same seed, same config: the supervised ResNet's initialization is the engine model's visual
    tower's (LocTexModel builds it first after the engine seeds torch)."""
    from loctex.config import load_config
    from loctex.models import build_model
    from loctex.models.resnet import build_resnet

    cfg = load_config(config_file("embedded.yaml"), ["seed=3"])
    torch.manual_seed(cfg.seed)
    visual = build_model(cfg, 50).visual.state_dict()
    torch.manual_seed(cfg.seed)
    alone = build_resnet(cfg.model.visual, zero_init_residual=cfg.model.zero_init_residual).state_dict()
    assert all(torch.equal(visual[k], alone[k]) for k in alone)


def test_supervised_baseline_learns_the_categories_of_its_batches(tmp_path):
    from loctex.config import load_config
    from loctex.eval.backbone import load_backbone
    from loctex.eval.coco_sets import read_coco
    from loctex.reproduce.data import prepare
    from loctex.reproduce.supervised import narrative_labels, train_supervised

    data = prepare(tmp_path, None, images=12, val_fraction=0.25)
    instances = data.instances("train")
    labels, classes = narrative_labels(data.prepared("train"), instances)
    # by hand: the categories of the first narrative's image
    from loctex.data.packed import PackedNarratives
    packed = PackedNarratives(data.prepared("train"))
    coco = read_coco(instances)
    image_id = int(packed.image_id(packed.image_index(0)))
    names = {coco.loadCats(a["category_id"])[0]["name"]
             for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))}
    assert {c for c, y in zip(classes, labels[0].tolist()) if y == 1.0} == names
    assert labels.shape == (len(packed), len(classes))

    cfg = load_config(config_file("embedded.yaml"), [
        f"data.prepared={data.prepared('train')}", "data.image_size=64", "data.num_workers=0",
        "train.micro_batch_size=4", "train.max_steps=3", "optim.warmup_steps=0"])
    result = train_supervised(cfg, instances, tmp_path / "backbone.pth")
    assert result["steps"] == 3 and math.isfinite(result["loss_last"])
    trained = load_backbone(str(tmp_path / "backbone.pth"), "resnet18").state_dict()
    torch.manual_seed(cfg.seed)
    init = load_backbone("random", "resnet18").state_dict()
    assert not torch.equal(trained["conv1.weight"], init["conv1.weight"])


# ---- the report from hand-made unit results -----------------------------------------------------------


def _fake_results(out, study, score):
    for u in plan(study):
        if u.kind == "linear":
            write_json_atomic(u.result_path(out), {"score": score(u)})
        elif u.kind == "transfer":
            write_json_atomic(u.result_path(out), {"score": score(u)})
        elif u.kind == "localization":
            write_json_atomic(u.result_path(out), {
                "pointing_acc": score(u), "box_pointing_acc": score(u), "mean_kl": 1 - score(u),
                "i2t_r1": 0.1, "t2i_r1": 0.1})


def test_report_reads_claims_from_paired_seeds(tmp_path):
    import dataclasses

    from loctex.reproduce.report import build, write
    study = dataclasses.replace(load_study(config_file("reproduce_quick.yaml")), seeds=3)
    base = {"random": 0.10, "supervised": 0.40, "contrastive": 0.30, "loctex": 0.35}
    seed_noise = [0.00, 0.05, -0.04]  # shared by all backbones of a seed: pairing removes it

    def score(u):
        s = base[u.backbone] + seed_noise[u.seed] + 0.1 * (u.labels or 1.0) + 0.2 * u.data
        # LocTex and contrastive swap places on the linear probe for one seed: inconclusive there
        if u.kind == "linear" and u.backbone == "loctex" and u.seed == 1:
            s -= 0.2
        return s

    _fake_results(tmp_path, study, score)
    report = build(tmp_path, study, {"command": "loctex reproduce", "date": "today", "wall_s": 60.0,
                                     "host": "here", "arch": "resnet18", "micro_batch_size": 32})
    claims = {c["key"]: c for c in report["claims"]}
    assert claims["transfer"]["diff"] == pytest.approx(0.05)
    assert claims["transfer"]["verdict"] == "supported"
    assert claims["pretraining_data"]["verdict"] == "supported"
    assert claims["vs_supervised"]["diff"] == pytest.approx(-0.05)
    assert claims["vs_supervised"]["verdict"] == "contradicted"
    assert claims["linear_probe"]["verdict"] == "inconclusive"
    assert claims["localization"]["verdict"] == "supported"
    cell = report["cells"]["transfer"]["loctex"]["100"]
    assert cell["mean"] == pytest.approx(0.35 + 0.3 + 0.01 / 3) and cell["n"] == 3
    assert cell["sd"] == pytest.approx(stats.sd(seed_noise))
    # LocTex's curve (100% labels) is 0.45 + 0.2 d (+ the mean noise): it reaches contrastive-only's
    # 100% score (0.60) at d = 0.75, interpolated between 0.5 and 1.0 in log d: sqrt(0.5)
    eff = report["efficiency"]
    assert eff["pretrain_data_loctex_to_reach_contrastive"] == {
        "relation": "=", "fraction": pytest.approx(math.sqrt(0.5)), "target": pytest.approx(0.6 + 0.01 / 3)}
    assert eff["pretrain_data_contrastive_to_reach_loctex"]["relation"] == ">"
    write(tmp_path, report)
    md = (tmp_path / "results.md").read_text()
    assert "**supported**" in md and "**contradicted**" in md and "What this budget covers" in md
    assert "65.3 ± 4.5" in md  # LocTex, 100% labels
    assert (tmp_path / "results.png").stat().st_size > 5000
    assert json.loads((tmp_path / "results.json").read_text())["claims"][0]["key"] == "transfer"


# ---- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reproduce_quick_runs_end_to_end(tmp_path):
    """The whole study at a tiny budget: synth -> tokenizer -> prepare -> 14 pre-trainings (12
    through the engine) -> head training -> every measure -> results.json/md/png; a re-run reuses
    everything."""
    import yaml

    from loctex.cli import main

    out = tmp_path / "repro"
    argv = ["reproduce", "--quick", "--out", str(out), "--workers", "0", "--set", "images=50",
            "image_size=64", "pretrain.steps=2", "pretrain.checkpoint_every=2", "transfer.steps=2",
            "transfer.batch_size=4", "pretrain.engine.train.micro_batch_size=8",
            "pretrain.engine.data.num_workers=0", "pretrain.engine.optim.warmup_steps=1"]
    assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["study"]["seeds"] == 2 and report["reused_units"] == 0
    for b in BACKBONES:
        for f in ("010", "025", "050", "100"):
            cell = report["cells"]["transfer"][b][f]
            assert cell["n"] == 2 and 0.0 <= cell["mean"] <= 1.0
        assert 0.0 <= report["cells"]["linear_probe"][b]["mean"] <= 1.0
    loc = json.loads(Unit("localization", "loctex", 0).result_path(out).read_text())
    assert loc["target_tokens"] > 0 and loc["grounded_tokens"] > 0
    assert {c["verdict"] for c in report["claims"]} <= {"supported", "contradicted", "inconclusive"}
    assert (out / "results.png").stat().st_size > 5000 and (out / "results.md").is_file()
    # every engine run of a seed had the same config but the localization weight and its data
    cfgs = [yaml.safe_load((out / "runs" / f"{b}-d100-s1" / "config.yaml").read_text())
            for b in CAPTIONED]
    assert cfgs[0]["loss"]["localization_weight"] == 0 and cfgs[1]["loss"]["localization_weight"] > 0
    for c in cfgs:
        c["loss"].pop("localization_weight"), c.pop("run_dir")
    assert cfgs[0] == cfgs[1] and cfgs[0]["seed"] == 1
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["reused_units"] == 68
