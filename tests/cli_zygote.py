"""The zygote `cli_runner` forks `hf-fam` commands from (see there). Started as a script with the commands' environment.

Protocol, one JSON object per line: a request {"argv", "cwd", "stdout", "stderr"} on stdin; replies {"pid"} as soon as
the command's process exists, then {"returncode"} when it has exited. Stdin's end stops the zygote.
"""

import json
import os
import sys

sys.path.pop(0)  # this folder: the console script's sys.path does not have the tests on it
replies = os.fdopen(os.dup(1), "w")  # stdout carries replies only: anything the imports print goes to /dev/null
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

# What a command imports before it does anything; nothing here may run a torch operation (no thread pool, no fork
# hazard). The model modules load lazily in transformers, so the families the tests use are touched here too.
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402,F401

import hf_fam.card  # noqa: E402,F401
import hf_fam.cli  # noqa: E402
import hf_fam.modeling_fam  # noqa: E402,F401


def run_command(request: dict) -> int:
    """In the forked child: `hf-fam ARGV` as the console script runs it, with its exit code."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdin = open(0, closefd=False)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.argv = ["hf-fam", *request["argv"]]
    try:
        os.chdir(request["cwd"])
        code = hf_fam.cli.main(request["argv"])  # the console script is `sys.exit(main())`
    except SystemExit as exit:
        code = exit.code
    except BaseException:  # what the interpreter does with an uncaught exception: the traceback, exit code 1
        import traceback

        traceback.print_exc()
        code = 1
    if code is None:
        return 0
    if not isinstance(code, int):
        print(code, file=sys.stderr)
        return 1
    return code


def main():
    for line in sys.stdin.buffer:
        request = json.loads(line)
        for stream in (sys.stdout, sys.stderr, replies):  # nothing buffered here may reach a command's output
            stream.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            code = 1
            try:
                code = run_command(request)
            finally:
                import atexit

                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
