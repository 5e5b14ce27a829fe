"""The README is tested: its Python code blocks run, and every `diffprune COMMAND` (and --option) it names exists.

The Python blocks are the README's "your own weights" example. They name the reader's files with placeholder paths;
the test replaces each quoted placeholder by a file it makes with the library, and runs the blocks otherwise
unchanged, in order, in one namespace, from a temporary working directory (files the blocks write land there):

    "path/to/stable-diffusion-v1-5"  a tiny Stable Diffusion pipeline directory (zoo.pipelines.save_tiny_sd_pipeline)
    "sd15_dipgo_0.8.json"            a schedule made for that pipeline by search_schedule (DeepCache: no training)
    "sd15-pruned-0.3"                its UNet pruned by prune(..., criterion="magnitude"), written by save_pruned

A placeholder missing from the README fails the test (rename it here too), so the example cannot silently drift
away from what is run.
"""
import argparse
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = ROOT / "README.md"
PIPELINE, SCHEDULE, PRUNED = "path/to/stable-diffusion-v1-5", "sd15_dipgo_0.8.json", "sd15-pruned-0.3"
def _text():
    return README.read_text()


def _fenced(text, lang=None):
    """(language, body) of every fenced code block."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)
    return [(lg, body) for lg, body in blocks if lang is None or lg == lang]


def _inline(text):
    """Inline code spans outside fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


# ----- the Python example ---------------------------------------------------------------------------------------

def test_quick_start_block():
    lang, body = _fenced(_text())[0]
    lines = [ln.split("#")[0].strip() for ln in body.splitlines()]
    assert lang == "bash" and lines == ["bash scripts/setup.sh && .venv/bin/diffprune demo", "bash scripts/test.sh"]


def test_python_blocks_run_on_a_local_pipeline(tmp_path, monkeypatch):
    import diffusers
    from PIL import Image

    import diffprune
    from diffprune.zoo.pipelines import save_tiny_sd_pipeline, tiny_sd_pipeline

    blocks = [body for _, body in _fenced(_text(), "python")]
    code = "\n".join(blocks)
    assert blocks, "the README has no Python example"
    for placeholder in (PIPELINE, SCHEDULE, PRUNED):
        assert f'"{placeholder}"' in code, f"README's Python blocks no longer use the placeholder {placeholder!r}"

    files = tmp_path / "files"
    pipeline_dir = save_tiny_sd_pipeline(files / "tiny-sd-pipeline")
    made = tiny_sd_pipeline()  # the same architecture as the saved one: a schedule for it fits the loaded one
    schedule = diffprune.search_schedule(made, "deepcache", interval=3, steps=50, sampler="plms", progress=False)
    schedule.save(files / "schedule.json")
    unet, _ = diffprune.prune(made.unet, 0.3, criterion="magnitude", progress=False)
    diffprune.save_pruned(unet, files / "pruned")
    paths = {PIPELINE: pipeline_dir, SCHEDULE: files / "schedule.json", PRUNED: files / "pruned"}

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ns = {}
    for i, body in enumerate(blocks):
        for placeholder, path in paths.items():
            body = body.replace(f'"{placeholder}"', repr(str(path)))
        exec(compile(body, f"README.md python block {i + 1}", "exec"), ns)

    pipe = ns["pipe"]
    assert isinstance(ns["image"], Image.Image) and ns["image"].size == (16, 16)
    assert type(pipe) is diffusers.StableDiffusionPipeline  # the runtime's hooks are gone after the with-block
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(p.numel() for p in unet.parameters())
    written = list(work.glob("*.json"))  # the block's schedule.save(...)
    assert len(written) == 1 and diffprune.Schedule.load(written[0]).n_calls == 51  # PLMS 50 steps


# ----- the commands ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def commands():
    """{subcommand: its option strings}: names parsed from `diffprune --help`, options from the same parser."""
    out = subprocess.run([sys.executable, "-m", "diffprune", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^ {4}([a-z][\w-]*)(?: |$)", out.stdout, flags=re.M))
    from diffprune.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert listed == set(sub.choices), f"--help lists {sorted(listed)}, the parser has {sorted(sub.choices)}"
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def _mentions(text):
    """(command, options named with it, where) for every `diffprune COMMAND ...` in code blocks, inline code and
    the command table, and for inline spans like `bench --no-strict`."""
    found = []
    for lang, body in _fenced(text):
        if lang == "python":
            continue
        body = body.replace("\\\n", " ")  # continued shell lines
        for line in body.splitlines():
            for m in re.finditer(r"(?:^|[\s/$])diffprune[ \t]+([a-z][\w-]*)([^#|&;]*)", line):
                found.append((m.group(1), re.findall(r"(--[a-z][\w-]*)", m.group(2)), line.strip()))
    for span in _inline(text):
        m = re.match(r"(?:\S*diffprune[ \t]+)?([a-z][\w-]*)(.*)$", span)
        if m and (span.startswith(("diffprune ", ".venv/bin/diffprune ")) or "--" in m.group(2)):
            found.append((m.group(1), re.findall(r"(--[a-z][\w-]*)", m.group(2)), span))
    for row in re.findall(r"^\| `diffprune ([a-z][\w-]*)[^|]*\|(.*)$", text, flags=re.M):
        found.append((row[0], re.findall(r"`(--[a-z][\w-]*)", row[1]), f"table row {row[0]}"))
    quick = re.search(r"^## Quick start\n(.*?)^## ", text, flags=re.M | re.S)  # the demo's options, listed there
    if quick:
        found.append(("demo", re.findall(r"`(--[a-z][\w-]*)", quick.group(1)), "Quick start options"))
    return found


def _check(mentions, commands):
    bad = []
    for cmd, options, where in mentions:
        if cmd not in commands:
            bad.append(f"{where}: no subcommand {cmd!r}")
        else:
            bad += [f"{where}: `diffprune {cmd}` has no {o}" for o in options if o not in commands[cmd]]
    assert not bad, "README names what the CLI does not have:\n" + "\n".join(bad)


def test_readme_commands_and_options_exist(commands):
    mentions = _mentions(_text())
    assert {m[0] for m in mentions} >= {"info", "search", "sample", "bench", "prune", "finetune", "eval", "train",
                                        "demo"}
    # a span whose first word is not a command at all (e.g. `steps`) is prose, not a command
    mentions = [m for m in mentions if m[0] in commands or "diffprune" in m[2]]
    _check(mentions, commands)
