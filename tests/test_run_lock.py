"""One writer per run: a second writer fails at once naming the holder; a lock left by a
killed process does not block."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from modnet import io
from modnet.cli import main
from tests.test_run_dir import train_args

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from modnet import io\n"
    "with io.open_run(sys.argv[1], 'modnet train'):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(300)\n"
)


def test_a_second_writer_fails_naming_the_holder_and_a_killed_holder_does_not_block(
    tmp_path, capsys
):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_args(out)) == 2
        err = capsys.readouterr().err
        assert "is being written by another process" in err
        assert f"pid {holder.pid} on {socket.gethostname()}" in err and "modnet train" in err
        assert io.latest_checkpoint(out) is None  # the second writer wrote nothing
        # the refused command is named as the one waiting, not as the one writing
        assert main(["discard", str(out)]) == 2
        err = capsys.readouterr().err
        assert "`modnet train` since" in err and "before this modnet discard:" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(train_args(out)) == 0  # the dead holder's lock is gone with it
    assert io.load_trainer_state(io.latest_checkpoint(out))["done"]
