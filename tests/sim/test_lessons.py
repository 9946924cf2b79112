"""The lessons (docs/lessons/) are true: their commands run and print what they show.

A lesson page's ``console`` blocks hold commands (``$ ...``) and under each
the output it prints on stdout, up to the next command or the end of the
block; a block preceded by ``<!-- lesson-exit: N -->`` expects exit status N
from each of its commands, 0 otherwise. The commands of a page run in order,
as typed, with bash, in a scratch directory holding a copy of docs/lessons/
and an empty docs/images/lessons/: a trace or a plot a command writes lands
there, never over the committed picture. Each picture drawn must be one the
page shows and the repository holds, at the same size, and each picture the
page shows must be drawn by one of its commands. A fenced block preceded by
``<!-- lesson-file: PATH -->`` must be the file docs/lessons/PATH byte for
byte. ``pycon`` blocks are one doctest session per page.

Then the figures are held to what the lessons say of them: the tests near
the end recompute the theory (Erlang B, Poisson, Little's law) from the
scenario files and check the outputs shown, which the first tests have
checked against real runs.
"""

from __future__ import annotations

import doctest
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loble.sim import load_scenario

from .conftest import REPO

LESSONS = REPO / "docs" / "lessons"
IMAGES = REPO / "docs" / "images" / "lessons"
PAGES = sorted(page for page in LESSONS.glob("*.md") if page.name != "index.md")
FENCE = re.compile(
    r"(?:<!-- lesson-(?P<marker>file|exit): (?P<argument>[^>]*?) -->\n)?"
    r"```(?P<language>\w*)\n(?P<body>.*?)```",
    flags=re.DOTALL,
)
PICTURE = re.compile(r"\]\(\.\./images/lessons/([^)]+)\)")


@dataclass(frozen=True)
class Command:
    line: str
    output: str
    status: int

    def __str__(self) -> str:
        return self.line


def commands(page: Path) -> list[Command]:
    found = []
    for block in FENCE.finditer(page.read_text()):
        if block["language"] != "console":
            continue
        status = int(block["argument"]) if block["marker"] == "exit" else 0
        line: str | None = None
        output: list[str] = []
        for text in [*block["body"].splitlines(), "$ "]:
            if text.startswith("$ "):
                if line is not None:
                    found.append(Command(line, "\n".join(output), status))
                line, output = text[2:].strip(), []
            else:
                output.append(text)
    return found


def shown(page: Path, command: str) -> str:
    """The output the page shows under the (first) command that starts so."""
    return next(c.output for c in commands(page) if c.line.startswith(command))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path}: not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def page_id(page: Path) -> str:
    return page.stem


def test_every_lesson_has_commands_and_is_on_the_index() -> None:
    index = (LESSONS / "index.md").read_text()
    assert PAGES
    for page in PAGES:
        assert f"]({page.name})" in index, f"{page.name} is not on the lessons index"
        assert commands(page) or "```pycon" in page.read_text(), f"{page.name} runs nothing"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_shown_files_are_the_files(page: Path) -> None:
    for block in FENCE.finditer(page.read_text()):
        if block["marker"] == "file":
            path = LESSONS / block["argument"]
            assert path.is_file(), f"{page.name} shows {block['argument']}, which is not there"
            assert block["body"] == path.read_text(), f"{page.name}: {path.name} has changed"


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=page_id)
def test_commands_print_what_the_page_shows(page: Path, tmp_path: Path) -> None:
    shutil.copytree(LESSONS, tmp_path / "docs" / "lessons")
    drawn = tmp_path / "docs" / "images" / "lessons"
    drawn.mkdir(parents=True)
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("FORCE_COLOR", "COLUMNS", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    }
    # The venv's loble and python, as for a reader who activated it.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    for command in commands(page):
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command.line}"],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == command.status, f"{command}: {result.stderr}"
        lines = [line.rstrip() for line in result.stdout.rstrip("\n").splitlines()]
        assert "\n".join(lines) == command.output, f"{command} printed otherwise"
    pictures = set(PICTURE.findall(page.read_text()))
    assert {path.name for path in drawn.iterdir()} == pictures
    for name in pictures:
        assert png_size(IMAGES / name) == png_size(drawn / name), f"{name} is not what it draws"


@pytest.mark.parametrize("page", [p for p in PAGES if "```pycon" in p.read_text()], ids=page_id)
def test_python_sessions_run_as_shown(page: Path) -> None:
    session = "\n".join(
        block["body"] for block in FENCE.finditer(page.read_text()) if block["language"] == "pycon"
    )
    test = doctest.DocTestParser().get_doctest(session, {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.DONT_ACCEPT_TRUE_FOR_1)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


# -- every figure in the prose is one a command prints or a file shows ---------------------


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_decimal_in_the_prose_is_shown_by_a_block(page: Path) -> None:
    text = page.read_text()
    blocks = "\n".join(block["body"] for block in FENCE.finditer(text))
    prose = FENCE.sub("", text)
    for number in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose):
        assert number in blocks, f"{page.name}: {number} is in the prose, in no block"


