"""Bad input never ends in a traceback or a half-written artifact: models, options, numerics, output
folders (existing, read-only, full disk, Ctrl-C, SIGKILL, two writers at once) and reproducible
builds. Each case: a one-line error naming the problem and the fix, a non-zero exit, nothing
partial on disk. (Untrusted artifacts on the runtime side: tests/test_untrusted_artifacts.py.)"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the toolchain's error cases need the toolchain extra")

from qexport.cli.main import main  # noqa: E402

FAST = ["--samples", "40", "--steps", "10", "--trajectories", "4", "--correction", "off"]


def one_line_error(capsys, argv: list[str], match: str, code: int = 2) -> str:
    """Run `qexport ARGV` in-process; it must exit `code` with one stderr line containing `match`."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def no_partial(out: Path) -> None:
    """Nothing half-written beside or at `out`: no folder, no temp folder, no lock file."""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.glob(f".{out.name}.*"))


def copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


# ---------------------------------------------------------------- models

def test_missing_model_path(capsys, tmp_path):
    one_line_error(capsys, ["convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "does not exist")
    no_partial(tmp_path / "o")


def test_pipeline_folder_without_unet(capsys, tiny_pipeline_dir, tmp_path):
    d = copy_with(tiny_pipeline_dir, tmp_path / "p", lambda d: shutil.rmtree(d / "unet"))
    one_line_error(capsys, ["convert", str(d), "-o", str(tmp_path / "o")], "has no unet/")


def test_hub_id_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(capsys, ["convert", "some-org/some-unet", "-o", str(tmp_path / "o")], "pass the local folder")


@pytest.mark.parametrize("cls, match", [("AutoencoderKL", "not a diffusers U-Net"),
                                        ("DiTTransformer2DModel", "transformer denoisers"),
                                        ("UNet2DConditionModel", "text-conditioned")])
def test_unsupported_architecture(capsys, tiny_unet_dir, tmp_path, cls, match):
    d = copy_with(tiny_unet_dir, tmp_path / "m", lambda d: edit_json(d / "config.json", _class_name=cls))
    one_line_error(capsys, ["convert", str(d), "-o", str(tmp_path / "o")], match)


def test_pickle_only_weights_refused(capsys, tiny_unet_dir, tmp_path):
    from safetensors.torch import load_file

    def to_pickle(d):
        sd = load_file(str(d / "diffusion_pytorch_model.safetensors"))
        (d / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(sd, d / "diffusion_pytorch_model.bin")
    d = copy_with(tiny_unet_dir, tmp_path / "m", to_pickle)
    one_line_error(capsys, ["convert", str(d), "-o", str(tmp_path / "o")], "--allow-pickle")


def test_weights_disagree_with_config(capsys, tiny_unet_dir, tmp_path):
    def wider(d):
        c = json.loads((d / "config.json").read_text())
        edit_json(d / "config.json", block_out_channels=[2 * b for b in c["block_out_channels"]])
    d = copy_with(tiny_unet_dir, tmp_path / "m", wider)
    one_line_error(capsys, ["convert", str(d), "-o", str(tmp_path / "o")], "must come from the same model")


@pytest.mark.parametrize("change, match", [(dict(_class_name="FlowMatchEulerDiscreteScheduler"), "noise schedule"),
                                           (dict(prediction_type="flow"), "prediction_type 'flow'"),
                                           (dict(beta_schedule="sigmoid"), "beta_schedule")])
def test_scheduler_config_qexport_cannot_honour(capsys, tiny_unet_dir, tmp_path, change, match):
    d = copy_with(tiny_unet_dir, tmp_path / "m", lambda d: edit_json(d / "scheduler_config.json", **change))
    one_line_error(capsys, ["convert", str(d), "-o", str(tmp_path / "o")], match)


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("args, match", [
    (["--bits", "3"], "invalid choice: 3"), (["--bits", "abc"], "invalid int value: 'abc'"),
    (["--groups", "0"], "groups must be ≥ 1"), (["--groups", "2000"], "exceed the model's 1000"),
    (["--method", "kmeans"], "invalid choice: 'kmeans'"), (["--strategy", "random"], "invalid choice: 'random'"),
    (["--steps", "5000"], "exceed the model's 1000"), (["--seed", "-1"], "--seed must be ≥ 0"),
    (["--samples", "0"], "must be ≥ 1")])
def test_bad_convert_options(capsys, tiny_pipeline_dir, tmp_path, args, match):
    one_line_error(capsys, ["convert", str(tiny_pipeline_dir), "-o", str(tmp_path / "o"), *args], match)
    no_partial(tmp_path / "o")




@pytest.mark.parametrize("args, match", [(["--batch", "0"], "batch must be ≥ 1"),
                                         (["--steps", "5000"], "steps must be in [1, 1000]"),
                                         (["--seed", "-3"], "seed ≥ 0"), (["--scheduler", "euler"], "invalid choice")])
def test_bad_sample_options(tiny_artifact, tmp_path, args, match):
    r = subprocess.run([sys.executable, "-m", "qexport_runtime", "sample", str(tiny_artifact), "-o",
                        str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- numerics

def _poison(d: Path, module: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd[f"{module}.weight"] = torch.full_like(sd[f"{module}.weight"], value)
    save_file(sd, str(f))


def test_nan_activations_name_the_site_and_step(capsys, tiny_unet_dir, tmp_path):
    d = copy_with(tiny_unet_dir, tmp_path / "m", lambda d: _poison(d, "down_blocks.0.resnets.0.conv1", float("nan")))
    err = one_line_error(capsys, ["convert", str(d), "-o", str(tmp_path / "o"), *FAST], "calibration met NaN")
    assert "down_blocks.0.resnets.0.conv1.out" in err and "at time step t=" in err
    no_partial(tmp_path / "o")


def test_fp32_output_already_nan(capsys, tiny_unet_dir, tmp_path):
    d = copy_with(tiny_unet_dir, tmp_path / "m", lambda d: _poison(d, "conv_out", float("inf")))
    one_line_error(capsys, ["convert", str(d), "-o", str(tmp_path / "o"), *FAST], "FP32 model's own output is not finite")


# ---------------------------------------------------------------- output folders

def convert_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qexport.cli.main", "convert", str(model), "-o", str(out), *FAST, *extra]


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_existing_folder_refused_then_replaced_with_overwrite(capsys, tiny_pipeline_dir, tiny_artifact, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(tiny_artifact, out)
    (out / "stale.txt").write_text("from an older artifact")
    before = tree_digest(out)
    one_line_error(capsys, ["convert", str(tiny_pipeline_dir), "-o", str(out), *FAST], "--overwrite")
    assert tree_digest(out) == before
    assert main(["convert", str(tiny_pipeline_dir), "-o", str(out), *FAST, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()   # replaced whole
    assert not list(tmp_path.glob(".o.*"))


def test_read_only_location(capsys, tiny_pipeline_dir):
    # /sys refuses new files even to root (a chmod'ed folder would not stop root)
    one_line_error(capsys, ["convert", str(tiny_pipeline_dir), "-o", "/sys/qexport-out", *FAST], "choose a writable -o")


def test_full_disk_leaves_nothing(tiny_pipeline_dir, tmp_path):
    """A 100 kB file-size limit (as a full disk would) fails the first large graph write."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    out = tmp_path / "o"
    r = subprocess.run(convert_cmd(tiny_pipeline_dir, out), capture_output=True, text=True, preexec_fn=limit,
                       timeout=300)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "free disk space" in err[0], r.stderr[-2000:]
    no_partial(out)


def _start_and_wait_for_writing(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start a convert and return once it is writing its temporary folder (FP32 graph written)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if any((d / "unet_fp32.onnx").exists() for d in out.parent.glob(f".{out.name}.tmp-*")):
            return p
        time.sleep(0.01)
    p.kill()
    pytest.fail(f"convert never reached the writing stage (exit {p.poll()}): {p.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_convert_keeps_previous_artifact(tiny_pipeline_dir, tiny_artifact, tmp_path, sig):
    out = tmp_path / "o"
    shutil.copytree(tiny_artifact, out)
    before = tree_digest(out)
    p = _start_and_wait_for_writing(convert_cmd(tiny_pipeline_dir, out, "--overwrite"), out)
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    err = p.stderr.read().strip()
    assert tree_digest(out) == before                       # the previous artifact is untouched
    if sig == signal.SIGINT:
        assert rc == 130 and "interrupted" in err and "Traceback" not in err, err
        assert not list(tmp_path.glob(".o.tmp-*"))
    else:
        assert rc == -signal.SIGKILL and list(tmp_path.glob(".o.tmp-*"))   # nothing could clean up …
    r = subprocess.run(convert_cmd(tiny_pipeline_dir, out, "--overwrite"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(tmp_path.glob(".o.*"))                  # … until the next run, which leaves no stray folder


def test_two_converts_at_once_one_wins_whole(tiny_pipeline_dir, tmp_path):
    from qexport_runtime.artifact import load_artifact

    out = tmp_path / "o"
    procs = [subprocess.Popen(convert_cmd(tiny_pipeline_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().strip()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert len(loser.splitlines()) == 1 and ("another qexport is writing" in loser or "already exists" in loser
                                             or "appeared" in loser), loser
    load_artifact(out)                                      # complete: every file matches the manifest
    assert not list(tmp_path.glob(".o.*"))


# ---------------------------------------------------------------- reproducible builds

def test_same_convert_twice_is_byte_identical(tiny_pipeline_dir, tmp_path):
    from qexport_runtime.artifact import load_artifact

    for name in ("a", "b"):
        assert main(["convert", str(tiny_pipeline_dir), "-o", str(tmp_path / name), *FAST]) == 0
    a, b = (load_artifact(tmp_path / n).manifest for n in "ab")
    assert {k: v.sha256 for k, v in a.files.items()} == {k: v.sha256 for k, v in b.files.items()}
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_artifact_modes_follow_the_umask_not_mkdtemp(tiny_artifact):
    """A converted artifact is readable by other users and containers (0755 / 0644 under umask 022)."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tiny_artifact).st_mode) == 0o777 & ~umask
    for f in tiny_artifact.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~umask, f.name


def test_a_swallowed_ctrl_c_still_stops_the_commit(tmp_path):
    """Python drops a KeyboardInterrupt raised inside __del__ or a callback; the SIGINT handler also sets
    `qexport.errors.interrupted`, and the writer then refuses to rename its folder into place."""
    from qexport.errors import interrupted
    from qexport.export.artifact import ArtifactWriter

    out = tmp_path / "o"
    interrupted.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            with ArtifactWriter(out) as w:
                (w.dir / "x.txt").write_text("x")
                w.add("x.txt", "tables")
                w.finish(source={}, bits={}, groups=0, num_train_timesteps=1, sample_shape=[1, 1, 1], inputs=[],
                         outputs=[], scheduler={})
    finally:
        interrupted.clear()
    assert not out.exists() and not list(tmp_path.glob(".o.*"))
