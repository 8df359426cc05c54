"""Runs here: each run a ``fit`` in a subprocess in its own directory, several at a time.

Beside what ``fit`` writes into the run directory (``config.yaml``, ``checkpoints/``, TensorBoard events,
``metrics.json``, ``flops.json``) the runner writes ``run.json`` (its settings), ``command.txt`` (the exact command,
to re-run it by hand), ``stdout.log`` / ``stderr.log``, ``attempts.jsonl`` and, when it ends, ``done.json`` (status,
wall-clock seconds, final metrics; a failure keeps the last lines of stderr). A finished run is skipped, an
interrupted or failed one resumes from ``checkpoints/last.ckpt`` (``--ckpt_path``), a failed one without a
checkpoint starts again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from lit_transfusion.commands.sweep.expand import Run, fit_args, run_dir
from lit_transfusion.commands.sweep.results import final_metrics
from lit_transfusion.commands.sweep.schema import Sweep


def cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_done(directory: Path) -> dict | None:
    path = directory / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(directory: Path) -> bool:
    return (read_done(directory) or {}).get("status") == "finished"


def run_one(sweep: Sweep, run: Run, out: str | Path, threads: int, cwd: str | Path | None = None) -> dict:
    """Run (or skip, or resume) one run in a subprocess; returns its done.json record (``status`` "skipped"
    when it had finished before)."""
    directory = run_dir(out, sweep, run)
    if is_finished(directory):
        return {**read_done(directory), "status": "skipped"}
    directory.mkdir(parents=True, exist_ok=True)
    cwd = Path(cwd or Path.cwd()).resolve()
    last = directory / "checkpoints" / "last.ckpt"
    ckpt = last if last.is_file() else None
    command = [sys.executable, "-m", "lit_transfusion", *fit_args(sweep, run, out, ckpt)]
    info = {"sweep": sweep.name, "index": run.index, "run_id": run.run_id, "variant": run.variant,
            "family": run.family, "budget": run.budget, "settings": run.settings, "seed": run.seed,
            "metrics": sweep.metrics, "compare": sweep.compare, "base": sweep.base, "overrides": sweep.overrides,
            "args": fit_args(sweep, run, out)}
    (directory / "run.json").write_text(json.dumps(info, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    (directory / "command.txt").write_text(f"cd {shlex.quote(str(cwd))} && OMP_NUM_THREADS={threads} "
                                           f"MKL_NUM_THREADS={threads} {shlex.join(command)}\n")
    start = time.time()
    returncode, tail = _execute(command, cwd, env, directory, start)
    seconds = time.time() - start
    attempt = {"started": start, "seconds": seconds, "returncode": returncode,
               "resumed_from": str(ckpt) if ckpt else None}
    with open(directory / "attempts.jsonl", "a") as f:
        f.write(json.dumps(attempt) + "\n")
    attempts = [json.loads(line) for line in (directory / "attempts.jsonl").read_text().splitlines() if line]
    done = {"status": "finished" if returncode == 0 else "failed", "returncode": returncode,
            "seconds": sum(a["seconds"] for a in attempts), "attempts": len(attempts),
            "final": final_metrics(directory)}
    if returncode != 0:
        done["error"] = tail
    (directory / "done.json").write_text(json.dumps(done, indent=2))
    return done


def _execute(command: list[str], cwd: Path, env: dict, directory: Path, start: float) -> tuple[int, list[str]]:
    """Run ``command`` with its output appended to stdout.log / stderr.log; (exit status, last stderr lines)."""
    header = f"==== {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))}: {shlex.join(command)}\n"
    with open(directory / "stdout.log", "a") as out, open(directory / "stderr.log", "a") as err:
        out.write(header)
        err.write(header)
        out.flush()
        err.flush()
        offset = err.tell()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:  # the run got the same signal: give it time to write its checkpoint
            try:
                proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
            raise
    with open(directory / "stderr.log", errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in re.split(r"[\r\n]", f.read()) if line.strip()]
    return returncode, lines[-20:]


def run_local(sweep: Sweep, runs: list[Run], out: str | Path, parallel: int) -> list[dict]:
    """Run ``runs`` here, ``parallel`` at a time with cores // parallel threads each (a run that runs alone, the
    first of its data: every core); returns their records."""
    todo = [r for r in runs if not is_finished(run_dir(out, sweep, r))]
    threads = max(1, cores() // max(1, min(parallel, len(todo))))  # one run left (--only i): all the cores
    for run in runs:
        if run not in todo:
            print(f"[{run.index}] {run.run_id}: finished before, skipped", flush=True)
    print(f"{len(todo)} of {len(runs)} runs to go, {max(1, min(parallel, len(todo)))} at a time, "
          f"{threads} threads each", flush=True)

    def one(run: Run, alone: bool) -> dict:
        resumed = (run_dir(out, sweep, run) / "checkpoints" / "last.ckpt").is_file()
        n = max(threads, cores()) if alone else threads
        print(f"[{run.index}] {run.run_id}: {'resuming' if resumed else 'starting'}"
              + (f" alone, {n} threads (the first run of its data)" if alone and n != threads else ""), flush=True)
        done = run_one(sweep, run, out, n)
        why = f" (exit {done['returncode']}): {done['error'][-1] if done.get('error') else ''}"
        print(f"[{run.index}] {run.run_id}: {done['status']} after {done['seconds']:.0f} s"
              + (why if done["status"] == "failed" else ""), flush=True)
        return done

    warm = {_data_key(r) for r in runs if r not in todo}
    records = schedule(todo, parallel, one, warm)
    return sorted(records, key=lambda d: d["index"])


def _data_key(run: Run) -> str:
    """What a datamodule's caches depend on among a run's own settings: its data.* keys (the run's seed goes to
    the trainer and the model, not to the data)."""
    return json.dumps(sorted((k, v) for k, v in run.settings.items() if k.startswith("data.")), default=str)


def schedule(todo: list[Run], parallel: int, one, warm: set[str]) -> list[dict]:
    """Run ``one(run, alone)`` for each run, up to ``parallel`` at once, in order, except that a run whose data
    settings (:func:`_data_key`) no run has finished with yet runs alone (``alone=True``: it may take every core):
    datamodules write their caches (rendered data, tokenizers) on first use, and two runs writing one cache file
    at once could read each other's half-written file. Runs whose data is ready start ahead of a run that waits."""
    warm = set(warm)  # data keys some run has finished with
    records: list[dict] = []
    todo = list(todo)
    with ThreadPoolExecutor(parallel) as pool:
        running: dict = {}
        alone = False  # a run of cold data is running: nothing joins it
        while todo or running:
            for run in list(todo):
                if alone or len(running) >= parallel:
                    break
                if _data_key(run) in warm or not running:
                    alone = _data_key(run) not in warm
                    running[pool.submit(one, run, alone)] = run
                    todo.remove(run)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                records.append({**future.result(), "index": run.index})
                if records[-1]["status"] == "finished":
                    warm.add(_data_key(run))
            alone = alone and bool(running)
    return records
