"""torchrun with two CPU processes (gloo): DDP keeps replicas identical, only rank 0 writes."""
import subprocess
import sys
import textwrap

import pytest
import torch

JOB = textwrap.dedent('''
    import sys
    import torch
    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine
    from dfkd.core.runs import rank, world_size

    out = sys.argv[1]
    common = [f"output.root={out}", "runtime.num_threads=1", "output.tensorboard=false"]
    teacher = Engine(load_config("teacher/lenet5-digits", [*common, "train.epochs=2", "train.iters_per_epoch=3"]))
    assert world_size() == 2 and teacher.real.loader.world_size == 2
    teacher.fit()
    torch.save(dict(teacher.student.module.named_parameters()), f"{out}/teacher_rank{rank()}.pt")
    final = teacher.shared_run_dir / "ckpt" / "final.pt"
    student = Engine(load_config("datafree/dfq-digits", [*common, f"teacher.checkpoint={final}", "train.epochs=1",
                                                         "train.iters_per_epoch=3", "synthesis.batch_size=16"]))
    student.fit()
    state = {f"{n}.{k}": v for n, p in student.players.items() for k, v in p.module.named_parameters()}
    torch.save(state, f"{out}/student_rank{rank()}.pt")
    # adversarial: a discriminator with a gradient penalty, and an adapter updated in the student's phase
    adv = Engine(load_config("adversarial/advkd-feature-fmnist", [
        *common, "data.name=digits", f"teacher.checkpoint={final}", "train.epochs=1", "train.iters_per_epoch=3",
        "phases.0.losses.adversarial.objective=wgan-gp", "phases.1.losses.adversarial.objective=wgan-gp"]))
    adv.fit()
    state = {f"{n}.{k}": v for n, p in adv.players.items() for k, v in p.module.named_parameters()}
    torch.save(state, f"{out}/adversarial_rank{rank()}.pt")
''')


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(tmp_path):
    (tmp_path / "job.py").write_text(JOB)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "job.py"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    # a crash shows rank 1's own traceback, not only rank 0's view of a closed connection
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "[rank1]" in line)[-3000:] \
        or proc.stderr[-3000:]
    for job in ("teacher", "student", "adversarial"):
        a, b = (torch.load(tmp_path / f"{job}_rank{r}.pt", weights_only=True) for r in range(2))
        assert a.keys() == b.keys()
        for key in a:  # gradients were averaged: the replicas' weights never drifted apart
            assert torch.equal(a[key], b[key]), (job, key)
        # (BN running statistics are broadcast from rank 0 at each forward, so each rank's last
        # batch leaves them a step apart; the weights must match exactly)
    # one run folder per job, written by rank 0 alone
    assert [p.name for p in sorted(tmp_path.iterdir()) if p.is_dir()] == ["advkd-feature-fmnist", "dfq-digits",
                                                                          "teacher-lenet5-digits"]
    assert all(len(list(p.iterdir())) == 1 for p in tmp_path.iterdir() if p.is_dir())
