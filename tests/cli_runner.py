"""Running the `hf-fam` console script in the tests without paying for its imports on every call.

Every `hf-fam` command that touches a model imports torch and transformers first: 3-5 s on 2 cores, before it does
anything, and the CLI tests run about a hundred commands. `run` forks each command from a zygote instead: a process
started once per test worker, with the environment the commands run in, that has imported those modules and has never
run a torch operation (so no thread pool crosses a fork). The forked child is the console script: `hf_fam.cli.main`
with its own stdin (empty), stdout and stderr at the file-descriptor level and the caller's working directory, and the
console script's exit code. A command with another environment (hf_hub and transformers read some variables when
they are imported) runs the installed `hf-fam` script in a real subprocess, and so does every call with `fork=False`;
`test_cli_runner.py` checks that both give the same output.
"""

import atexit
import json
import locale
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HF_FAM = str(Path(sys.executable).with_name("hf-fam"))
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def _universal_newlines(data: bytes) -> str:
    """What `subprocess.run(..., text=True)` makes of a stream's bytes."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


class _Zygote:
    def __init__(self, env: dict):
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_zygote.py"))], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        self.replies = self.process.stdout
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.replies, selectors.EVENT_READ)

    def _reply(self, deadline: float | None) -> dict | None:
        """The zygote's next line as a dict, or None when `deadline` (time.monotonic) passes first."""
        if deadline is not None and not self.selector.select(max(0.0, deadline - time.monotonic())):
            return None
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"the hf-fam test zygote exited (code {self.process.poll()}); run the test with fork=False to see why")
        return json.loads(line)

    def run(self, args: list[str], cwd: str, timeout: float | None) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="hf-fam-cli-") as folder:
            stdout, stderr = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"argv": args, "cwd": cwd, "stdout": str(stdout), "stderr": str(stderr)}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
            child = self._reply(None)["pid"]
            deadline = None if timeout is None else time.monotonic() + timeout
            reply = self._reply(deadline)
            if reply is None:  # as subprocess.run does on a timeout: kill the command, then raise
                os.kill(child, 9)
                self._reply(None)
                raise subprocess.TimeoutExpired([HF_FAM, *args], timeout, stdout.read_bytes(), stderr.read_bytes())
            return subprocess.CompletedProcess(
                [HF_FAM, *args], reply["returncode"], _universal_newlines(stdout.read_bytes()), _universal_newlines(stderr.read_bytes())
            )

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


_zygote: _Zygote | None = None


def run(*args, env: dict | None = None, cwd=None, timeout: float | None = 600, fork: bool = True) -> subprocess.CompletedProcess:
    """`hf-fam ARGS` as `subprocess.run(..., capture_output=True, text=True)` returns it (in OFFLINE_ENV by default)."""
    global _zygote
    args = [str(arg) for arg in args]
    if not fork or (env is not None and env != OFFLINE_ENV):
        return subprocess.run([HF_FAM, *args], capture_output=True, text=True, timeout=timeout, env=env or OFFLINE_ENV, cwd=cwd)
    if _zygote is None or _zygote.process.poll() is not None:
        _zygote = _Zygote(OFFLINE_ENV)
        atexit.register(_zygote.close)
    return _zygote.run(args, os.path.abspath(cwd or os.getcwd()), timeout)
