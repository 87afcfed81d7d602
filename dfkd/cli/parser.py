"""The command line's parser: every command, its options and their help."""
from __future__ import annotations

import argparse

CONSENT = ("import the user's class a model file names (module:Name), which runs its code: only for files and "
           "code you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free and adversarial knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    def training(name: str, help: str, default: str):
        p = sub.add_parser(name, help=help, description=help + " Extra arguments are config overrides.")
        p.add_argument("--config", default=default, help=f"shipped config name or YAML path (default: {default})")
        p.add_argument("--resume", metavar="CKPT", help="continue a run from its ckpt/last.pt")
        p.add_argument("--run-dir", metavar="DIR", help="with --resume: the folder to continue in, when the state "
                                                        "was moved out of its run")
        p.add_argument("--seed", type=int, help="shortcut for seed=N")
        p.add_argument("--out", help="output root (shortcut for output.root=DIR)")
        p.add_argument("--profile", type=int, metavar="N", help="profile N iterations after --profile-warmup, then "
                                                                "stop: a trace and a time table in the run folder")
        p.add_argument("--profile-warmup", type=int, default=5, metavar="W", help="iterations before the profiled "
                                                                                  "ones (default 5)")
        return p

    def teacher_options(p) -> None:
        p.add_argument("--teacher", metavar="CKPT", action="append",
                       help="teacher model file (shortcut for teacher.checkpoint=...); repeat it for an ensemble")
        p.add_argument("--allow-code", action="store_true", help=CONSENT + " (teacher.allow_code=true)")

    training("teacher", "Train a teacher on a real dataset.", "teacher/lenet5-digits")
    teacher_options(training("distill", "Distil a teacher into a student.", "datafree/dfad-digits"))
    teacher_options(training("profile", "Where an iteration's time goes: a teacher or distill config run for "
                                        "--profile-warmup then --profile iterations (default 25) under torch.profiler.",
                             "datafree/dfq-digits"))

    p = sub.add_parser("import", help="Make a dfkd model file of a teacher trained anywhere, with its input card.",
                       description="Weights (a state_dict .pt/.pth, nested or DDP-prefixed, or .safetensors) for "
                                   "--arch, or a TorchScript archive or torch.export program (.pt2) without it (a "
                                   "black-box teacher). Nothing is written unless the weights load strictly and a "
                                   "forward pass of the card's shape gives (N, classes) logits.")
    p.add_argument("weights", help="the trained teacher's file")
    p.add_argument("--arch", help="tv:NAME, timm:NAME, a zoo name (dfkd list models), or your own package.module:Name "
                                  "(or path/to/file.py:Name, with --allow-code); none for a program")
    p.add_argument("--kwargs", metavar="JSON", help="the architecture's options, e.g. '{\"width\": 0.5}'")
    p.add_argument("--input", required=True, metavar="C,H,W", help="the input the teacher takes, e.g. 3,224,224")
    p.add_argument("--mean", required=True, metavar="M[,M,M]", help="the normalization's mean, in [0, 1] pixel units "
                                                                    "(one value for every channel, or one each)")
    p.add_argument("--std", required=True, metavar="S[,S,S]", help="the normalization's std, likewise")
    p.add_argument("--classes", required=True, type=int, metavar="N", help="the number of classes it predicts")
    p.add_argument("--class-names", metavar="a,b,...", help="the classes' names, in label order")
    p.add_argument("--native-size", metavar="H,W", help="the resolution its pictures were taken at, when the data "
                                                         "was resized to the input (synthesis then renders at it)")
    p.add_argument("--allow-code", action="store_true", help=CONSENT)
    p.add_argument("--out", required=True, help="the model file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")

    p = sub.add_parser("inspect", help="What dfkd can do with a teacher: size, BatchNorm layers, embedding, the "
                                       "data-free methods that apply or refuse and why, and the recipe to start from.")
    p.add_argument("model", help="a model file (dfkd teacher or dfkd import)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--allow-code", action="store_true", help=CONSENT)

    p = sub.add_parser("chain", help="Run a chain of distillations (TAKD, DGKD, born-again), each stage's "
                                     "model the next one's teacher.", description="Extra arguments are chain "
                                     "config overrides (stage overrides go in the config).")
    p.add_argument("--config", help="chain config: a shipped chain/ name or a YAML path")
    p.add_argument("--resume", metavar="CHAIN_DIR", help="continue a killed chain in its folder")
    p.add_argument("--seed", type=int, help="shortcut for seed=N")
    p.add_argument("--out", help="output root (shortcut for root=DIR)")
    p.add_argument("--allow-code", action="store_true", help=CONSENT)

    p = sub.add_parser("search", help="Search a student architecture for a teacher: an Optuna study of short "
                                      "distillations under a budget, then the best retrained over seeds and a "
                                      "Pareto table.", description="Extra arguments are search config overrides.")
    p.add_argument("--config", help="search config: a shipped search/ name or a YAML path")
    p.add_argument("--teacher", metavar="CKPT", help="the teacher's model file (shortcut for teacher=CKPT)")
    p.add_argument("--resume", metavar="SEARCH_DIR", help="continue a killed search in its folder")
    p.add_argument("--storage", metavar="URL", help="the study's database (any URL Optuna accepts, e.g. "
                                                    "postgresql://host/db); default: study.db in the search folder")
    p.add_argument("--study-name", help="the study's name in --storage (default: the experiment's)")
    p.add_argument("--trials-only", action="store_true",
                   help="run trials until the study has enough, then stop (a helper worker of a shared study)")
    p.add_argument("--seed", type=int, help="shortcut for seed=N")
    p.add_argument("--out", help="output root (shortcut for root=DIR)")
    p.add_argument("--allow-code", action="store_true", help=CONSENT)

    p = sub.add_parser("eval", help="Evaluate a model file on a dataset split, read as its input card says.")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset name (default: the one the checkpoint was trained on), or your own labeled "
                                  "images: folder (an ImageFolder tree) or arrays (an .npz of x, y) at --root")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--root", help="dataset root folder, or the folder / .npz of your own images")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--allow-unhashed", action="store_true",
                   help="load a model file that records no SHA-256 of its weights (only one you trust)")
    p.add_argument("--exit-thresholds", type=float, nargs="+", metavar="P",
                   help="a model with exits: early-exit accuracy and FLOPs at each confidence threshold")
    p.add_argument("--allow-code", action="store_true", help=CONSENT)

    p = sub.add_parser("export", help="Export a model file to ONNX (a quantized one as an integer QDQ graph) "
                                      "and check it in ONNX Runtime against the model on the test split.")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="the .onnx file (default: beside the model file)")
    p.add_argument("--data", help="dataset of the check (default: the model's)")
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--batch-size", type=int, default=256, help="batch of the check and of the latency timing")
    p.add_argument("--no-check", action="store_true", help="export only")
    p.add_argument("--force", action="store_true", help="replace --out (and its .fp32.onnx reference) if they exist")
    p.add_argument("--allow-unhashed", action="store_true", help="load a model file that records no SHA-256")
    p.add_argument("--allow-code", action="store_true", help=CONSENT)

    p = sub.add_parser("audit", help="Privacy audit of a finished run: membership inference on its teacher and "
                                     "student, and how close its synthetic samples come to training images. "
                                     "Reads the teacher's training split; writes audit.json and audit.md into the run.")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=500, help="synthetic samples to compare (default 500)")
    p.add_argument("--references", type=int, help="training and test images each (default 2000, or half of the "
                                                    "test split when smaller: the other half trains shadows and is "
                                                    "the null of the memorization measures)")
    p.add_argument("--pairs", type=int, default=8, help="closest synthetic/training pairs drawn (default 8)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="a sample counts as closer to training data when d_train < (1 - margin) d_test")
    p.add_argument("--data", help="the teacher's data (default: the run's dataset): a dataset, or folder / arrays "
                                  "at --root holding train and test")
    p.add_argument("--root", help="dataset root folder, or the folder / .npz place of your own images")
    p.add_argument("--shadows", type=int, default=4, help="shadow models of LiRA (default 4; 0: none)")
    p.add_argument("--lira", choices=["offline", "online"], default="offline",
                   help="offline: shadows on held-out test images only; online: shadows on random halves of "
                        "training and test images, each sample in half of them (stronger, costlier)")
    p.add_argument("--allow-code", action="store_true", help=CONSENT)

    p = sub.add_parser("list", help="List what is registered and shipped.")
    p.add_argument("what", nargs="?", choices=["configs", "models", "datasets", "losses", "discriminators",
                                               "modalities", "generators", "synthesizers"])
    return parser
