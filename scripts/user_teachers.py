"""Teachers trained outside dfkd, as a user brings them, distilled with the recipe ``dfkd inspect``
recommends. One table.

    python scripts/user_teachers.py [--kinds user tv timm torchscript] [--seeds 0 1 2] [--out runs/users]
        [--threads 1] [--epochs 15] [--skip-done] [--table-only] [--set KEY=VALUE ...]

Four teachers are trained on digits in plain PyTorch (a training loop of their own, normalized
(x - 0.5) / 0.5 rather than with digits' statistics; only the images come from dfkd's digits reader)
and saved the ways people save them:

* ``user``: :class:`UserCNN`, a class of the user's own, as a training checkpoint that nests its
  ``model_state_dict`` (``torch.save({"epoch": ..., "model_state_dict": ...})``);
* ``tv``: torchvision's ResNet-18 with a one-channel first convolution, as a ``.safetensors`` file;
* ``timm``: timm's ``resnet10t`` (``in_chans=1``), as the state_dict a DDP run writes
  (``module.`` on every key);
* ``torchscript``: the user's network compiled with ``torch.jit.script``: a black-box teacher.

Each is brought in with ``dfkd import`` (the user class with ``--allow-code``), ``dfkd inspect``
names the recipe to start from, and that recipe distils it for every seed, evaluated on digits'
test split read as the teacher's card says. Rows go to ``<out>/results.jsonl`` as they finish
(``--skip-done`` resumes); ``<out>/results.md`` is the table: teacher kind, parameters, the teacher's
accuracy, the method, the student's final accuracy (mean ± std over seeds, best beside) and its
share of the teacher's, and the time per run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import append_row, mean_std, read_results, write_table  # noqa: E402

KINDS = ["user", "tv", "timm", "torchscript"]
MEAN, STD = 0.5, 0.5  # the users' own normalization


class UserCNN(nn.Module):
    """A user's network: three conv-BN-ReLU blocks, global pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def network(kind: str) -> nn.Module:
    if kind in ("user", "torchscript"):
        return UserCNN()
    if kind == "tv":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # digits are gray
        return model
    import timm

    return timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)


