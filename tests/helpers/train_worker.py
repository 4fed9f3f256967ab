"""A training process for the multi-process tests: `torchrun ... train_worker.py KEY=VALUE ...` runs the SFT recipe
(or the recipe named by UMM_TEST_RECIPE) on the engine with those config overrides.  Fault injection (environment):
  UMM_TEST_KILL="RANK:STEP:step"        SIGKILL rank RANK inside optimizer step STEP (after its forward)
  UMM_TEST_KILL="RANK:STEP:checkpoint"  SIGKILL rank RANK after it wrote its shard of checkpoint-STEP, before the
                                        checkpoint is committed
"""
import os
import signal
import sys

from umm_ops.train import Config, train


def _arm(spec: str) -> None:
    rank, step, where = spec.split(":")
    rank, step = int(rank), int(step)
    me = int(os.environ.get("RANK", "0"))
    if me != rank:
        return
    if where == "step":
        from umm_ops.train.recipes.sft import SFTRecipe

        real = SFTRecipe.step

        def step_then_die(self, model, batch, ctx):
            out = real(self, model, batch, ctx)
            if ctx.step + 1 == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        SFTRecipe.step = step_then_die
    elif where == "checkpoint":
        import torch.distributed.checkpoint as dcp

        real_save = dcp.save

        def save_then_die(state, checkpoint_id):
            out = real_save(state, checkpoint_id=checkpoint_id)
            if f".tmp-checkpoint-{step}" in str(checkpoint_id):
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        dcp.save = save_then_die
    else:
        raise ValueError(spec)


if __name__ == "__main__":
    if os.environ.get("UMM_TEST_KILL"):
        _arm(os.environ["UMM_TEST_KILL"])
    train(Config.build(os.environ.get("UMM_TEST_RECIPE", "sft"), overrides=sys.argv[1:]))
