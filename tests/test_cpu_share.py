"""Torch's threads on a shared CPU (lmlab.cpu_share): changed only when other tasks run, never against the user's
own settings, and set before torch loads its OpenMP runtime."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmlab.cpu_share import others_running, plan


def test_an_idle_machine_keeps_openmps_defaults():
    assert plan({}, cores=2, others=0.0, threads_given=False) == {}
    assert plan({}, cores=2, others=None, threads_given=False) == {}  # not Linux: nothing known, nothing changed


@pytest.mark.parametrize(("cores", "others", "threads"), [(2, 1, "1"), (2, 2, "1"), (2, 5, "1"), (8, 3, "5")])
def test_a_busy_machine_gets_a_thread_per_free_core_that_sleeps_when_idle(cores, others, threads):
    chosen = plan({}, cores=cores, others=float(others), threads_given=False)
    assert chosen["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": threads}
    assert f"{others} other task(s) running on {cores} core(s): torch uses {threads} thread(s)" in chosen["message"]


def test_the_users_own_settings_win():
    assert plan({"OMP_NUM_THREADS": "2"}, 2, 1.0, False)["env"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert plan({}, 2, 1.0, threads_given=True)["env"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert plan({"GOMP_SPINCOUNT": "1000"}, 2, 1.0, False)["env"] == {"OMP_NUM_THREADS": "1"}
    assert plan({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}, 2, 1.0, False) == {}
    assert plan({"LMLAB_SHARE_CPU": "0"}, 2, 3.0, False) == {}


def test_runnable_tasks_are_read_from_proc_loadavg_without_the_reader(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.44 2.11 2.29 4/97 4175\n")
    assert others_running(samples=3, interval=0, loadavg=loadavg) == 3.0
    loadavg.write_text("0.01 0.02 0.00 1/97 4175\n")
    assert others_running(samples=3, interval=0, loadavg=loadavg) == 0.0
    assert others_running(loadavg=tmp_path / "missing") is None


@pytest.mark.parametrize("command", [["run", "mu", "--preset", "no-such-preset"], ["report", "no-such-dir"]])
def test_the_command_decides_before_torch_loads_and_a_bad_input_stays_one_line(command):
    script = ("import os, sys\nimport lmlab.cpu_share as c\nc.others_running = lambda: 1.0\nimport lmlab.cli as cli\n"
              f"code = cli.main({command!r})\n"
              "print(code, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "LMLAB_SHARE"))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    computes = command[0] == "run"
    assert done.stdout.split() == ["2", *(["PASSIVE", "1"] if computes else ["None", "None"])]
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("lmlab: error:")
