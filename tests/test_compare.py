"""`qexport compare`: the quantize-or-scale-down run (reduced), its figures, report files and the MAC count."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from .conftest import shipped_or_skip

pytest.importorskip("torch", reason="needs the toolchain extra")


def test_graph_macs_equal_torch_flop_counter(tiny_artifact, tiny_pipeline_dir):
    """MACs counted from every graph of an artifact equal torch's FlopCounterMode count / 2, with the
    attention run as explicit matmuls (FlopCounterMode does not count CPU scaled_dot_product_attention)."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from qexport.eval.efficiency import graph_macs
    from qexport.tables.schema import QuantTable
    from qexport.zoo.cost import time_embedding_dim, time_embedding_ops
    from qexport.zoo.loading import load_model
    from qexport_runtime.artifact import load_artifact

    model = load_model(str(tiny_pipeline_dir))
    for m in model.unet.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.unet(torch.zeros(1, *model.sample_shape), torch.tensor([500]))
    with FlopCounterMode(display=False) as fc_mlp, torch.no_grad():   # the time MLP, a lookup in the quantized graphs
        e = model.unet.time_embedding(model.unet.time_proj(torch.tensor([500])))
    with FlopCounterMode(display=False) as fc_time, torch.no_grad():   # and the time projections, a lookup too
        model.unet.time_embedding(model.unet.time_proj(torch.tensor([500])))
        for name, m in model.unet.named_modules():
            if name.endswith("time_emb_proj"):
                m(torch.nn.functional.silu(e))
    assert time_embedding_ops(model.unet) == fc_mlp.get_total_flops() > 0
    assert time_embedding_ops(model.unet, projections=True) == fc_time.get_total_flops() > fc_mlp.get_total_flops()
    art = load_artifact(tiny_artifact)
    looked_up = fc_time if QuantTable.load(tiny_artifact).time_projection_table(time_embedding_dim(model.unet)) else fc_mlp
    for role in ("fp32", "qdq", "int"):
        macs = graph_macs(art.graph(role), model.sample_shape)
        skipped = looked_up.get_total_flops() if role != "fp32" else 0
        assert 2 * macs["total"] == fc.get_total_flops() - skipped, role
    assert any(k.startswith("QLinear") for k in graph_macs(art.graph("int"), model.sample_shape)["by_op"])


def test_graph_macs_leave_out_the_narrow_convs_tap_sums(tmp_path):
    """NarrowConvAsPointwise's one-hot tap-sum conv moves data: the rewritten conv_out counts the same
    MACs as the original, and the tap sums are reported apart."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qexport.eval.efficiency import graph_macs
    from qexport.export.passes import NarrowConvAsPointwise

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 40, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["sample", "w"], ["y"], name="conv_out", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["B", 40, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3, 12, 12])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, tmp_path / "before.onnx")
    assert NarrowConvAsPointwise()(m)
    onnx.save(m, tmp_path / "after.onnx")
    before, after = (graph_macs(tmp_path / f"{k}.onnx", (40, 12, 12)) for k in ("before", "after"))
    assert before == dict(total=3 * 40 * 9 * 144, by_op={"Conv": 3 * 40 * 9 * 144}, tap_sums=0)
    assert after["total"] == before["total"] and after["tap_sums"] == 3 * 9 * 9 * 144


def test_compare_quick_every_variant_has_every_figure(tmp_path):
    for name in ("digits16-ddpm", "digits16-ddpm-small", "digits16-ddpm-distilled", "digits16-classifier"):
        shipped_or_skip(name)
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "qexport.cli.main", "compare", "--quick", "--samples", "16",
                        "--steps", "4", "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["fp32-big", "fp32-small", "fp32-distilled", "w8a8-big", "w4a8-big", "w8a8-small",
                     "w8a8-distilled"]
    for v in report["variants"]:
        for key in ("step_ms_b1", "step_ms_b8", "peak_rss_mb", "bytes", "macs_per_step", "fd_to_fp32",
                    "fd_to_real", "label_agreement", "psnr_db", "image_ms_b1", "image_ms_b8", "peak_share_b8"):
            assert isinstance(v[key], (int, float)) and v[key] == v[key], (v["name"], key)
        assert v["step_ms_b1"] > 0 and v["bytes"] > 0 and v["peak_rss_mb"] > 0
        assert v["macs_per_step"] == v["macs_torch"], v["name"]   # the graph's count is torch's
        if v["bits"] != 32:
            assert v["int8_mac_share"] > 0.5 and v["check"].startswith("ok"), v
    big = next(v for v in report["variants"] if v["name"] == "fp32-big")
    small = next(v for v in report["variants"] if v["name"] == "fp32-small")
    assert big["fd_to_fp32"] == 0 and small["macs_per_step"] < big["macs_per_step"] / 3
    assert report["seed_floor"] > 0 and report["answers"]["rq1"] and report["answers"]["rq2"]
    assert report["machine"]["isa"] and report["bimodal"]["bimodal_sites"]
    md = (out / "compare.md").read_text()
    assert "RQ1" in md and "RQ2" in md and "Bimodal" in md and all(n in md for n in names)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uniform_codebook_is_the_table_quantizer_and_the_compander_beats_it_on_two_modes():
    """The study's baseline is exactly the graph's quantizer; on a two-mode sample the MSE-optimal
    compander must beat it (else the study's "no gain" could be a broken scheme)."""
    import numpy as np
    import torch

    from qexport.eval.bimodal import Codebooks, codebook
    from qexport.eval.simulate import fake_quant

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 0.1, 50_000), rng.normal(1, 0.1, 50_000)]).astype(np.float32)
    edges = np.linspace(-1.6, 1.6, 2049)
    hist, _ = np.histogram(x, edges)
    centers = (edges[1:] + edges[:-1]) / 2
    scale, zp = 3.0 / 255, 128
    t = torch.from_numpy(x)

    def quant(scheme):
        lv = codebook(scheme, centers, hist.astype(np.float64), scale, zp)
        assert len(lv) == 256 and np.all(np.diff(lv) >= 0), scheme
        return Codebooks({"s": lv[None].astype(np.float32)}, np.zeros(1000, dtype=np.int64)).quantizer("s")(t, 7)

    assert torch.equal(quant("uniform"), fake_quant(t, scale, zp))
    mse = {s: float(((quant(s) - t) ** 2).mean()) for s in ("uniform", "optimal-compander", "two-range")}
    assert mse["optimal-compander"] < 0.7 * mse["uniform"], mse


def test_compare_refuses_an_extractor_without_real_statistics_before_converting(tmp_path):
    """FD to real needs the real data's statistics: a feature network without them is refused in one
    line, before minutes of conversion, and nothing is written."""
    import onnx
    from onnx import TensorProto, helper

    net = tmp_path / "features.onnx"
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"])], "f",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 16, 16])],
                              [helper.make_tensor_value_info("f", TensorProto.FLOAT, ["n", 256])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(net))
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "qexport.cli.main", "compare", "--quick", "--features", str(net),
                        "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "has no real-data statistics for FD to real" in r.stderr and "--real-stats" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
