"""Start `learner.world_size` FSDP ranks as child processes of one learner role (single host).

Under torchrun or srun the environment already names the rank and this is
skipped. Each child is a fresh interpreter (spawn) that runs the learner with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. A stop request is passed on to
every rank, and a rank that dies takes the others down with a named error.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

from protocol.config import RunConfig
from protocol.lifetime import die_with_parent

log = logging.getLogger("learner")


def _rank_main(rank: int, world: int, port: int, config_json: str, model_dir: str, run_dir: str, resume: bool) -> None:
    die_with_parent()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from learner.main import run_learner

    config = RunConfig.model_validate_json(config_json)
    logging.basicConfig(level=config.run.log_level, format=f"%(asctime)s %(name)s[rank {rank}] %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_learner(config, Path(model_dir), Path(run_dir), stop, resume)


def run_ranks(config: RunConfig, model_dir: Path, run_dir: Path, stop: threading.Event, resume: bool) -> None:
    if resume:  # a checkpoint of another model is refused here, in words, not as a rank's exit code
        from learner.checkpoint import checkpoint_to_resume  # torch: only when needed, this process only watches

        checkpoint_to_resume(run_dir, model_dir)
    world, ctx = config.learner.world_size, mp.get_context("spawn")
    args = (world, config.learner.master_port, config.model_dump_json(), str(model_dir), str(run_dir), resume)
    ranks = [ctx.Process(target=_rank_main, args=(r, *args), name=f"learner-rank-{r}") for r in range(world)]
    for p in ranks:
        p.start()
    log.info("started %d FSDP ranks", world)
    try:
        while any(p.is_alive() for p in ranks):
            failed = [p for p in ranks if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"{failed[0].name} exited with code {failed[0].exitcode}")
            if stop.is_set():
                for p in ranks:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGTERM)
            time.sleep(0.2)
        failed = [p for p in ranks if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{failed[0].name} exited with code {failed[0].exitcode}")
    finally:
        for p in ranks:
            if p.is_alive():
                p.kill()
            p.join()