def train_plainly(kind: str, epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    """The user's own training loop on digits' training split: SGD with a cosine schedule, random
    shifts of up to 2 pixels; returns the network and its test accuracy."""
    from dfkd.data.datasets import load_dataset  # the data only: images and labels as uint8 tensors

    torch.manual_seed(seed)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = network(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(train) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps)
    norm = lambda u8: (u8.float() / 255 - MEAN) / STD  # noqa: E731
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train))
        for i in range(0, len(train) - 63, 64):
            index = order[i:i + 64]
            x = norm(train.images[index])
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            x = torch.roll(x, (dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(x), train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = 100.0 * float((model(norm(test.images)).argmax(1) == test.labels).float().mean())
    return model, accuracy


def save_as_users_do(kind: str, model: nn.Module, folder: Path) -> tuple[Path, list[str]]:
    """The file a user of ``kind`` would hand over, and the ``dfkd import`` arguments it needs."""
    folder.mkdir(parents=True, exist_ok=True)
    here = str(Path(__file__).resolve())
    if kind == "user":
        path = folder / "user_checkpoint.pt"
        torch.save({"epoch": 30, "model_state_dict": model.state_dict()}, path)
        return path, ["--arch", f"{here}:UserCNN", "--allow-code"]
    if kind == "tv":
        from safetensors.torch import save_file

        path = folder / "resnet18.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path, ["--arch", "tv:resnet18"]
    if kind == "timm":
        path = folder / "resnet10t_ddp.pth"
        torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
        return path, ["--arch", "timm:resnet10t"]
    path = folder / "user_scripted.pt"
    torch.jit.script(model).save(str(path))
    return path, []


def teacher_for(kind: str, args, root: Path) -> tuple[str, float, dict]:
    """The imported model file of ``kind`` (trained and imported here once), its accuracy, and
    ``dfkd inspect``'s report."""
    from dfkd.cli import main as dfkd
    from dfkd.tools.inspect import inspect_model

    folder = root / "teachers" / kind
    model_file, record = folder / "teacher.pt", folder / "teacher.json"
    if not record.exists():
        print(f"users: training the {kind} teacher", file=sys.stderr)
        t0 = time.perf_counter()
        model, accuracy = train_plainly(kind, args.epochs)
        source, extra = save_as_users_do(kind, model, folder)
        # digits' pictures were scanned at 8x8 and upsampled to 32x32: the card says so (--native-size)
        code = dfkd(["import", str(source), *extra, "--input", "1,32,32", "--mean", str(MEAN), "--std", str(STD),
                     "--classes", "10", "--native-size", "8,8", "--out", str(model_file), "--force"])
        if code:
            raise SystemExit(f"dfkd import of the {kind} teacher failed")
        record.write_text(json.dumps({"accuracy": accuracy, "train_s": round(time.perf_counter() - t0, 1)}))
    accuracy = json.loads(record.read_text())["accuracy"]
    return str(model_file), accuracy, inspect_model(str(model_file), allow_code=kind == "user")


def render(rows: list[dict], target: float) -> str:
    latest = {(r["kind"], r["config"], r["seed"]): r for r in rows}
    lines = ["| teacher kind | params | teacher acc | method (dfkd inspect's) | student final (best) | share | s per run |",
             "|---|---|---|---|---|---|---|"]
    for kind, config in dict.fromkeys((k[0], k[1]) for k in latest):
        group = [r for k, r in latest.items() if k[:2] == (kind, config)]
        share = statistics.mean(r["final_acc"] for r in group) / group[0]["teacher_acc"]
        lines.append(f"| {kind} | {group[0]['params']:,} | {group[0]['teacher_acc']:.2f} | {config} | "
                     f"{mean_std([r['final_acc'] for r in group])} ({mean_std([r['best_acc'] for r in group])}), "
                     f"seeds {', '.join(str(r['seed']) for r in group)} | {100 * share:.1f}%"
                     f"{' ✓' if share >= target else ''} | "
                     f"{statistics.mean(r['time_total_s'] for r in group):.0f} |")
    return "\n".join(lines) + (f"\n\nFinal test accuracy on digits (best beside, for reference), mean ± std over the "
                               f"seeds; share: of the teacher's accuracy (✓: at least {100 * target:g}%).\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30, help="the plain training's epochs")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--out", default="runs/users")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every distillation")
    p.add_argument("--skip-done", action="store_true", help="skip runs already in results.jsonl")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root, results, rows = read_results(args.out)
    if not args.table_only:
        from dfkd.core.config import load_config
        from dfkd.loop.engine import Engine

        root.mkdir(parents=True, exist_ok=True)
        done = {(r["kind"], r["seed"]) for r in rows} if args.skip_done else set()
        for kind in args.kinds:
            teacher, accuracy, report = teacher_for(kind, args, root)
            config = report["recipe"]["config"]
            for seed in args.seeds:
                if (kind, seed) in done:
                    continue
                print(f"users: {config} from the {kind} teacher, seed {seed}", file=sys.stderr)
                summary = Engine(load_config(config, [
                    f"teacher.checkpoint={teacher}", f"teacher.allow_code={str(kind == 'user').lower()}",
                    f"output.root={root / kind}", f"seed={seed}", f"runtime.num_threads={args.threads}",
                    *args.set])).fit()
                append_row(results, rows, {"kind": kind, "config": config, **summary, "teacher": teacher,
                                           "teacher_acc_plain": accuracy, "params": report["params"],
                                           "overrides": args.set})
    return write_table(root, render(rows, args.target))


if __name__ == "__main__":
    sys.exit(main())
