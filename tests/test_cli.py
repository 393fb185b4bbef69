import os
import subprocess
import sys
from pathlib import Path

import pytest

from fer_core import runs
from fer_core.config import GPU_DEVICE_NODES

ROOT = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("torch", "torchvision", "sklearn", "fastapi", "optuna", "cv2")


def cli(*args: str, env_extra: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fer_core", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_on_demo_end_to_end_prints_the_run_dir_last(tmp_path, capsys):
    # the demo is the test process's own (conftest's FER_DEMO_DIR): drawn once, whoever asks first
    result = cli("train", "--data", "demo", "--epochs", "2", "--img-size", "32", "--max-per-class", "10",
                 "--batch-size", "16", "--no-pretrained", "--runs-dir", str(tmp_path / "runs"),
                 "--checkpoints-dir", str(tmp_path / "ckpt"), "--experiment", "cli")
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir.is_dir() and run_dir.parts[-3:] == ("cli", "resnet18", "finetune")
    assert "epoch 2/2" in result.stdout and "test accuracy" in result.stdout
    for name in ("checkpoints/best.pt", "evaluation.json", "predictions.csv"):
        assert (run_dir / name).is_file()
    assert runs.read_json(run_dir / runs.ENVIRONMENT_FILE)["synthetic_data"] is True  # what the trainer found
    assert list((tmp_path / "ckpt").glob("*.pt"))

    # the commands that read the run, in this process: torch is loaded here already, and a
    # fresh interpreter would spend most of its time importing it again
    from fer_core.cli import main
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    listing = capsys.readouterr().out
    assert "completed" in listing and str(run_dir) in listing
    assert main(["evaluate", str(run_dir)]) == 0 and "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("args,words", [
    (["train", "--data", "demo", "--epochs", "-1"], "epochs"),
    (["train", "--data", "demo", "--img-size", "4096"], "image size"),
    (["train", "--data", "demo", "--lr", "nan"], "learning rate must be a finite number"),
    (["train", "--data", "demo", "--experiment=-rf"], "experiment name must be a plain folder name"),
    (["train", "--data", "/no/such/folder"], "dataset not found"),
    (["train", "--data", "demo", "--exclude", "/no/such/list.json"], "exclusion list not found"),
    (["train", "--data", "demo", "--weights", "/no/such/resnet18.pth"], "weights file not found"),
    (["train", "--run-dir", "/no/such/run", "--epochs", "3"], "--run-dir"),
])
def test_errors_exit_non_zero_with_one_line(tmp_path, args, words):
    """Refused before anything is created, and without waiting for torch (4-5 s on a small CPU):
    the probe is `fer` itself, then the heavy libraries it loaded, on the last line of stdout."""
    probe = ("import sys\nfrom fer_core import cli\ncode = cli.main(sys.argv[1:])\n"
             f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", probe, *args, "--runs-dir", str(tmp_path / "runs")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "runs").exists()
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):  # with a GPU driver, torch counts the GPUs
        assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_help_and_subcommand_names_answer_without_loading_torch_or_the_servers(capsys):
    """`fer --help` lists every subcommand without importing the heavy libraries (it once took
    9 s on a 2-core machine); a subcommand's own help still shows its options."""
    probe = ("import contextlib, io, sys\n"
             "from fer_core import cli\n"
             "out = io.StringIO()\n"
             "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
             "    cli.main(['--help'])\n"
             f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])\n"
             "print(out.getvalue())\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    loaded, _, listing = result.stdout.partition("\n")
    assert loaded == "[]", result.stdout + result.stderr
    for command in ("train", "sweep", "ensemble", "doctor", "serve", "predict", "export"):
        assert command in listing
    from fer_core.cli import main  # in this process: torch is loaded here anyway
    for command, option in (("serve", "--backend"), ("doctor", "--near-threshold"), ("sweep", "--trials"),
                            ("ensemble", "--name"), ("predict", "--top-k")):
        with pytest.raises(SystemExit) as ended:
            main([command, "--help"])
        assert ended.value.code == 0 and option in capsys.readouterr().out, command