# -- the figures against what the lessons say of them ---------------------------------------


def erlang_b(offered: float, servers: int) -> float:
    """Erlang's loss formula, from its definition: the share of time all ``servers``
    are busy, a^c/c! over the sum of a^k/k! (in logs, so nothing overflows)."""
    terms = [k * math.log(offered) - math.lgamma(k + 1) for k in range(servers + 1)]
    top = max(terms)
    return math.exp(terms[-1] - top) / sum(math.exp(term - top) for term in terms)


def poisson_busiest(mean: float, count: int) -> float:
    """E[max of ``count`` independent Poisson(``mean``)], as the sum of P(max > k)."""
    expected = 0.0
    for k in range(int(mean * 10) + 50):
        cdf = sum(math.exp(i * math.log(mean) - mean - math.lgamma(i + 1)) for i in range(k + 1))
        expected += 1 - cdf**count
    return expected


def rows(output: str, title: str) -> dict[str, list[str]]:
    """The rows of the table under the line of ``output`` that starts with ``title``."""
    lines = output.split(f"\n{title}", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {line.split()[0]: line.split()[1:] for line in lines}


def percent(cell: str) -> float:
    return float(cell.rstrip("%")) / 100


def test_balancers_measure_up_to_queueing_theory() -> None:
    page = LESSONS / "balancers.md"
    output = shown(page, "python docs/lessons/balancers/compare.py")
    capacity = load_scenario(LESSONS / "balancers" / "capacity.toml")
    clients, network = capacity.sim.clients, capacity.sim.network
    assert clients.arrival == "poisson" and clients.duration.kind == "exponential"
    assert network.latency.kind == "constant" and capacity.config.balancer.connect_retries == 0
    (fault,) = capacity.sim.faults
    assert fault.behaviour == "capacity" and fault.backend == "*" and fault.at == 0
    backends, limit = len(capacity.config.backends), fault.limit
    hold = clients.duration.mean + 2 * network.latency.value  # the connect and the close
    offered = clients.rate * hold / backends

    refused = {name: percent(cells[0]) for name, cells in rows(output, "capacity.toml").items()}
    alone, pooled = erlang_b(offered, limit), erlang_b(offered * backends, limit * backends)
    assert abs(refused["random"] - alone) <= 0.10 * alone
    assert pooled <= refused["least_connections"] <= 1.25 * pooled
    assert refused["p2c"] < refused["random"] / 4
    assert refused["least_connections"] < refused["round_robin"] < refused["random"]
    assert 5.5 < refused["random"] / refused["p2c"] < 6.5  # "a sixth"
    # The CLI's own count of the same seeds gives random's share.
    summary = shown(page, "loble sim docs/lessons/balancers/capacity.toml --runs 20")
    completed, failed = map(int, re.findall(r"complete (\d+), refused by Loble (\d+)", summary)[0])
    assert round(failed / (completed + failed), 4) == refused["random"]
    share = f"{refused['random']:.2%}"
    assert f"{failed} refused out of {failed} + {completed} arrivals is {share}" in page.read_text()

    spread = rows(output, "unlimited.toml")
    busiest = poisson_busiest(offered, backends) - offered
    assert abs(float(spread["random"][0]) - busiest) <= 0.10 * busiest
    assert float(spread["p2c"][0]) < float(spread["random"][0]) / 2
    assert float(spread["p2c"][-1]) < float(spread["random"][-1])  # peaks

    slow = load_scenario(LESSONS / "balancers" / "slow.toml")
    (fault,) = slow.sim.faults
    assert fault.behaviour == "slow" and slow.sim.clients.half_close == 1.0
    late, fast = 1 / (hold + 2 * fault.delay), 1 / hold  # the connect and the reply, late
    little = late / (late + (backends - 1) * fast)
    sent = {name: percent(cells[0]) for name, cells in rows(output, "slow.toml").items()}
    assert abs(sent["least_connections"] - little) <= 0.10 * little
    assert sent["round_robin"] == 0.25
    assert sent["p2c"] < 0.2


def test_thresholds_of_three_stop_the_flapping() -> None:
    page = LESSONS / "thresholds.md"
    pattern = r"seed (\d+): (\d+) transitions; \S+ refused (\d+) connects, was in rotation (\S+) s"
    counted = {
        threshold: re.findall(pattern, shown(page, f"loble sim {path} --runs 10"))
        for threshold, path in (
            (1, "docs/lessons/thresholds/threshold-1.toml"),
            (3, "docs/lessons/thresholds/threshold-3.toml"),
        )
    }
    assert len(counted[1]) == len(counted[3]) == 10
    for one, three in zip(counted[1], counted[3], strict=True):
        assert int(three[1]) == 3  # out, drained, back
        assert int(one[1]) >= 40  # "dozens"
        assert int(three[2]) == 3 < int(one[2])
        assert 0.4 < float(three[3]) / float(one[3]) < 0.6  # "about half as long"


def test_the_drain_is_safe_in_the_lines_shown() -> None:
    page = LESSONS / "drain.md"
    window = shown(page, "sed -n").splitlines()
    assert window and all(
        '"backend":"10.0.7.2:80"' in line for line in window if "ConnectBackend" in line
    )
    closed = [line for line in window if "ConnectionClosed" in line]
    assert closed and all(
        '"backend":"10.0.7.1:80","outcome":"completed"' in line for line in closed
    )
    assert '"new":"draining"' in shown(page, "grep '\"step\":22,'")
    assert '"new":"unhealthy","reason":"drained' in shown(page, "grep '\"step\":58,'")


def test_a_balancer_of_ones_own_is_checked_and_its_bug_caught(tmp_path: Path) -> None:
    page = LESSONS / "own-balancer.md"
    ours = shown(page, "python docs/lessons/own-balancer/run.py LeastOfThree")
    three, two = map(float, re.findall(r"refused (\S+)% \(p2c: (\S+)%\)", ours)[0])
    assert three < two
    forgetful = shown(page, "python docs/lessons/own-balancer/run.py Forgetful")
    assert "capacity.toml: 10 runs, every invariant held" in forgetful
    # The step it fails at is the one the draining lesson reads.
    step = re.findall(r"drain.toml: .*\n(?:.*\n)*?.*step (\d+) .*while DRAINING", forgetful)
    assert step and f"grep '\"step\":{step[0]},'" in (LESSONS / "drain.md").read_text()
    # "drop the exclude parameter from pick and mypy says so"
    folder = tmp_path / "own-balancer"
    shutil.copytree(LESSONS / "own-balancer", folder)
    source = (folder / "least_of_three.py").read_text()
    broken = source.replace("        exclude: Collection[str] = (),\n", "")
    assert broken != source
    (folder / "least_of_three.py").write_text(broken.replace("b.address not in exclude", "b"))
    mypy = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(folder / "run.py")]
    result = subprocess.run(mypy, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stdout
    assert '"type[LeastOfThree]"; expected "str": "Callable[[Random], Balancer]"' in result.stdout


def erlang_c(offered: float, servers: int) -> float:
    """Erlang's delay formula, from its definition: the last term of B's sum
    weighted c/(c - a), over the same sum with that weight on its last term."""
    terms = [k * math.log(offered) - math.lgamma(k + 1) for k in range(servers + 1)]
    top = max(terms)
    weights = [math.exp(term - top) for term in terms]
    waiting = weights[-1] * servers / (servers - offered)
    return waiting / (sum(weights[:-1]) + waiting)


def test_the_queue_measures_up_to_erlang_c_and_b() -> None:
    page = LESSONS / "queue.md"
    output = shown(page, "python docs/lessons/queue/compare.py")
    pool = load_scenario(LESSONS / "queue" / "pool.toml")
    clients, network, balancer = pool.sim.clients, pool.sim.network, pool.config.balancer
    assert clients.arrival == "poisson" and clients.duration.kind == "exponential"
    assert network.latency.kind == "constant" and balancer.connect_retries == 0
    assert not pool.sim.faults and balancer.queue_timeout >= 60 and balancer.queue_size >= 1000
    places = sum(backend.max_connections for backend in pool.config.backends)
    hold = clients.duration.mean + 2 * network.latency.value  # the connect and the close
    offered = clients.rate * hold
    delay, lost = erlang_c(offered, places), erlang_b(offered, places)
    mean_wait = delay * hold / (places - offered)
    assert f"Erlang C({offered:.2f}, {places}) = {delay:.1%} wait" in output
    assert f"{mean_wait * 1000:.1f} ms on average" in output
    assert f"Erlang B({offered:.2f}, {places}) = {lost:.2%} refused" in output
    waited = rows(output, "with the queue")
    refused = rows(output, "queue_size = 0")
    assert set(waited) == set(refused) == {"round_robin", "random", "least_connections", "p2c"}
    for name, cells in waited.items():
        assert abs(percent(cells[0]) - delay) <= 0.10 * delay, name  # one pool, any balancer
        assert abs(float(cells[1]) / 1000 - mean_wait) <= 0.20 * mean_wait, name
        assert abs(percent(refused[name][0]) - lost) <= 0.10 * lost, name
