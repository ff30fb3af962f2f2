"""run-local's time split: training and validation from results.csv, evaluations from metrics.json."""

import json

from pipelines.__main__ import overhead_summary


def test_overhead_split_counts_each_evaluation_once(tmp_path):
    run = tmp_path / "run"
    (run / "evaluations" / "block0").mkdir(parents=True)
    (run / "results.csv").write_text("epoch,total,train_s,val_s\n0,0.2,30.0,2.0\n1,0.1,28.0,0\n")
    evaluation = {"seconds": 4.0, "per_class": [{"class": "a", "ap": 0.5}]}
    (run / "evaluations" / "block0" / "metrics.json").write_text(json.dumps(evaluation))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "metrics.json").write_text(json.dumps({**evaluation, "seconds": 6.0}))
    (tmp_path / "copy").mkdir()  # the same evaluation published twice counts once
    (tmp_path / "copy" / "metrics.json").write_text(json.dumps(evaluation))
    line = overhead_summary(tmp_path, wall=100.0)
    assert "training 58 s, validation 2 s, evaluation 10 s (2 steps)" in line
    assert "30 s = 30.0 % of 100 s" in line and "kfp.local" not in line
    steps = {"prepare-dataset": 1.0, "train-block": 45.0, "evaluate": 7.0, "train-block-2": 20.0,
             "evaluate-2": 8.0, "report": 2.0}
    split = overhead_summary(tmp_path, wall=100.0, steps=steps)
    assert split.startswith(line)  # the same first line, then where the 30 s went
    # train blocks 65 s - (58 + 2) inside their loops; evaluations 15 s - (4 + 6); 17 s of steps left 17 s between
    assert split.endswith("outside the loops, by step: prepare-dataset 1 s, train-block x2 5 s, evaluate x2 5 s, "
                          "report 2 s; start-up and between steps 17 s")


def test_process_age_counts_from_the_interpreter_start():
    """run-local's clock starts with the process: its start-up and imports count as overhead."""
    import subprocess
    import sys

    code = "import time; time.sleep(0.6); from pipelines.__main__ import process_age; print(process_age())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert 0.6 <= float(out.stdout) < 30


def test_overhead_without_results_is_all_overhead(tmp_path):
    assert "everything else (start-up, imports, staging, plots, report) 5 s = 100.0 % of 5 s" in \
        overhead_summary(tmp_path, wall=5.0)


def test_epochs_stream_to_the_console_while_a_step_runs(tmp_path, monkeypatch):
    """The trainer appends a line per epoch to $KFYOLO_PROGRESS; run-local's tail echoes each one."""
    import io
    import threading

    from pipelines.__main__ import tail_progress
    from trainer.runlog import RunLogger

    progress = tmp_path / "progress.log"
    progress.touch()
    console, stop = io.StringIO(), threading.Event()
    tail = threading.Thread(target=tail_progress, args=(progress, console, stop, 0.05))
    tail.start()
    monkeypatch.setenv("KFYOLO_PROGRESS", str(progress))
    (tmp_path / "run").mkdir()
    logger = RunLogger(tmp_path / "run", ["a"], tensorboard=False)
    logger.epoch_end(0, {"box": 0.1, "obj": 0.02, "cls": 0.03, "total": 0.15, "train_s": 9.6, "val_s": 0.0})
    logger.epoch_end(1, {"box": 0.09, "obj": 0.02, "cls": 0.03, "total": 0.14, "precision": 0.5, "recall": 0.4,
                         "map50": 0.321, "map": 0.2, "train_s": 9.0, "val_s": 2.2})
    logger.close()
    stop.set()
    tail.join(timeout=5)
    lines = console.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("epoch 0: box 0.1000  obj 0.0200  cls 0.0300  (10 s)")
    assert "epoch 1: box 0.0900" in lines[1] and "mAP@.5 0.321  mAP@.5:.95 0.200  (11 s)" in lines[1]
    monkeypatch.setenv("KFYOLO_PROGRESS", str(tmp_path / "no" / "such" / "dir" / "p.log"))
    (tmp_path / "run2").mkdir()
    quiet = RunLogger(tmp_path / "run2", ["a"], tensorboard=False)
    quiet.epoch_end(0, {"total": 0.1})  # an unwritable progress file never fails training
    quiet.close()


def test_exit_now_flushes_what_was_written_and_keeps_the_code():
    """CLIs leave with os._exit (no interpreter teardown); nothing buffered may be lost on the way.
    Block-buffered pipes, as under torchrun or kfp: PYTHONUNBUFFERED would hide a missing flush."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "from trainer.runlog import exit_now\n"
            "print('out', end='')\n"
            "sys.stderr.write('err')\n"
            "exit_now(3)\n"
            "print('never')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out", "err")


def test_step_printer_times_each_step_and_shows_one_line_per_step():
    """run-local's console: a line as each step starts and ends; the durations feed the split."""
    import io

    from pipelines.__main__ import StepPrinter

    console, log = io.StringIO(), io.StringIO()
    printer = StepPrinter(console, log)
    printer.write("10:00:00.000 - INFO - Executing task \x1b[96m'train-block'\x1b[0m\n    noise from the step\n")
    printer.write("    [kfyolo] block 0: trained\n10:00:01.000 - INFO - Task 'train-block' finished with status \x1b[92mSUCCESS\x1b[0m\n")
    printer.write("10:00:01.000 - INFO - Executing task 'evaluate'\n10:00:02.000 - INFO - Task 'evaluate' finished with status FAILURE\n")
    assert set(printer.durations) == {"train-block", "evaluate"} and all(0 <= t < 5 for t in printer.durations.values())
    lines = [ln[10:] for ln in console.getvalue().splitlines()]  # after the HH:MM:SS stamp
    assert lines == ["... train-block", "    block 0: trained", "ok  train-block (0 s)", "... evaluate", "FAILED evaluate (0 s)"]
    assert "\x1b" not in log.getvalue() and "noise from the step" in log.getvalue()
