"""TensorBoard as a researcher opens it after the quick start: a teacher run and a data-free
student of it in one folder, served with the README's command and loaded in a headless Chromium.
The Scalars, Images and HParams dashboards must not be blank, the student's accuracy chart must
carry the teacher's line and a samples-seen axis, the pictures must be legible in their card, and
HParams must hold the distillation's hyperparameters. Skipped where Chromium or websocket-client
is missing (CI has neither); set DFKD_SCREENSHOTS to a folder to keep the screenshots."""
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from browser import Browser, chromium

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def readme_tensorboard_arguments() -> list[str]:
    """The arguments of the README's ``tensorboard`` command, after ``--logdir DIR``."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "bin/tensorboard --logdir" in line)
    words = shlex.split(line)
    return words[words.index("--logdir") + 2:]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if chromium() is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[dev]')")
    from dfkd.cli import main

    root = tmp_path_factory.mktemp("quickstart")
    threads = torch.get_num_threads()
    try:
        assert main(["teacher", "--config", "teacher/lenet5-digits", "--out", str(root), "train.epochs=2",
                     "runtime.num_threads=1"]) == 0
        teacher = next(root.glob("teacher-lenet5-digits/*/ckpt/final.pt"))
        assert main(["distill", "--config", "datafree/dfq-digits", "--teacher", str(teacher), "--out", str(root),
                     "train.epochs=2", "train.iters_per_epoch=5", "runtime.num_threads=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root / "tensorboard.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--host", "127.0.0.1",
                               "--port", str(port), *readme_tensorboard_arguments()],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            opener.open(url + "/data/runs", timeout=5).read()
            break
        except OSError:
            time.sleep(0.5)
    profile = tmp_path_factory.mktemp("chromium")
    try:
        with Browser(profile) as browser:
            yield url, browser
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def dashboard(served, name: str, ready, tags: str = "") -> dict:
    """The dashboard's page once ``ready``; ``tags``: a regular expression in its tag filter (the
    matching charts are then shown in one open section; otherwise only the first sections are)."""
    url, browser = served
    browser.open(f"{url}/#{name}" + (f"&tagFilter={urllib.parse.quote(tags)}" if tags else ""))
    page = browser.wait_for(ready, timeout=90)
    if os.environ.get("DFKD_SCREENSHOTS"):
        time.sleep(3)  # the charts' last drawing
        folder = Path(os.environ["DFKD_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        browser.screenshot(folder / f"{name}.png")
    return page


def test_scalars_show_the_teachers_line_and_the_samples_seen_axis(served):
    page = dashboard(served, "scalars", lambda p: p["lines"] >= 10 and "class_balance" in p["text"],
                     tags="eval/|class_balance")
    assert page["lines"] >= 10, "the Scalars dashboard drew no curves"
    for shown in ("eval/acc", "eval/acc_vs_samples_seen", "eval/gap_to_teacher", "eval/agreement",
                  "synthetic/class_balance", "teacher-reference", "samples-seen"):
        assert shown in page["text"], shown


def test_images_are_drawn_and_legible_in_their_cards(served):
    page = dashboard(served, "images", lambda p: len(p["images"]) >= 9, tags=".")
    assert len(page["images"]) >= 9, f"the Images dashboard shows {len(page['images'])} pictures"
    for tag in ("synthetic/samples", "synthetic/what_the_teacher_sees", "synthetic/class_counts",
                "eval/confusion_matrix", "eval/per_class", "real/by_class"):
        assert tag in page["text"], tag
    # a picture is shrunk into its card by at most 1.6x (the PIL grids of before: 1024 px into 350, 2.9x)
    assert all(natural <= 1.6 * shown for natural, shown in page["images"]), page["images"]


def test_hparams_hold_the_distillation_and_its_metrics(served):
    page = dashboard(served, "hparams", lambda p: "players.generator.optim.lr" in p["text"])
    text = page["text"]
    for column in ("Method", "Student", "Teacher", "Losses", "Generator"):
        assert re.search(rf"\b{column}\b", text), column
    for key in ("players.generator.optim.lr", "players.student.net.name", "phases.1.losses.kd_kl.T",
                "teacher.checkpoint", "synthesis.batch_size"):
        assert key in text, f"{key} is not in HParams"
    for value in ("kd_kl(T=4.0)", "lenet5_half", "data-free (generator): dfq-digits", "teacher training"):
        assert value in text, value
    assert "final accuracy (%)" in text and "teacher minus student (points)" in text
