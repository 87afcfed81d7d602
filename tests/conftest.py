from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs set ``runtime.num_threads`` (often 1: robust on a loaded 2-core machine) and the engine
    sets it process-wide, so every test gives the next one its thread count back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A LeNet-5 teacher trained on digits once per test session: (path to its ckpt/final.pt, final accuracy).

    One thread: on a busy 2-core machine two threads can take 10x longer (2 s vs 20+ s); the
    engine sets the thread count process-wide, so it is put back afterwards."""
    import torch

    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine

    tmp = tmp_path_factory.mktemp("digits-teacher")
    threads = torch.get_num_threads()
    try:
        summary = Engine(load_config("teacher/lenet5-digits", [f"output.root={tmp}", "train.epochs=8",
                                                               "runtime.num_threads=1"])).fit()
    finally:
        torch.set_num_threads(threads)
    path = Path(summary["run_dir"]) / "ckpt" / "final.pt"
    assert path.is_file(), path
    return path, summary["final_acc"]


@pytest.fixture
def fit_until_killed():
    """``fit_until_killed(engine, epoch)``: runs ``engine.fit()`` as if the process were killed
    right after the checkpoint of ``epoch`` (a KeyboardInterrupt from a callback at its end)."""
    from dfkd.loop.callbacks import Callback

    class Kill(Callback):
        def __init__(self, epoch: int):
            self.epoch = epoch

        def on_epoch_end(self, engine, epoch: int, record: dict) -> None:
            if epoch == self.epoch:
                raise KeyboardInterrupt

    def run(engine, epoch: int) -> None:
        kill = Kill(epoch)
        engine.callbacks.append(kill)
        try:
            with pytest.raises(KeyboardInterrupt):
                engine.fit()
        finally:
            engine.callbacks.remove(kill)

    return run
