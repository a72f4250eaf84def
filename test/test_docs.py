"""The README and docs/ say what the code does: its snippets run, its commands parse,
its tables are what the benchmarks' results files say, and every flag is documented."""
import dataclasses
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from droidspeak.cli import build_parser
from droidspeak.config import EngineConfig

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import report  # noqa: E402

# A fenced block, with the `<!-- test_docs: why -->` line before it when it is not run.
BLOCK = re.compile(r"(?:<!-- test_docs: ([^>]*) -->\n)?```(bash|python)\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[str, str, str | None]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return [(lang, body, why or None) for why, lang, body in BLOCK.findall(f.read())]


def droidspeak_commands(body: str) -> list[list[str]]:
    """A bash block's `droidspeak` commands, continuation lines joined, comments and `&` dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [shlex.split(line.split(" #")[0].rstrip(" &")) for line in joined.splitlines()
            if line.startswith("droidspeak ")]


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 200


def test_readme_commands_parse():
    """Every `droidspeak ...` command in the README (run or not) parses with the real CLI."""
    parser, seen = build_parser(), 0
    for lang, body, _ in readme_blocks():
        if lang != "bash":
            continue
        for argv in droidspeak_commands(body):
            args = parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown flag
            assert callable(args.func)
            seen += 1
    assert seen >= 6


def test_every_engine_flag_is_documented():
    with open(os.path.join(ROOT, "docs", "serving.md")) as f:
        doc = f.read()
    singular = {"models": "--model", "remote_senders": "--remote-sender"}  # repeatable flags
    flags = {singular.get(f.name, "--" + f.name.replace("_", "-")) for f in dataclasses.fields(EngineConfig)}
    missing = sorted(f for f in flags if f"`{f}" not in doc)
    assert not missing, f"flags missing from docs/serving.md's table: {missing}"


def test_report_check_passes():
    assert report.main(["--check"]) == 0


def test_report_check_catches_a_hand_edit(tmp_path, monkeypatch, capsys):
    """Editing one number of a generated table by hand makes --check fail."""
    for rel in ("README.md", "docs", os.path.join("benchmark", "results")):
        src, dst = os.path.join(ROOT, rel), tmp_path / rel
        shutil.copytree(src, dst) if os.path.isdir(src) else shutil.copy(src, dst)
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    assert report.main(["--check"]) == 0
    path = tmp_path / "docs" / "benchmarks.md"
    text = path.read_text()
    table = text[text.index("<!-- report:one_batch -->"):text.index("<!-- /report:one_batch -->")]
    row = next(line for line in table.splitlines() if line.startswith("| decode | 16 |"))
    speedup = row.rstrip(" |").rsplit("| ", 1)[1]
    path.write_text(text.replace(row, row.replace(speedup, "9.99x")))
    assert report.main(["--check"]) == 1
    assert "9.99x" in capsys.readouterr().out
    assert report.main([]) == 0 and report.main(["--check"]) == 0  # regenerating repairs it
    assert "9.99x" not in path.read_text()


def test_no_benchmark_logs_in_code_comments():
    """Measurements and machine histories live in docs/, not in code."""
    pattern = re.compile(r"\b(Intel|Zen 4|EPYC|AMX) VM\b|side run|this VM|earlier session|latest session")
    hits = []
    for top in ("python", "csrc"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith((".py", ".cpp", ".h")):
                    with open(os.path.join(dirpath, name)) as f:
                        hits += [f"{name}:{i}" for i, line in enumerate(f, 1) if pattern.search(line)]
    assert not hits, hits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_snippets_run(tmp_path, default_model_path):
    """The README's snippets that need no fine-tunes or Redis run as written: the
    offline example, then the server example with the OpenAI client against it."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    port = str(free_port())
    run = [(lang, body.replace("30000", port)) for lang, body, why in readme_blocks() if why is None]
    assert [lang for lang, _ in run] == ["python", "bash", "python"], "README's runnable snippets changed"
    offline = subprocess.run([sys.executable, "-c", run[0][1]], env=env, capture_output=True, text=True,
                             timeout=600)
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert "Paris" in offline.stdout
    # files, not pipes: the server started in the background keeps them open
    stdout, stderr = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    server = subprocess.Popen(["bash", "-e", "-c", run[1][1]], env=env, stdout=stdout, stderr=stderr,
                              text=True, start_new_session=True)
    try:
        server.wait(timeout=300)  # bash returns after its curl; the server runs on
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
        assert server.returncode == 0, err[-3000:]
        assert '"text"' in out and "meta_info" in out, out
        client = subprocess.run([sys.executable, "-c", run[2][1]], env=env, capture_output=True, text=True,
                                timeout=300)
        assert client.returncode == 0, client.stderr[-3000:]
        assert client.stdout.strip()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(server.pid, signal.SIGKILL)
