"""A Hugging Face optimum-onnx view of a text-to-image artifact: the folder `ORTStableDiffusionPipeline` loads.

`write_optimum_view(artifact_dir, out_dir, tokenizer_dir, unet_role="int")` writes, from a finished
text-to-image artifact and the CLIP tokenizer folder it was converted with (the artifact holds the
tokenizer only as an onnxruntime-extensions graph), the ONNX Stable Diffusion layout that optimum-onnx
(`optimum.onnxruntime.ORTStableDiffusionPipeline` / `ORTDiffusionPipeline.from_pretrained(out_dir)`,
read from optimum-onnx 0.1.0 with diffusers 0.39) runs:

    model_index.json            _class_name StableDiffusionPipeline; unet/vae/text_encoder entries (optimum
                                only needs "unet" to be non-null to skip its export-from-PyTorch path),
                                tokenizer ["transformers", "CLIPTokenizer"], scheduler ["diffusers",
                                "DDIMScheduler"], safety_checker / feature_extractor [null, null]
    unet/model.onnx             the artifact's U-Net graph of `unet_role`, bridged (below)
    unet/config.json            in_channels, out_channels, sample_size, cross_attention_dim,
                                time_cond_proj_dim null (⇒ classifier-free guidance), addition_embed_type null
    text_encoder/model.onnx     text_encoder.onnx as it is (input_ids int64 [B, L] → last_hidden_state,
                                pooler_output: optimum's names already)
    text_encoder/config.json    hidden_size, max_position_embeddings, num_hidden_layers 0
    vae_decoder/model.onnx      vae_decoder.onnx as it is (latent_sample → sample: optimum's names already;
                                vae_decoder_fp32.onnx for the FP32 U-Net view when the default VAE is int8)
    vae_decoder/config.json     scaling_factor, latent_channels, out_channels, sample_size, block_out_channels
    tokenizer/                  vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                (+ tokenizer.json / added_tokens.json when present), copied
    scheduler/scheduler_config.json   DDIMScheduler with the manifest's noise schedule

There is no vae_encoder/ (the artifact has no VAE encoder): text-to-image only, optimum's img2img and
inpainting pipelines cannot run from the view. Only the files are written; nothing here imports optimum.

Contracts that needed a bridge (everything else matches optimum as exported):

1. U-Net `timestep`. optimum's own export declares `timestep` a float32 *scalar* (shape [], "it can be
   int or float depending on the sd architecture"); `ORTUnet` casts what the scheduler hands it (a 0-d
   int64 tensor for DDIM) to the declared ONNX type, and unsqueezes it to [1] with a "re-export" warning
   when the input has a rank. Ours is the raw training time step as int64 [1] (one value for the batch).
   The view's U-Net takes optimum's float32 scalar and converts it in the graph,
   `Round → Cast(int64) → Reshape([1])`, into the original int64 [1] tensor; the rounding sends a
   fractional time step (a scheduler with non-integer time steps) to the nearest training step, the only
   ones the integer U-Net's tables know. A DDIM step is an integer, so the value reaches the graph exactly.
2. U-Net output name. `ORTUnet.forward` reads the output `out_sample`; ours is `noise_pred` — renamed
   in the graph (producer, consumers, graph output). All initializers and nodes are kept; the view's graph
   carries metadata `qexport.bridge` / `qexport.source` saying so.
3. Per-folder config.json. optimum refuses a model folder without config.json, and diffusers'
   StableDiffusionPipeline reads unet.config (in_channels, sample_size, time_cond_proj_dim),
   vae.config (scaling_factor; `vae_scale_factor = 2 ** (len(block_out_channels) - 1)`) and the text
   encoder's `num_hidden_layers` (optimum's `ORTTextEncoder` pops `hidden_states.{i}` outputs up to it).
   The artifact does not record the diffusers configs, so the view writes them from the manifest:
   block_out_channels is a list of the right *length* (image side / latent side = 2^(len-1)) — its
   widths are not in the artifact and nothing in optimum reads them; num_hidden_layers is 0, the number
   of per-layer `hidden_states.{i}` outputs our text encoder graph has (so `clip_skip`, which optimum's
   SD pipeline cannot run on an ONNX text encoder anyway, is not available).
4. Scheduler. qexport's runtime samples a text-to-image artifact with its numpy DDIM whatever the
   manifest's `_class_name`, and reads only some fields of the config. The view writes exactly that:
   `DDIMScheduler` with the fields the runtime reads (thresholding and rescale_betas_zero_snr off), so
   optimum's diffusers DDIM walks the same time steps with the same ᾱ (eta 0 is diffusers' default).
5. Tokenizer length. diffusers pads prompts to `tokenizer.model_max_length`; the text encoder graph
   takes exactly the manifest's `max_length` tokens, so the copied tokenizer_config.json gets
   `model_max_length = max_length`. The tokenizer folder must be the artifact's own: its vocab.json and
   merges.txt are compared with the ones inside tokenizer.onnx.

Not met (cannot be bridged in files): diffusers' StableDiffusionPipeline rewrites a scheduler config with
`steps_offset != 1` or `clip_sample = true` at load (deprecation path). An artifact whose schedule has
either (with "leading" spacing for steps_offset) is still written, with a logged warning: optimum then
samples a different schedule than qexport's runtime. diffusers also refuses image sides that are not
multiples of 8 (the shipped 32x32 model is fine).

How close optimum's images come to `qexport_runtime.text2image.TextToImage`'s (same prompt, initial noise,
steps, guidance; tests/test_optimum_layout.py): each denoising step agrees to ~3e-6, the only difference
being the DDIM update in torch against numpy (last-bit rounding). End to end the FP32 U-Net stays within
2e-5 on images in [-1, 1]; the integer U-Net often does too, but a last-bit change of its input can flip
the rounding of one int8 activation in a later step, which CFG and DDIM carry to the image (shipped model:
max |Δ| up to 0.28, mean ≤ 8e-3 — a branch of the trajectory, as between two CPUs' float kernels).
optimum's default session options (ORT_ENABLE_ALL) add a second source, a different float convolution
layout; pass `session_options` with ORT_ENABLE_EXTENDED, as qexport's runtime uses, to run the graphs
exactly as it does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from ..errors import QexportError

log = logging.getLogger(__name__)

TIMESTEP = "timestep"
OUT_SAMPLE = "out_sample"
BRIDGE_PREFIX = "qexport_bridge/"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.json")
UNET_ROLES = ("int", "qdq", "static-group", "fp32")
BRIDGE_NOTE = ("timestep: float32 scalar (optimum) -> Round -> Cast int64 -> Reshape [1] (qexport); "
               "output noise_pred renamed out_sample")


def _fail(msg: str) -> QexportError:
    return QexportError(msg)


def _load_artifact(artifact_dir: Path):
    from qexport_runtime.artifact import ArtifactError, load_artifact
    from qexport_runtime.text2image import text_info

    try:
        art = load_artifact(artifact_dir)
    except ArtifactError as e:
        raise _fail(str(e)) from None
    if not isinstance(art.manifest.extra.get("text"), dict):
        raise _fail(f"{artifact_dir} is not a text-to-image artifact (no text encoder); an optimum Stable "
                    f"Diffusion view needs one converted from a Stable-Diffusion-layout pipeline folder")
    try:
        info = text_info(art)
    except ArtifactError as e:
        raise _fail(str(e)) from None
    return art, info


def _graph_file(art, role: str) -> Path:
    if role not in UNET_ROLES:
        raise _fail(f"unet_role must be one of {', '.join(UNET_ROLES)} (an ONNX graph optimum can load), "
                    f"got {role!r}")
    names = art.manifest.files_with_role(role)
    if not names:
        have = ", ".join(r for r in UNET_ROLES if art.manifest.files_with_role(r))
        raise _fail(f"artifact {art.path} has no U-Net graph with role {role!r} (it has: {have}); pick one "
                    f"of those")
    return art.path / names[0]


def _role_file(art, role: str) -> Path:
    names = art.manifest.files_with_role(role)
    if not names:
        raise _fail(f"artifact {art.path} lacks its {role} graph; re-export it with this qexport")
    return art.path / names[0]


def _rename_everywhere(graph, old: str, new: str) -> None:
    """Rename tensor `old` to `new` in every node input/output of `graph` and its subgraphs."""
    import onnx

    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_everywhere(a.g, old, new)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _rename_everywhere(g, old, new)


def _has_external_data(model) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _save(model, path: Path, external: bool) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def bridge_unet(model, source: str = ""):
    """The qexport U-Net `model` (inputs sample, timestep int64 [1], encoder_hidden_states; one output)
    rewritten in place to optimum's contract: timestep float32 scalar, output `out_sample`."""
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    inputs = {i.name: i for i in g.input}
    if set(inputs) != {"sample", TIMESTEP, "encoder_hidden_states"}:
        raise _fail(f"{source}: U-Net inputs are {sorted(inputs)}, expected sample, timestep and "
                    f"encoder_hidden_states (a text-conditioned qexport U-Net)")
    t = inputs[TIMESTEP].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    if t.elem_type != TensorProto.INT64 or dims != [1]:
        raise _fail(f"{source}: U-Net input timestep is {TensorProto.DataType.Name(t.elem_type)} {dims}, "
                    f"expected int64 [1]; re-export the artifact with this qexport")
    if len(g.output) != 1:
        raise _fail(f"{source}: U-Net has {len(g.output)} outputs, expected one (the noise prediction)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise _fail(f"{source}: U-Net opset {opset} is older than 11 (Round); re-export the artifact")
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}
    if any(n.startswith(BRIDGE_PREFIX) for n in taken):
        raise _fail(f"{source}: U-Net already has {BRIDGE_PREFIX}* tensors; pass the artifact's own graph")

    # 1. timestep: the old int64 [1] input becomes an internal tensor computed from optimum's float scalar
    inner = BRIDGE_PREFIX + "timestep_int64"
    _rename_everywhere(g, TIMESTEP, inner)
    inputs[TIMESTEP].CopyFrom(helper.make_tensor_value_info(TIMESTEP, TensorProto.FLOAT, []))
    shape1 = BRIDGE_PREFIX + "shape_1"
    g.initializer.append(helper.make_tensor(shape1, TensorProto.INT64, [1], [1]))
    bridge = [
        helper.make_node("Round", [TIMESTEP], [BRIDGE_PREFIX + "timestep_rounded"], name=BRIDGE_PREFIX + "round"),
        helper.make_node("Cast", [BRIDGE_PREFIX + "timestep_rounded"], [BRIDGE_PREFIX + "timestep_scalar_int64"],
                         to=TensorProto.INT64, name=BRIDGE_PREFIX + "cast"),
        helper.make_node("Reshape", [BRIDGE_PREFIX + "timestep_scalar_int64", shape1], [inner],
                         name=BRIDGE_PREFIX + "reshape"),
    ]
    for node in reversed(bridge):
        g.node.insert(0, node)

    # 2. the output name optimum reads
    old_out = g.output[0].name
    if old_out != OUT_SAMPLE:
        if OUT_SAMPLE in taken:
            raise _fail(f"{source}: U-Net already has a tensor named {OUT_SAMPLE!r} that is not its output")
        _rename_everywhere(g, old_out, OUT_SAMPLE)
        g.output[0].name = OUT_SAMPLE
    for key, value in (("qexport.bridge", BRIDGE_NOTE), ("qexport.source", source)):
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, value
    if sum(len(t.raw_data) for t in g.initializer) < 1 << 30:   # the checker refuses 2 GB protos: stay well under
        onnx.checker.check_model(model)
    return model


