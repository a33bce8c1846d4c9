# The run directory of VL-DAC (arXiv 2508.04280) training: TensorBoard logs, the --save-model directory that
# from_pretrained loads, and the --resume checkpoint that continues a run bit for bit on CPU.
import json
import os
import pickle
import random
import signal
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

import distributed
from distributed import RANK, WORLD_SIZE
from flags import fail


def open_writer(run_dir, args, resumed_step=None):
    """(rank 0's TensorBoard writer, the run directory): a new run claims a directory no other run has (a sweep's
    runs started in the same second with the same name and seed get run_dir, run_dir-2, ...); W&B with --track.
    Resuming, TensorBoard hides what the stopped run logged after its checkpoint (purge_step). Other ranks: None."""
    run_dir = Path(run_dir)
    if RANK != 0:
        return None, run_dir
    if resumed_step is None:
        run_dir = claim_directory(run_dir)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_dir.name, save_code=True)
    writer = SummaryWriter(str(run_dir), purge_step=None if resumed_step is None else resumed_step + 1)
    if resumed_step is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                        "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()))
    return writer, run_dir


def claim_directory(path):
    """Create path, or path-2, path-3, ... if it exists: mkdir is atomic, so two processes never get the same one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ["", *(f"-{n}" for n in range(2, 10_000))]:
        try:
            candidate = path.with_name(path.name + suffix)
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    fail(f"{path} and 9,998 numbered variants of it exist already")


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM during training: the run finishes its iteration, writes a checkpoint and exits;
    a second signal exits at once (a checkpoint being written is abandoned, the previous one stays intact)."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:
            print("stopped at once; the last complete checkpoint stays", file=sys.stderr, flush=True)
            sys.exit(128 + signum)
        self.signal = signum
        if RANK == 0:
            print(f"{signal.Signals(signum).name}: stopping after this iteration, with a checkpoint (again: stop at "
                  f"once)", file=sys.stderr, flush=True)

    def requested(self):
        """Whether any rank got a signal (a collective under torchrun: every rank stops after the same iteration)."""
        return distributed.sum_over_ranks(dict(stop=float(self.signal is not None)))["stop"] > 0

    def exit(self, writer, run_dir, iteration, global_step):
        if writer is not None:
            writer.close()
        if RANK == 0:
            print(f"stopped after iteration {iteration} ({global_step} env steps), checkpoint written; continue with: "
                  f"python vldac.py --resume {run_dir}", file=sys.stderr, flush=True)
        sys.exit(128 + (self.signal or signal.SIGINT))


def save_model(path, agent, processor, args):
    """A directory from_pretrained loads (peft adapter or full weights) + value_head.pt + processor + args."""
    path.mkdir(parents=True, exist_ok=True)
    agent.policy.save_pretrained(path)
    processor.save_pretrained(path)
    torch.save(agent.value_head.state_dict(), path / "value_head.pt")
    (path / "args.json").write_text(json.dumps(asdict(args), indent=2))
    mode = 0o666 & ~os.umask(os.umask(0))  # what a plain open() gives: safetensors writes its file 0600
    for file in path.iterdir():
        if file.is_file():
            file.chmod(mode)
    print(f"model saved to {path} (evaluate: python evaluate.py --model-ids {path})", flush=True)


def save_checkpoint(path, agent, optimizer, runner, args, run_name, iteration, global_step):
    """Everything a run needs to continue: trainable weights (LoRA or full, value head), Adam, the RNG
    states, the env runner, the counters. Written to a temp file, then renamed over the last checkpoint, so
    a kill at any moment leaves the previous complete checkpoint or the new one, never half of one."""
    try:  # the envs mid-episode; MiniWorld's GL envs do not pickle: a resumed run starts new episodes there
        runner_state = pickle.dumps(runner)
    except (TypeError, AttributeError, pickle.PicklingError):
        runner_state = None
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    per_rank = [dict(runner=runner_state, rng=rng)]  # envs and RNGs differ per rank; rank 0 writes them all
    if WORLD_SIZE > 1:
        per_rank = [None] * WORLD_SIZE
        dist.all_gather_object(per_rank, dict(runner=runner_state, rng=rng))
    if RANK != 0:
        return
    state = dict(args=asdict(args), run_name=run_name, iteration=iteration, global_step=global_step,
                 trainable={n: p.detach().cpu() for n, p in agent.named_parameters() if p.requires_grad},
                 optimizer=optimizer.state_dict(), per_rank=per_rank)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX
    finally:  # interrupted (a second Ctrl-C): no half-written file left beside the previous checkpoint
        tmp.unlink(missing_ok=True)


def load_checkpoint(run_dir):
    """The last checkpoint of a run directory (a pickle: load only checkpoints you wrote)."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        fail(f"--resume {run_dir!r} is not a vldac run directory: no checkpoint.pt in it (see --checkpoint-every)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"--resume {run_dir!r}: cannot read checkpoint.pt ({type(e).__name__}: {str(e).splitlines()[0]})")
    if len(checkpoint["per_rank"]) != WORLD_SIZE:
        fail(f"--resume {run_dir!r}: the run had {len(checkpoint['per_rank'])} rank(s), resume it with as many")
    return checkpoint


def resume_args(args):
    """(args, checkpoint): without --resume, (args, None). With it, the run's own args and its last checkpoint;
    any other flag beside --resume is an error (the run continues as it started), and a finished run exits."""
    if not args.resume:
        return args, None
    changed = [key for key, value in asdict(args).items() if value != getattr(type(args)(resume=args.resume), key)]
    if changed:
        flags = " ".join("--" + key.replace("_", "-") for key in changed)
        fail(f"--resume continues a run with its own flags; drop {flags}")
    checkpoint = load_checkpoint(args.resume)
    if checkpoint["iteration"] >= checkpoint["args"]["num_iterations"]:
        print(f"{args.resume} finished all {checkpoint['iteration']} iterations: nothing left to resume")
        sys.exit(0)
    return replace(type(args)(**checkpoint["args"]), resume=args.resume), checkpoint


def resume(checkpoint, agent, optimizer, runner):
    """Weights, Adam, RNG and envs as they were after update `iteration`. Returns (runner, global_step, the
    next iteration); without a checkpoint (a new run) (runner, 0, 1). Where the envs could not be pickled
    (MiniWorld) the fresh runner starts new episodes."""
    if checkpoint is None:
        return runner, 0, 1
    agent.load_state_dict(checkpoint["trainable"], strict=False)
    optimizer.load_state_dict(checkpoint["optimizer"])
    state = checkpoint["per_rank"][RANK]
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if state["runner"] is not None:
        for env in runner.envs:  # replaced by the checkpoint's envs, mid-episode
            env.close()
        runner = pickle.loads(state["runner"])
    print(f"resumed after iteration {checkpoint['iteration']} ({checkpoint['global_step']} env steps)", flush=True)
    return runner, checkpoint["global_step"], checkpoint["iteration"] + 1
