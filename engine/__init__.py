"""The DeepSpeed training engine (installed as loctex.engine).

    launch.py       the entry point (``deepspeed engine/launch.py --config ...``) and its exit codes
    trainer.py      the training loop: data per rank, steps, signals, saving, logging, validation
    supervise.py    ``python -m loctex.engine.supervise -- CMD``: one signal to one pid stops a job
    checkpoint.py   saving and resuming checkpoints (reading them: ``loctex.checkpoints``)
    nonfinite.py    skipping NaN/inf steps; never saving a model that is not finite
    run_lock.py     one run per run directory
    run_log.py      metrics.jsonl, val.jsonl, progress bar, TensorBoard
    validate.py     validation metrics and the attention-map picture
    ds_config.py    the DeepSpeed JSON, generated from our config or passed through
    optim.py        optimizers and the learning-rate schedule
    collectives.py  the few collectives the loop and validation share
    devices.py      batches onto the accelerator, its fast defaults, its peak memory
"""
