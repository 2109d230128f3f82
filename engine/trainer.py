"""The training loop: DeepSpeed engine, data per rank, checkpoints, signals, logging, validation.

One optimizer step = ``train.gradient_accumulation_steps`` micro-batches per rank; DeepSpeed
accumulates and steps at the boundary. Everything that must agree across ranks (stopping on a
signal, saving) is decided collectively, so a signal that reaches one rank first cannot hang the
others.

Preemption: SIGTERM / SIGINT set a flag; the step in flight finishes, every rank learns of it at the
next step boundary (one all-reduce of a flag per step), a checkpoint is saved and the process exits 0.
A second signal while saving is ignored (the save is what the first one asked for).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from loctex.config import Config, save_config
from loctex.kernels.distributed import shutdown_process_group

from . import checkpoint as ckpt
from . import ds_config
from .metrics import MetricsLogger
from .optim import build_optimizer, build_scheduler
from .validate import attention_grid, validate

log = logging.getLogger("loctex.engine")


def _skip_deepspeed_shm_op() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op at
    start-up (minutes on a cold 2-core machine) that only its inference path uses; training
    collectives go through torch.distributed (gloo). Mark the op unavailable so nothing is built."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class StopFlag:
    """Set by SIGTERM / SIGINT; the loop polls it at step boundaries."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _dist():
    import torch.distributed as dist
    return dist


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item() > 0)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Data:
    """The data layer (``loctex.data``) as the loop uses it: this rank's infinite training stream
    from a micro-batch position on, the validation loader, the tokenizer."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        from loctex.data.loader import build_loader
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._build_loader = build_loader
        self._val = None
        from loctex.data.tokenizer import load_tokenizer
        path = cfg.model.tokenizer or self._tokenizer_path(cfg.data.prepared)
        self.tokenizer = load_tokenizer(path)

    @staticmethod
    def _tokenizer_path(prepared: str) -> str:
        from loctex.data.packed import PackedNarratives
        try:
            return str(PackedNarratives(prepared).tokenizer_path)
        except (OSError, ValueError):
            return os.path.join(prepared, "tokenizer.json")  # e.g. a shard directory

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def pad_token_id(self) -> int:
        from loctex.data.tokenizer import PAD_ID
        return PAD_ID

    def decode(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(int(token_id)) or f"#{token_id}"

    def train_loader(self, start_step: int):
        """Infinite, sharded, shuffled per epoch from the seed; ``start_step`` = micro-batches this
        rank already consumed (the loader's global step)."""
        return self._build_loader(self.cfg, rank=self.rank, world_size=self.world_size, train=True,
                                  start_step=start_step)

    def val_loader(self):
        if not self.cfg.data.val_prepared:
            return None
        if self._val is None:  # one pass per iteration; kept so its workers are reused
            self._val = self._build_loader(self.cfg, self.cfg.data.val_prepared, train=False,
                                           rank=self.rank, world_size=self.world_size)
        return self._val

    def val_batches(self):
        """This rank's full validation batches (the same count on every rank) and the image index
        of each of its items (for retrieval, where another narrative of the same image is a hit;
        None when the data set does not say)."""
        loader = self.val_loader()
        if loader is None:
            return None, None
        B = self.cfg.train.micro_batch_size
        full = loader.sampler.n // (B * self.world_size)
        if full == 0:
            raise ValueError(f"{self.cfg.data.val_prepared}: {loader.sampler.n} narratives cannot "
                             f"fill one validation batch of {B} x {self.world_size} ranks")
        image_ids = None
        packed = getattr(loader.dataset, "packed", None)
        if packed is not None and hasattr(packed, "image_index"):
            items = [i for batch in itertools.islice(iter(loader.sampler), full) for i, _ in batch]
            image_ids = torch.tensor([packed.image_index(i) for i in items], dtype=torch.long)
        return itertools.islice(iter(loader), full), image_ids


class Trainer:
    def __init__(self, cfg: Config, deepspeed_config: str | None = None):
        import deepspeed
        self.cfg = cfg
        dist = _dist()
        self.on_cuda = torch.cuda.is_available()
        if not self.on_cuda:
            _skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if self.on_cuda else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.on_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")

        ds = (ds_config.load(deepspeed_config, cfg, self.world_size, self.on_cuda) if deepspeed_config
              else ds_config.generate(cfg, self.world_size, self.on_cuda))
        ds_config.sync_config(cfg, ds, self.world_size)
        self.ds = ds

        self.data = Data(cfg, self.rank, self.world_size)
        self.train_loader = None  # set when training starts; read for its skipped-image count
        torch.manual_seed(cfg.seed)  # identical initialization on every rank
        from loctex.models import build_model
        self.model_args = {"vocab_size": self.data.vocab_size, "pad_token_id": self.data.pad_token_id}
        model = build_model(cfg, **self.model_args)
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if scalars:  # DeepSpeed broadcasts/partitions through p.data.view(torch.uint8)
            raise ValueError(f"0-dim parameters {scalars} cannot go through DeepSpeed: "
                             "give them shape [1]")
        kwargs = {}
        if "optimizer" not in ds:  # a passed-through JSON may bring its own optimizer/scheduler
            optimizer = build_optimizer(model, cfg, self.on_cuda)
            kwargs["optimizer"] = optimizer
            if "scheduler" not in ds:
                kwargs["lr_scheduler"] = build_scheduler(optimizer, cfg)
        else:
            from .optim import param_groups
            kwargs["model_parameters"] = param_groups(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, config=ds, **kwargs)
        # dropout etc. differ per rank; data order comes from the loader's own seeding
        torch.manual_seed(cfg.seed * 1000 + self.rank + 1)

        self.state = ckpt.TrainState()
        target = ckpt.resume_target(cfg)
        if target is not None:
            self.state = ckpt.load(self.engine, target, self.rank, self.world_size, cfg)
            self._info(f"resumed from {target} at step {self.state.step} (epoch {self.state.epoch}, "
                       f"batch {self.state.data_position})")
        elif cfg.train.resume == "auto":
            self._info("no checkpoint to resume from: starting from scratch")

        self.global_batch = self.world_size * cfg.train.micro_batch_size
        self.images_per_step = self.global_batch * cfg.train.gradient_accumulation_steps
        if self.rank == 0:
            run = Path(cfg.run_dir)
            save_config(cfg, run / "config.yaml")
            (run / "ds_config.json").write_text(json.dumps(ds, indent=1) + "\n")
        self.logger = MetricsLogger(cfg.run_dir, self.rank, cfg.train.max_steps, self.state.step,
                                    self.global_batch, self.images_per_step)
        self.stop = StopFlag()

    def _info(self, text: str) -> None:
        if self.rank == 0:
            print(f"[loctex] {text}", flush=True)

    # ---- data ----------------------------------------------------------------------------------
    def _micro_batches(self):
        """This rank's micro-batches from the checkpointed position on (the loader is infinite and
        deterministic in (seed, position)); keeps ``state.data_position`` / ``state.epoch`` current."""
        loader = self.data.train_loader(self.state.data_position)
        self.train_loader = loader
        per_epoch = loader.steps_per_epoch
        # the loader may draw worker seeds from the global RNG; keep those draws out of the model's
        # RNG stream so that a resumed run draws what an uninterrupted one does
        with torch.random.fork_rng(devices=[]):
            it = iter(loader)
        for batch in it:
            self.state.data_position += 1
            self.state.epoch = self.state.data_position // per_epoch
            yield batch

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        engine = self.engine
        self.stop.install()
        engine.train()
        batches = self._micro_batches()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, con, loc, count
        self._info(f"training: world {self.world_size}, micro-batch {t.micro_batch_size}, "
                   f"accumulation {t.gradient_accumulation_steps}, global batch {self.global_batch}, "
                   f"zero {cfg.zero.stage}, {cfg.precision}, steps {self.state.step}->{t.max_steps}")
        step_start = time.perf_counter()
        self.step_times: list[float] = []
        stopped = 0
        while self.state.step < t.max_steps:
            lrs = self._lrs()  # the lr this step uses (the scheduler moves it at the step)
            for _ in range(t.gradient_accumulation_steps):
                batch = _to_device(next(batches), self.device)
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
                sums += torch.stack([out["loss"].detach().double(), out["loss_contrastive"].detach().double(),
                                     out["loss_localization"].detach().double(),
                                     torch.ones((), dtype=torch.float64, device=self.device)])
            self.state.step += 1
            self.state.samples_seen += self.images_per_step
            now = time.perf_counter()
            self.step_times.append(now - step_start)
            step_start = now
            step = self.state.step
            self.logger.step_done(step)

            if step % t.log_every == 0 or step == t.max_steps:
                self._log(step, sums, lrs)
                sums.zero_()
            if _any_rank(self.stop.signum != 0, self.device):
                stopped = self.stop.signum or signal.SIGTERM
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                name = signal.Signals(stopped).name
                self._info(f"{name}: saving step {step} and exiting")
                self._save()
                print(f"[loctex] rank {self.rank}: checkpoint of step {step} saved; exit 0 after "
                      f"{name}", flush=True)
                break
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                self._save()
            if step < t.max_steps and self._due(step, t.val_every, t.vis_every):
                self._validate(step, grid=self._due(step, 0, t.vis_every))
            step_start = time.perf_counter()  # validation and saving are not step time
        if not stopped:
            self.summary = self._validate(self.state.step, grid=True, final=True)
        self.logger.close()
        self.stop.restore()
        return 0

    @staticmethod
    def _due(step: int, *everies: int) -> bool:
        return any(e > 0 and step % e == 0 for e in everies)

    def _lrs(self) -> dict:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def _log(self, step: int, sums: torch.Tensor, lrs: dict) -> None:
        skipped = getattr(self.train_loader, "skipped", 0)
        s = torch.cat([sums, sums.new_tensor([skipped])])
        _dist().all_reduce(s)
        count = max(float(s[3]), 1.0)
        values = {"loss": float(s[0]) / count, "loss_contrastive": float(s[1]) / count,
                  "loss_localization": float(s[2]) / count,
                  "lr": lrs.get("visual", next(iter(lrs.values()))), "skipped_images": int(s[4])}
        if "textual" in lrs:
            values["lr_text"] = lrs["textual"]
        self.logger.log(step, values)

    def _save(self) -> None:
        t0 = time.perf_counter()
        path = ckpt.save(self.engine, self.cfg, self.state, self.rank, self.world_size,
                         self.model_args)
        self._info(f"checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    def _validate(self, step: int, grid: bool, final: bool = False) -> dict | None:
        batches, image_ids = self.data.val_batches()
        if batches is None:
            return None
        metrics, sample = validate(self.engine, batches, self.cfg, self.device,
                                   keep_for_grid=6 if grid else 0, image_ids=image_ids)
        self.logger.log_val(step, metrics)
        if self.rank == 0 and sample is not None:
            png = Path(self.cfg.run_dir) / "attention" / f"step_{step:08d}.png"
            attention_grid(sample, png, decode=self.data.decode,
                           title=f"step {step}: attention (left) vs rendered trace (right)")
            self.logger.image("val/attention", png, step)
        if final and self.rank == 0:
            summary = {"step": step, **metrics, "run_dir": str(self.cfg.run_dir),
                       "seconds_per_step_median": _median(self.step_times)}
            Path(self.cfg.run_dir, "eval_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return metrics

    def close(self) -> None:
        shutdown_process_group()  # a bare exit can abort in gloo's threads (see its docstring)


def _median(xs: list[float]) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[len(s) // 2]


def train(cfg: Config, deepspeed_config: str | None = None) -> int:
    trainer = Trainer(cfg, deepspeed_config)
    code = trainer.fit()
    # Not in a `finally`: a rank that raised must not wait at the closing barrier, which the other
    # ranks may never reach (it would hang until the collective timeout); exiting non-zero lets
    # the launcher stop the job.
    trainer.close()
    return code


__all__ = ["Trainer", "train"]