def test_resume_of_a_missing_run_and_resume_with_other_settings_are_refused(tmp_path):
    missing = cli("train", "--resume", str(tmp_path / "no-run"), timeout=120)
    assert missing.returncode != 0 and "cannot resume" in missing.stderr
    mixed = cli("train", "--resume", str(tmp_path / "no-run"), "--lr", "0.1", timeout=120)
    assert mixed.returncode != 0 and "only --epochs" in mixed.stderr


def test_run_dir_trains_the_queued_run_from_its_config_json(tiny_demo, tmp_path):
    """What the job runner starts: `train --run-dir RUN_DIR` and nothing else."""
    from conftest import tiny_config

    config = tiny_config(tiny_demo, tmp_path, experiment="queued", max_per_class=6, seed=7)
    run_dir = runs.new_run_dir(tmp_path / "runs", config.experiment, config.mode)
    runs.atomic_write_json(run_dir / runs.CONFIG_FILE, config.to_dict())
    result = cli("train", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip().splitlines()[-1]) == run_dir
    assert "epoch 2/2" in result.stdout and (run_dir / runs.EVALUATION_FILE).is_file()
    recorded = runs.read_json(run_dir / runs.CONFIG_FILE)
    assert {k: recorded[k] for k in ("experiment", "max_per_class", "seed", "img_size", "data")} == {
        "experiment": "queued", "max_per_class": 6, "seed": 7, "img_size": 32, "data": str(tiny_demo)}
    assert runs.find_run_dirs(tmp_path / "runs") == [run_dir]  # trained in place, no second folder


def test_download_without_credentials_is_a_clear_message_not_a_hang(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE")}
    env["KAGGLE_CONFIG_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "fer_core", "download", "--dest", str(tmp_path / "d")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "KAGGLE_API_TOKEN" in result.stderr and "Traceback" not in result.stderr


def test_resume_of_a_run_that_is_still_training_is_refused_and_leaves_it_alone(trained_run, tmp_path):
    import shutil

    run_dir = tmp_path / "runs" / "2030-01-01_00-00-00" / "busy" / runs.MODEL_NAME / "finetune"
    shutil.copytree(trained_run, run_dir)
    status = runs.read_json(run_dir / runs.STATUS_FILE)
    runs.atomic_write_json(run_dir / runs.STATUS_FILE, {**status, "state": "running", "pid": os.getpid(),
                                                        "finished_at": None})  # its trainer: alive
    before = {name: (run_dir / name).read_bytes() for name in (runs.STATUS_FILE, runs.METRICS_FILE)}
    result = cli("train", "--resume", str(run_dir), "--epochs", "3", timeout=120)
    assert result.returncode == 2 and "is running: it already has a trainer" in result.stderr, result.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("damage", ["corrupt", "zero-byte"])
def test_resume_from_a_corrupt_or_empty_last_pt_is_a_clear_error(trained_run, tmp_path, damage):
    """Issue #12 item 12: torch's own message advised `weights_only=False` (never to be done
    with an untrusted file), and a zero-byte file said only "error: EOFError: "."""
    import shutil

    run_dir = tmp_path / "runs" / "2030-01-01_00-00-00" / "copy" / runs.MODEL_NAME / "finetune"
    shutil.copytree(trained_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    last.unlink()  # best.pt is a hard link to the same bytes: leave it alone
    last.write_bytes(b"" if damage == "zero-byte" else b"PK\x03\x04 not really a zip" + os.urandom(512))
    before = (run_dir / runs.STATUS_FILE).read_bytes()
    result = cli("train", "--resume", str(run_dir), "--epochs", "3", timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "last.pt is not a safe fer_core checkpoint" in lines[0] and "corrupt" in lines[0]
    assert "weights_only=False" not in result.stderr + result.stdout
    assert lines[0] != "error: EOFError: "
    assert (run_dir / runs.STATUS_FILE).read_bytes() == before  # the run's record is untouched
    assert runs.load_run(run_dir).state == "completed"
