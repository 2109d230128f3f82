"""The training loop: DeepSpeed engine, data per rank, checkpoints, signals, logging, validation.

One optimizer step = ``train.gradient_accumulation_steps`` micro-batches per rank; DeepSpeed
accumulates and steps at the boundary. Everything that must agree across ranks (stopping on a
signal, skipping a non-finite step, saving, the run-directory lock) is decided collectively, so a
signal or a NaN that reaches one rank first cannot hang the others.

Preemption: SIGTERM / SIGINT set a flag (from the very start of the process); the step in flight
finishes, every rank learns of it at the step boundary (one all-reduce of a flag per step), a
checkpoint is saved and the process exits 0. A second signal while saving is ignored (the save is
what the first one asked for). DataLoader workers ignore both signals (``loctex.data``), so a
signal to the whole process group, as schedulers send it, reaches the ranks without killing their
workers. When only a launcher's pid is signalled, run the job under ``loctex.engine.supervise``.

Non-finite steps (``engine/nonfinite.py``): a NaN/inf loss or gradient skips the update on every
rank and is counted; more than ``train.max_skipped_steps`` in a row stop the run (exit 1) without
saving, so ``latest`` stays on the last finite checkpoint; a model that is not finite is never saved.
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

from loctex.checkpoints import latest_named
from loctex import config
from loctex.config import Config, save_config
from loctex.kernels.distributed import shutdown_process_group
from loctex.losses import build_loss

from . import checkpoint as ckpt
from . import ds_config
from .collectives import all_max, all_sum, any_rank
from .devices import peak_memory_mb, to_device, use_fast_cuda_defaults
from .nonfinite import BufferSnapshot, StepGuard, model_is_finite
from .optim import build_optimizer, build_scheduler
from .run_lock import RunDirLocked, RunLock
from .run_log import RunLogger
from .supervise import register_rank
from .validate import attention_grid, validate

log = logging.getLogger("loctex.engine")


class EngineError(RuntimeError):
    """A run that cannot go on, explained in one line (printed without a traceback).
    ``every_rank``: every rank raises the same error (then only rank 0 prints it)."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


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

    def ignore_more(self) -> None:
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Data:
    """The data layer (``loctex.data``) as the loop uses it: this rank's infinite training stream
    from a micro-batch position on, the validation loader, the tokenizer."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        from loctex.data.loader import build_loader
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self._build_loader = build_loader
        self._val = None
        for key, where in (("data.prepared", cfg.data.prepared),
                           ("data.val_prepared", cfg.data.val_prepared)):
            if where and not Path(where).exists():
                raise FileNotFoundError(f"{key}: {where} does not exist")
        from loctex.data.tokenizer import load_tokenizer
        path = cfg.model.tokenizer or self._tokenizer_path(cfg.data.prepared)
        try:
            self.tokenizer = load_tokenizer(path)
        except Exception as exc:  # noqa: BLE001 - `tokenizers` raises a bare Exception without the path
            raise ValueError(f"tokenizer {path}: {exc}") from exc

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
        rank already consumed (the loader's global step). One sample is read here, in this
        process, so that a data error stops the run at once with its own message."""
        loader = self._build_loader(self.cfg, rank=self.rank, world_size=self.world_size,
                                    train=True, start_step=start_step)
        dataset = getattr(loader, "dataset", None)
        if dataset is not None:
            with torch.random.fork_rng(devices=[]):
                dataset[0]
        return loader

    def val_loader(self):
        if not self.cfg.data.val_prepared:
            return None
        if self._val is None:  # one pass per iteration; kept so its workers are reused
            self._val = self._build_loader(self.cfg, self.cfg.data.val_prepared, train=False,
                                           rank=self.rank, world_size=self.world_size)
        return self._val

    def val_batches(self):
        """This rank's full validation batches (the same count on every rank) and ``image_of``,
        which maps the batch's ``index`` (the narratives actually loaded) to their images, so that
        another caption of the same image counts as a retrieval hit (None when the data set does
        not say)."""
        loader = self.val_loader()
        if loader is None:
            return None, None
        B = self.cfg.train.micro_batch_size
        n = len(loader.dataset)
        full = n // (B * self.world_size)
        if full == 0:
            raise ValueError(f"{self.cfg.data.val_prepared}: {n} narratives cannot "
                             f"fill one validation batch of {B} x {self.world_size} ranks")
        image_of = None
        packed = getattr(loader.dataset, "packed", None)
        if packed is not None and hasattr(packed, "image_index"):
            def image_of(index: torch.Tensor) -> torch.Tensor:
                return torch.tensor([packed.image_index(int(i)) for i in index], dtype=torch.long)
        return itertools.islice(iter(loader), full), image_of


