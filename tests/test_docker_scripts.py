"""docker/ scripts run directly (a fresh torch-free runtime venv samples an artifact) and in a buildah-built image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SCRIPTS = sorted(DOCKER.glob("*.sh"))
ENTRYPOINT = DOCKER / "entrypoint.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What Dockerfile.runtime and Dockerfile.toolchain copy from the repository root for the package build.
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "runtime", "qexport")
BASE_IMAGE = os.environ.get("QEXPORT_BASE_IMAGE", "localhost/qexport-base:bookworm")


def run(cmd, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def one_line_error(p: subprocess.CompletedProcess, prog: str) -> str:
    """The stderr of a refused command line: exit 2 and exactly one line `PROG: error: ...`."""
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-1000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), p.stderr
    return lines[0]


def copy_package_sources(dest: Path) -> Path:
    """The files the Dockerfiles COPY, so an install never writes build/ into the checkout."""
    dest.mkdir(parents=True)
    for name in PACKAGE_SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def clean_env(**extra) -> dict:
    """This environment without PYTHONPATH/VIRTUAL_ENV (they would leak the dev venv's packages)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


# ---------------------------------------------------------------- static checks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_strict(script):
    assert run(["bash", "-n", script]).returncode == 0
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    p = run(["shellcheck", *SCRIPTS])
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("kind", ["runtime", "toolchain"])
def test_dockerfile_runs_the_scripts(kind):
    """The images run exactly these scripts, copy what the ignore file lets through, start slim."""
    text = (DOCKER / f"Dockerfile.{kind}").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "RUN --mount=type=secret,id=pip_cert,required=false" in text
    assert f"bash /src/docker/install_{kind}.sh --venv /opt/venv" in text
    assert 'ENTRYPOINT ["/usr/local/bin/qexport-entrypoint"]' in text
    assert "COPY docker/entrypoint.sh /usr/local/bin/qexport-entrypoint" in text
    assert "COPY --from=build /opt/venv /opt/venv" in text and "\nUSER qexport\n" in text
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    copied = {w for line in copied for w in line.split()}
    allowed = {ln.lstrip("!").rstrip("/") for ln in (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().splitlines()
               if ln.startswith("!")}
    assert copied <= allowed, copied - allowed
    assert set(PACKAGE_SOURCES) <= copied
    if kind == "runtime":
        assert "ARG WITH_EXTENSIONS=0" in text and "--extensions" in text
    else:
        assert f"ARG TORCH_INDEX_URL={CPU_INDEX}" in text


def test_toolchain_install_takes_cpu_torch_at_the_pin(tmp_path):
    pin = re.search(r'"(torch==[^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    default = run(["bash", DOCKER / "install_toolchain.sh", "--dry-run", "--venv", tmp_path / "v", REPO],
                  env=clean_env(TORCH_INDEX_URL=CPU_INDEX))
    assert default.returncode == 0, default.stderr
    venv_line, torch_line, toolchain_line = [ln.rstrip() for ln in default.stdout.strip().splitlines()]
    assert "-m venv" in venv_line
    assert torch_line.split()[-3:] == [pin, "--index-url", CPU_INDEX], torch_line
    assert toolchain_line.endswith(r"\[toolchain\]") and "--index-url" not in toolchain_line
    env = clean_env()
    env.pop("TORCH_INDEX_URL", None)
    unset = run(["bash", DOCKER / "install_toolchain.sh", "--dry-run", "--venv", tmp_path / "v", REPO], env=env)
    assert unset.stdout.splitlines()[1].rstrip().endswith(f"--index-url {CPU_INDEX}"), "the CPU index is the default"
    local = run(["bash", DOCKER / "install_toolchain.sh", "--dry-run", "--venv", tmp_path / "v", "--torch-index", "",
                 REPO])
    assert local.stdout.splitlines()[1].split()[-1] == pin


@pytest.mark.parametrize("script, args, fragment", [
    ("install_runtime.sh", [], "missing SRC_DIR"),
    ("install_runtime.sh", ["--bogus", "."], "unknown option --bogus"),
    ("install_runtime.sh", ["/nonexistent/qexport"], "is not a qexport checkout"),
    ("install_runtime.sh", ["--venv"], "--venv needs a directory"),
    ("install_toolchain.sh", [], "missing SRC_DIR"),
    ("install_toolchain.sh", ["/nonexistent/qexport"], "is not a qexport checkout"),
    ("install_toolchain.sh", [".", "extra"], "more than one SRC_DIR"),
    ("debian_base.sh", ["--mirror"], "--mirror needs a URL"),
    ("entrypoint.sh", [], "no command"),
    ("entrypoint.sh", ["smaple", "x"], "unknown command 'smaple'"),
    ("entrypoint.sh", ["--steps", "4"], "unknown option --steps"),
], ids=lambda v: v if isinstance(v, str) and v.endswith(".sh") else None)
def test_bad_arguments_are_one_line_errors(script, args, fragment):
    prog = {"entrypoint.sh": "qexport-entrypoint"}.get(script, script.removesuffix(".sh"))
    assert fragment in one_line_error(run(["bash", DOCKER / script, *args], cwd=REPO), prog)


# ---------------------------------------------------------------- the runtime, installed by the script


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """install_runtime.sh run into a fresh venv (python -m venv) from a copy of this checkout."""
    tmp = tmp_path_factory.mktemp("runtime-install")
    src = copy_package_sources(tmp / "src")
    venv = tmp / "venv"
    t0 = time.time()
    p = run(["bash", DOCKER / "install_runtime.sh", "--venv", venv, "--python", sys.executable, "--no-pip", src],
            env=clean_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "install_runtime: ok:" in p.stdout and "no torch" in p.stdout
    print(f"\ninstall_runtime.sh into a fresh venv: {time.time() - t0:.1f} s")
    return venv


def test_install_runtime_with_extensions(tmp_path):
    """--extensions (the image's WITH_EXTENSIONS=1) adds onnxruntime-extensions and still no torch."""
    src = copy_package_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    p = run(["bash", DOCKER / "install_runtime.sh", "--venv", venv, "--python", sys.executable, "--extensions", src],
            env=clean_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"onnxruntime-extensions \d+\.\d+", p.stdout) and "no torch" in p.stdout, p.stdout[-500:]
    ops = run([venv / "bin" / "python", "-c", "import onnxruntime_extensions as x; print(x.get_library_path())"],
              env=clean_env())
    assert ops.returncode == 0 and Path(ops.stdout.strip()).is_file(), ops.stderr


def entrypoint(venv: Path, *args, **env) -> subprocess.CompletedProcess:
    path = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return run(["bash", ENTRYPOINT, *args],
               env=clean_env(QEXPORT_PYTHON=str(venv / "bin" / "python"), PATH=path, **env))


def test_runtime_venv_has_no_toolchain(runtime_venv):
    py = runtime_venv / "bin" / "python"
    p = run([py, "-c", "import importlib.util as u, json; print(json.dumps("
                       "{m: u.find_spec(m) is not None for m in ('torch', 'diffusers', 'onnx', 'pip', "
                       "'numpy', 'onnxruntime', 'tqdm', 'qexport_runtime')}))"], env=clean_env())
    found = json.loads(p.stdout)
    assert found == dict(torch=False, diffusers=False, onnx=False, pip=False, numpy=True, onnxruntime=True,
                         tqdm=True, qexport_runtime=True), found
    site = next((runtime_venv / "lib").glob("python3*/site-packages"))
    assert not [d.name for d in site.iterdir() if d.name.lower().startswith(("torch", "nvidia"))]


def test_entrypoint_check_and_sample(runtime_venv, tiny_artifact, tmp_path):
    check = entrypoint(runtime_venv, "check", tiny_artifact, QEXPORT_THREADS="1")
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert "verdict (unet_int.onnx): ok" in check.stdout
    out = tmp_path / "out"
    smp = entrypoint(runtime_venv, "sample", tiny_artifact, "--steps", "4", "--batch", "1", "-o", out)
    assert smp.returncode == 0, smp.stdout[-2000:] + smp.stderr[-2000:]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = np.load(out / "samples.npy")
    assert images.shape == (1, 1, 16, 16) and np.isfinite(images).all()
    summary = json.loads((out / "sample.json").read_text())
    assert (summary["steps"], summary["batch"], summary["graph"]) == (4, 1, "unet_int.onnx")


def test_entrypoint_refuses_bad_input(runtime_venv, tiny_artifact, tmp_path):
    prog = "qexport-entrypoint"
    missing = one_line_error(entrypoint(runtime_venv, "sample", tmp_path / "nope", "-o", tmp_path / "o"), prog)
    assert f"artifact folder not found: {tmp_path / 'nope'}" in missing
    assert "no manifest.json" in one_line_error(entrypoint(runtime_venv, "check", tmp_path), prog)
    assert "is not a folder" in one_line_error(entrypoint(runtime_venv, "check", tiny_artifact / "manifest.json"), prog)
    # options before the artifact, and a second artifact of bench, are told apart by the runtime's parser
    bench = entrypoint(runtime_venv, "bench", "--steps", "2", tiny_artifact, tmp_path / "gone")
    assert f"artifact folder not found: {tmp_path / 'gone'}" in one_line_error(bench, prog)
    assert "not a positive integer" in one_line_error(entrypoint(runtime_venv, "check", tiny_artifact,
                                                                 QEXPORT_THREADS="0"), prog)
    assert "needs the toolchain" in one_line_error(entrypoint(runtime_venv, "convert", "digits16-ddpm"), prog)
    usage = entrypoint(runtime_venv, "sample", tiny_artifact)  # no -o: the runtime's own one-line usage error
    assert usage.returncode == 2 and "-o/--output" in usage.stderr and usage.stderr.strip().count("\n") == 0
    helped = entrypoint(runtime_venv, "help")
    assert helped.returncode == 0 and "QEXPORT_THREADS" in helped.stdout


# ---------------------------------------------------------------- opt-in: the full toolchain install


def test_toolchain_install_and_convert(tiny_pipeline_dir, tmp_path):
    """install_toolchain.sh into a fresh venv, then `convert` and `check` through the entry point (~2 min)."""
    if os.environ.get("QEXPORT_DOCKER_FULL") != "1":
        pytest.skip("full toolchain install + convert (~2.5 min, ~1.6 GB) is opt-in: set QEXPORT_DOCKER_FULL=1")
    src = copy_package_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    # TORCH_INDEX_URL from the environment, else pip's own indexes (a machine with a local CPU wheel)
    p = run(["bash", DOCKER / "install_toolchain.sh", "--venv", venv, "--python", sys.executable,
             "--torch-index", os.environ.get("TORCH_INDEX_URL", ""), src], env=clean_env(), timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "(CPU build)" in p.stdout
    art = tmp_path / "art"
    conv = entrypoint(venv, "convert", tiny_pipeline_dir, "--bits", "8", "-o", art)
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-2000:]
    check = entrypoint(venv, "check", art)
    assert check.returncode == 0 and "verdict" in check.stdout, check.stdout + check.stderr


# ---------------------------------------------------------------- buildah: the runtime image itself


def buildah(*args, timeout=900) -> subprocess.CompletedProcess:
    return run(["buildah", "--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs"), *args], timeout=timeout)


@pytest.fixture(scope="module")
def runtime_image():
    """Dockerfile.runtime built by buildah (vfs storage, chroot isolation) on a debootstrapped
    Debian base (docker/debian_base.sh) when no registry is reachable; the base is built once."""
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (apt-get install buildah debootstrap); the image build is not tested")
    if os.geteuid() != 0:
        pytest.skip("buildah with vfs storage and chroot isolation needs root here")
    t0 = time.time()
    if buildah("inspect", "--type", "image", BASE_IMAGE).returncode != 0:
        if shutil.which("debootstrap") is None:
            pytest.skip(f"no base image {BASE_IMAGE} and no debootstrap to build it (apt-get install debootstrap)")
        base = run(["bash", DOCKER / "debian_base.sh", BASE_IMAGE], timeout=900)
        assert base.returncode == 0, base.stdout[-2000:] + base.stderr[-2000:]
    t1 = time.time()
    tag = "localhost/qexport-runtime:pytest"
    secret = []
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():  # pip behind a TLS-intercepting proxy needs the host's CA bundle
        secret = ["--secret", f"id=pip_cert,src={cert}"]
    b = buildah("build", "--isolation", "chroot", "-f", str(DOCKER / "Dockerfile.runtime"),
                "--ignorefile", str(DOCKER / "Dockerfile.runtime.dockerignore"), *secret,
                "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, str(REPO))
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    size = buildah("images", "--format", "{{.Size}}", tag).stdout.strip()
    print(f"\nbase image {t1 - t0:.0f} s, runtime image build {time.time() - t1:.0f} s, size {size}")
    ctr = buildah("from", "--quiet", tag).stdout.strip()
    assert ctr
    yield ctr
    buildah("rm", ctr)
    buildah("rmi", tag)


def test_runtime_image_samples(runtime_image, tiny_artifact, tmp_path):
    art = tmp_path / "art"  # world-readable copy: the image runs as uid 1000, the artifact folder is 0700
    shutil.copytree(tiny_artifact, art)
    for p in [art, *art.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    mounts = ["-v", f"{art}:/artifacts/tiny:ro", "-v", f"{out}:/out"]
    ep = "/usr/local/bin/qexport-entrypoint"
    check = buildah("run", "--isolation", "chroot", *mounts, runtime_image, "--", ep, "check", "/artifacts/tiny")
    assert check.returncode == 0 and "verdict (unet_int.onnx): ok" in check.stdout, check.stdout + check.stderr
    smp = buildah("run", "--isolation", "chroot", *mounts, runtime_image, "--",
                  ep, "sample", "/artifacts/tiny", "--steps", "4", "--batch", "1", "-o", "/out/s")
    assert smp.returncode == 0, smp.stdout + smp.stderr
    assert np.load(out / "s" / "samples.npy").shape == (1, 1, 16, 16)
    no_torch = buildah("run", "--isolation", "chroot", runtime_image, "--", "python", "-c",
                       "import importlib.util as u; print(u.find_spec('torch'))")
    assert no_torch.stdout.strip() == "None", no_torch.stdout + no_torch.stderr
    unmounted = buildah("run", "--isolation", "chroot", runtime_image, "--", ep, "sample", "/artifacts/x", "-o", "/out")
    assert unmounted.returncode != 0 and "mount the host folder" in unmounted.stderr
    unreadable = buildah("run", "--isolation", "chroot", "-v", f"{tiny_artifact}:/artifacts/tiny:ro", runtime_image,
                         "--", ep, "check", "/artifacts/tiny")
    if tiny_artifact.stat().st_mode & 0o005 == 0:
        assert unreadable.returncode != 0 and "cannot read /artifacts/tiny as uid 1000" in unreadable.stderr