def _copy_graph(src: Path, dst: Path) -> None:
    """Copy an artifact graph as `dst` (model.onnx), moving external weights to dst's own data file."""
    import onnx

    head = onnx.load(str(src), load_external_data=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not _has_external_data(head):
        shutil.copyfile(src, dst)
        return
    _save(onnx.load(str(src)), dst, external=True)


def _read_tokenizer(tokenizer_dir: Path, art) -> dict:
    """tokenizer_config.json of `tokenizer_dir` (or {}), after checking the folder is the artifact's tokenizer."""
    import onnx

    if not tokenizer_dir.is_dir():
        raise _fail(f"{tokenizer_dir} is not a folder; pass the CLIP tokenizer folder (tokenizer/) of the pipeline "
                    f"the artifact was converted from")
    missing = [f for f in ("vocab.json", "merges.txt") if not (tokenizer_dir / f).is_file()]
    if missing:
        raise _fail(f"{tokenizer_dir} lacks {', '.join(missing)}; pass the CLIP tokenizer folder (tokenizer/) of "
                    f"the pipeline the artifact was converted from")
    try:
        vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
        merges = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8")
        cfg_file = tokenizer_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(f"{tokenizer_dir}: cannot read the tokenizer files ({type(e).__name__}); pass the pipeline's "
                    f"tokenizer/ folder") from None
    if not isinstance(cfg, dict):
        raise _fail(f"{tokenizer_dir / 'tokenizer_config.json'} is not a JSON object; pass the pipeline's "
                    f"tokenizer/ folder")
    graph = onnx.load(str(_role_file(art, "tokenizer")))
    ours = next(({a.name: a.s.decode("utf-8") for a in n.attribute if a.s} for n in graph.graph.node
                 if n.op_type == "CLIPTokenizer"), None)
    if ours is None or "vocab" not in ours or "merges" not in ours:
        raise _fail(f"artifact {art.path}: its tokenizer graph has no CLIPTokenizer vocabulary; re-export it")
    if json.loads(ours["vocab"]) != vocab or ours["merges"].strip().splitlines() != merges.strip().splitlines():
        raise _fail(f"{tokenizer_dir} is not the tokenizer artifact {art.path} was converted with (its vocab.json "
                    f"or merges.txt differ from tokenizer.onnx's); pass that pipeline's tokenizer/ folder")
    return cfg


def _write_tokenizer(tokenizer_dir: Path, cfg: dict, max_length: int, out: Path) -> None:
    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file() and name != "tokenizer_config.json":
            shutil.copyfile(tokenizer_dir / name, out / name)
    cfg = {**cfg, "model_max_length": max_length}
    cfg.setdefault("tokenizer_class", "CLIPTokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _scheduler_config(art) -> dict:
    """The DDIM config qexport's runtime samples with, in diffusers' field names."""
    from qexport_runtime.schedulers.ddim import DDIMConfig

    try:
        cfg = DDIMConfig.from_config(art.manifest.scheduler)
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        raise _fail(f"artifact {art.path}: its scheduler config does not make a DDIM scheduler "
                    f"({type(e).__name__}: {str(e)[:120]}); re-export the artifact") from None
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "eta"}
    if d["trained_betas"] is not None:
        d["trained_betas"] = list(d["trained_betas"])
    if (d["timestep_spacing"] == "leading" and d["steps_offset"] != 1) or d["clip_sample"]:
        log.warning("artifact %s: scheduler steps_offset=%s clip_sample=%s; diffusers' StableDiffusionPipeline "
                    "(optimum) rewrites these to 1 / false at load, so optimum samples a different schedule "
                    "than qexport's runtime", art.path, d["steps_offset"], d["clip_sample"])
    return {"_class_name": "DDIMScheduler", **d, "thresholding": False, "rescale_betas_zero_snr": False}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_optimum_view(artifact_dir, out_dir, tokenizer_dir, unet_role: str = "int") -> Path:
    """Write the optimum-onnx Stable Diffusion folder of a text-to-image artifact to `out_dir` (new or empty)
    and return it; see the module docstring for the layout and the bridged contracts."""
    import onnx

    artifact_dir, out_dir, tokenizer_dir = Path(artifact_dir), Path(out_dir), Path(tokenizer_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise _fail(f"{out_dir} exists and is not an empty folder; pass a new folder for the optimum view")
    art, info = _load_artifact(artifact_dir)
    unet_src = _graph_file(art, unet_role)
    # as the runtime's FP32 reference pipeline: the FP32 U-Net decodes with the FP32 VAE when there is one
    vae_role = "vae-decoder-fp32" if unet_role == "fp32" and art.manifest.files_with_role("vae-decoder-fp32") \
        else "vae-decoder"
    text_src, vae_src = _role_file(art, "text-encoder"), _role_file(art, vae_role)
    tok_cfg = _read_tokenizer(tokenizer_dir, art)
    scheduler = _scheduler_config(art)
    m = art.manifest
    c, h, w = (int(x) for x in m.sample_shape)
    image = [int(x) for x in info["image_shape"]]
    if len(image) != 3 or image[1] % h or image[2] % w or image[1] // h != image[2] // w:
        raise _fail(f"artifact {art.path}: image shape {image} is not the latent {[c, h, w]} upscaled by one "
                    f"factor; re-export the artifact")
    factor = image[1] // h
    if factor < 1 or factor & (factor - 1):
        raise _fail(f"artifact {art.path}: the VAE upscales by {factor}, not a power of two; optimum's pipeline "
                    f"derives the factor as 2^(levels-1) and cannot describe it")
    model = onnx.load(str(unet_src))
    external = _has_external_data(onnx.load(str(unet_src), load_external_data=False))
    model = bridge_unet(model, source=f"{art.path.name}/{unet_src.name}")

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        _save(model, out_dir / "unet" / "model.onnx", external)
        _write_json(out_dir / "unet" / "config.json", dict(
            _class_name="UNet2DConditionModel", in_channels=c, out_channels=c, sample_size=h if h == w else [h, w],
            cross_attention_dim=int(info["hidden_size"]), time_cond_proj_dim=None, addition_embed_type=None))
        _copy_graph(text_src, out_dir / "text_encoder" / "model.onnx")
        _write_json(out_dir / "text_encoder" / "config.json", dict(
            architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=int(info["hidden_size"]),
            max_position_embeddings=int(info["max_length"]), num_hidden_layers=0))
        _copy_graph(vae_src, out_dir / "vae_decoder" / "model.onnx")
        _write_json(out_dir / "vae_decoder" / "config.json", dict(
            _class_name="AutoencoderKL", latent_channels=c, out_channels=image[0], sample_size=image[1],
            scaling_factor=float(info["scaling_factor"]), block_out_channels=[c] * factor.bit_length()))
        _write_tokenizer(tokenizer_dir, tok_cfg, int(info["max_length"]), out_dir / "tokenizer")
        _write_json(out_dir / "scheduler" / "scheduler_config.json", scheduler)
        _write_json(out_dir / "model_index.json", {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        })
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        if not created:
            out_dir.mkdir(exist_ok=True)
        raise
    return out_dir