class Trainer:
    def __init__(self, cfg: Config, deepspeed_config: str | None = None):
        # first of all, so that a signal during start-up is honoured at the first step boundary
        self.stop = StopFlag()
        self.stop.install()
        import deepspeed
        self.on_cuda = torch.cuda.is_available()
        if not self.on_cuda:
            _skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if self.on_cuda else "gloo")
        import torch.distributed as dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        register_rank(self.rank)
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.on_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
            use_fast_cuda_defaults()
            cfg = config.replace(cfg, {"model.channels_last": True})
        else:
            self.device = torch.device("cpu")
        self.lock = self._lock_run_dir(cfg.run_dir)

        ds = (ds_config.load(deepspeed_config, cfg, self.world_size, self.on_cuda) if deepspeed_config
              else ds_config.generate(cfg, self.world_size, self.on_cuda))
        cfg = ds_config.sync_config(cfg, ds, self.world_size)
        self.cfg, self.ds = cfg, ds

        try:
            self.data = Data(cfg, self.rank, self.world_size)
        except (OSError, ValueError) as exc:
            raise EngineError(str(exc)) from exc
        torch.manual_seed(cfg.seed)  # identical initialization on every rank
        from loctex.models import build_model
        self.model_args = {"vocab_size": self.data.vocab_size, "pad_token_id": self.data.pad_token_id}
        model = build_model(cfg, **self.model_args)
        scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
        if scalars:  # DeepSpeed broadcasts/partitions through p.data.view(torch.uint8)
            raise ValueError(f"0-dim parameters {scalars} cannot go through DeepSpeed: "
                             "give them shape [1]")
        kwargs = {}
        self.guard = None
        if "optimizer" not in ds:  # a passed-through JSON may bring its own optimizer/scheduler
            optimizer = build_optimizer(model, cfg, self.on_cuda)
            self.guard = StepGuard(optimizer, self.device)  # before the scheduler wraps step()
            kwargs["optimizer"] = optimizer
            if "scheduler" not in ds:
                kwargs["lr_scheduler"] = build_scheduler(optimizer, cfg)
        else:
            from .optim import param_groups
            kwargs["model_parameters"] = param_groups(model, cfg)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, config=ds, **kwargs)
        if cfg.model.compile:
            self._compile()
        self.buffers = BufferSnapshot(self.engine.module)
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
        try:
            self.train_loader = self.data.train_loader(self.state.data_position)
        except (OSError, ValueError) as exc:
            raise EngineError(f"reading the first training sample: {exc}") from exc

        self.global_batch = self.world_size * cfg.train.micro_batch_size
        self.images_per_step = self.global_batch * cfg.train.gradient_accumulation_steps
        if self.rank == 0:
            run = Path(cfg.run_dir)
            save_config(cfg, run / "config.yaml")
            (run / "ds_config.json").write_text(json.dumps(ds, indent=1) + "\n")
        self.logger = RunLogger(cfg.run_dir, self.rank, cfg.train.max_steps, self.state.step,
                                self.global_batch, self.images_per_step)
        self.skipped_steps = 0  # since this process started (like the loader's skipped images)

    def _info(self, text: str) -> None:
        if self.rank == 0:
            print(f"[loctex] {text}", flush=True)

    def _lock_run_dir(self, run_dir: str) -> RunLock | None:
        """Rank 0 owns the run directory; every rank stops if it is taken."""
        lock, message = None, ""
        if self.rank == 0:
            try:
                lock = RunLock(run_dir).acquire()
            except RunDirLocked as exc:
                message = str(exc)
        if any_rank(bool(message), self.device):
            raise EngineError(message or "run_dir is locked (rank 0 says by whom)", every_rank=True)
        return lock

    def _compile(self) -> None:
        """``model.compile``: torch.compile of the model, through DeepSpeed so that its hooks
        (ZeRO partitioning, gradient reduction) stay outside the compiled graphs."""
        try:
            self.engine.compile()
        except Exception as exc:  # noqa: BLE001 - the backends fail in many ways
            raise EngineError(f"model.compile=true: torch.compile failed ({type(exc).__name__}: "
                              f"{exc}); run with model.compile=false") from exc

    # ---- data ----------------------------------------------------------------------------------
    def _micro_batches(self):
        """This rank's micro-batches from the checkpointed position on (the loader is infinite and
        deterministic in (seed, position)); keeps ``state.data_position`` / ``state.epoch`` current."""
        loader = self.train_loader
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
        """Train to ``train.max_steps`` or a stop signal (0), or until the steps stop being finite
        (1)."""
        cfg, t = self.cfg, self.cfg.train
        self.engine.train()
        batches = self._micro_batches()
        objective = build_loss(cfg)
        # loss, contrastive, localization, micro-batches: of this step, and of the applied steps
        # since the last log
        step_sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        sums = torch.zeros_like(step_sums)
        self._info(f"training: world {self.world_size}, micro-batch {t.micro_batch_size}, "
                   f"accumulation {t.gradient_accumulation_steps}, global batch {self.global_batch}, "
                   f"zero {cfg.zero.stage}, {cfg.precision}, steps {self.state.step}->{t.max_steps}")
        step_start = time.perf_counter()
        self.step_times: list[float] = []
        skips_in_a_row = 0
        code, stopped = 0, False
        while self.state.step < t.max_steps:
            lrs = self._lrs()  # the lr this step uses (the scheduler moves it at the step)
            self._train_step(batches, objective, step_sums)
            self.state.step += 1
            self.state.samples_seen += self.images_per_step
            now = time.perf_counter()
            self.step_times.append(now - step_start)
            step = self.state.step
            if self._step_skipped():
                self.buffers.restore()  # the forward moved the BatchNorm statistics
                self.skipped_steps += 1
                if not self._loss_scale_overflow():
                    skips_in_a_row += 1
                self._info(f"step {step}: loss or gradient not finite, update skipped "
                           f"({skips_in_a_row} in a row, train.max_skipped_steps "
                           f"{t.max_skipped_steps})")
            else:
                sums += step_sums
                skips_in_a_row = 0
            self.logger.step_done(step)

            if self._due(step, t.log_every) or step == t.max_steps:
                self._log(step, sums, lrs)
                sums.zero_()
            if skips_in_a_row > t.max_skipped_steps:
                latest = latest_named(ckpt.checkpoint_dir(cfg))
                self._info(f"stopping: {skips_in_a_row} steps in a row had a non-finite loss or "
                           f"gradient (train.max_skipped_steps={t.max_skipped_steps}); nothing "
                           f"saved since; the last checkpoint is {latest or 'none'}")
                code = 1
                break
            if self._stop_requested(step):
                stopped = True
                code = 0 if self._save() else 1
                if code == 0:
                    name = signal.Signals(self.stop.signum or signal.SIGTERM).name
                    print(f"[loctex] rank {self.rank}: checkpoint of step {step} saved; exit 0 after "
                          f"{name}", flush=True)
                break
            if self._due(step, t.checkpoint_every) or step == t.max_steps:
                if not self._save():
                    code = 1
                    break
            if step < t.max_steps and self._due(step, t.val_every, t.vis_every):
                self._validate(step, grid=self._due(step, t.vis_every))
            step_start = time.perf_counter()  # validation and saving are not step time
        if code == 0 and not stopped:
            self.summary = self._validate(self.state.step, grid=True, final=True)
        self.logger.close()
        if not stopped:  # after a stop, keep ignoring: launchers repeat the signal while we exit
            self.stop.restore()
        return code

    def _train_step(self, batches, objective, step_sums: torch.Tensor) -> None:
        """One optimizer step: ``train.gradient_accumulation_steps`` micro-batches, DeepSpeed
        stepping at the boundary; ``step_sums`` gets this step's losses."""
        engine = self.engine
        self.buffers.take()
        if self.guard is not None:
            self.guard.begin()
        step_sums.zero_()
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            batch = to_device(next(batches), self.device)
            out = objective(engine(batch), batch)
            if self.guard is not None:
                self.guard.observe_loss(out["loss"])
            engine.backward(out["loss"])
            engine.step()
            step_sums += torch.stack([out["loss"].detach().double(),
                                      out["loss_contrastive"].detach().double(),
                                      out["loss_localization"].detach().double(),
                                      torch.ones((), dtype=torch.float64, device=self.device)])

    @staticmethod
    def _due(step: int, *everies: int) -> bool:
        """Whether ``step`` is a multiple of any of ``everies`` (0: never)."""
        return any(e > 0 and step % e == 0 for e in everies)

    def _step_skipped(self) -> bool:
        """Whether the update of the step just done was skipped, on every rank alike: by our guard
        (``engine/nonfinite.py``) or by DeepSpeed's own overflow check."""
        guarded = self.guard is not None and self.guard.skipped
        return guarded or not self.engine.was_step_applied()

    def _loss_scale_overflow(self) -> bool:
        """Whether a skipped step is fp16's dynamic loss scale finding its level (gradients
        overflowed, the loss was finite): DeepSpeed lowers the scale and goes on; such skips are
        counted but do not stop the run."""
        return (self.cfg.precision == "fp16" and self.guard is not None
                and self.guard.loss_was_finite)

    def _stop_requested(self, step: int) -> bool:
        if not any_rank(self.stop.signum != 0, self.device):
            return False
        self.stop.ignore_more()
        name = signal.Signals(self.stop.signum or signal.SIGTERM).name
        self._info(f"{name}: saving step {step} and exiting")
        return True

    def _lrs(self) -> dict:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def _log(self, step: int, sums: torch.Tensor, lrs: dict) -> None:
        skipped = getattr(self.train_loader, "skipped", 0)
        s = all_sum(torch.cat([sums, sums.new_tensor([skipped])]))
        count = float(s[3])

        def mean(i):
            return float(s[i]) / count if count else None
        values = {"loss": mean(0), "loss_contrastive": mean(1), "loss_localization": mean(2),
                  "lr": lrs.get("visual", next(iter(lrs.values()))), "skipped_images": int(s[4]),
                  "skipped_steps": self.skipped_steps}
        if "textual" in lrs:
            values["lr_text"] = lrs["textual"]
        peak = peak_memory_mb(self.device)
        if peak is not None:
            values["peak_gpu_mem_mb"] = round(float(all_max(torch.tensor([peak], device=self.device))[0]), 1)
        else:
            values["peak_gpu_mem_mb"] = None
        self.logger.log(step, values)

    def _save(self) -> bool:
        """Save a checkpoint of the current step, unless the model is not finite (then say so and
        return False: ``latest`` stays on the last finite checkpoint)."""
        if not model_is_finite(self.engine.module, self.device):
            self._info(f"step {self.state.step}: the model holds NaN/inf values; not saved (the "
                       f"last checkpoint is {latest_named(ckpt.checkpoint_dir(self.cfg)) or 'none'})")
            return False
        t0 = time.perf_counter()
        path = ckpt.save(self.engine, self.cfg, self.state, self.rank, self.world_size,
                         self.model_args)
        self._info(f"checkpoint {path} ({time.perf_counter() - t0:.1f} s)")
        return True

    def _validate(self, step: int, grid: bool, final: bool = False) -> dict | None:
        batches, image_of = self.data.val_batches()
        if batches is None:
            return None
        metrics, sample = validate(self.engine, batches, self.cfg, self.device,
                                   keep_for_grid=6 if grid else 0, image_of=image_of)
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
        if self.lock is not None:
            self.lock.release()


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


__all__ = ["EngineError", "Trainer", "train"]
