"""Execution-provider map: which artifact graph runs its integer ops on which ONNX Runtime provider, and why.

    python benchmarks/provider_map.py [ARTIFACT] [--out DIR] [--rss] [--no-dedupe] [--trust-artifact]

Without ARTIFACT, builds one (`qexport convert digits16-ddpm --bits 8 --static-groups -o
/tmp/art-provmap`, ~30-60 s). For every graph file in the manifest it records:
  * the verdict of `python -m onnxruntime.tools.check_onnx_model_mobile_usability FILE` (NNAPI,
    CoreML NeuralNetwork and CoreML MLProgram: partitions, nodes, unsupported ops, caveats, as-is
    and with fixed shapes). The checker looks only at op types and shapes, so graphs that differ
    only in initializer values (the static-group graphs) are checked once and share the verdict
    (`verdict_from`), unless --no-dedupe;
  * what the checker does not check: whether every quantization scale / zero point is a constant
    initializer (NNAPI, QNN and XNNPACK need that), the activation and weight integer types
    (XNNPACK's quantized Conv takes u8×u8 per-tensor or s8×s8, not u8 activations × s8
    per-channel weights), and `Loop` subgraphs;
  * on the CPU EP, the ops that actually ran (ORT profiling `op_name`s, with the runtime's own
    session options) and which of them are integer kernels;
  * the providers this onnxruntime build offers, and (--rss) the runtime's peak RSS at B=1.
Writes benchmarks/results/provider_map.json and provider_map.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARTIFACT = Path("/tmp/art-provmap")
GRAPH_SUFFIXES = (".onnx", ".ort")
EPS = ("NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram")
# Input indices of the scales and of the zero points, per quantized op.
SCALE_INPUTS = {"QuantizeLinear": (1,), "DequantizeLinear": (1,), "QLinearConv": (1, 4, 6), "QLinearMatMul": (1, 4, 6),
                "MatMulIntegerToFloat": (2, 3)}
ZERO_POINT_INPUTS = {"QuantizeLinear": (2,), "DequantizeLinear": (2,), "QLinearConv": (2, 5, 7),
                     "QLinearMatMul": (2, 5, 7), "MatMulIntegerToFloat": (4, 5)}
INTEGER_KERNELS = {"QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM"}


def is_integer_kernel(op: str) -> bool:
    """An ORT kernel that computes on 8-bit integers (QLinear*, *Integer*, QGemm …), not Q/DQ conversions."""
    return op.startswith("QLinear") or "Integer" in op or op in INTEGER_KERNELS


# ---------------------------------------------------------------------------------------------- the checker


def run_checker(path: Path, timeout: float = 600) -> dict:
    """`check_onnx_model_mobile_usability` on one file, its log parsed per EP (raw lines kept)."""
    cmd = [sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability", str(path)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=path.parent)
    except subprocess.TimeoutExpired:
        return dict(command=" ".join(cmd[1:]), returncode=None, error=f"timed out after {timeout:.0f} s")
    lines = [ln.split(":  ", 1)[1] if ":  " in ln else ln for ln in (p.stdout + p.stderr).splitlines()]
    out = dict(command=f"python -m onnxruntime.tools.check_onnx_model_mobile_usability {path.name}",
               returncode=p.returncode, eps=parse_checker(lines), log=lines)
    final = [ln for ln in lines if ln.startswith(("For optimal performance", "As NNAPI or CoreML may"))]
    out["recommendation"] = final[-1].strip() if final else None
    if p.returncode != 0:
        err = [ln for ln in lines if ln.strip()]
        out["error"] = err[-1][:300] if err else f"exit code {p.returncode}"
    return out


def parse_checker(lines: list[str]) -> dict:
    """Per EP: 'as_is' and 'fixed_shapes' partition info, the suitability verdicts, ops and caveats."""
    eps, ep, part, in_caveats = {}, None, None, False
    for raw in lines:
        ln = raw.strip()
        m = re.match(r"Checking (NNAPI|CoreML NeuralNetwork|CoreML MLProgram)$", ln)
        if m:
            ep = eps.setdefault(m.group(1), dict(as_is={}, fixed_shapes=None, verdict=None,
                                                 verdict_fixed_shapes=None, caveats=[]))
            part, in_caveats = ep["as_is"], False
            continue
        if ep is None:
            continue
        if ln.startswith("Partition information if the model was updated to make the shapes fixed"):
            ep["fixed_shapes"] = part = {}
            in_caveats = False
            continue
        m = re.match(r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled", ln)
        if m:
            part.update(partitions=int(m.group(1)), supported_nodes=int(m.group(2)), nodes=int(m.group(3)))
            in_caveats = False
            continue
        m = re.match(r"Partition sizes: \[(.*)\]", ln)
        if m:
            part["partition_sizes"] = [int(v) for v in m.group(1).split(",") if v.strip()]
            continue
        m = re.match(r"Unsupported ops: (.*)", ln)
        if m:
            part["unsupported_ops"] = m.group(1).split(",")
            continue
        m = re.match(r"Unsupported nodes due to (operator|input having a dynamic shape)=(\d+)", ln)
        if m:
            part["unsupported_due_to_" + ("op" if m.group(1) == "operator" else "dynamic_shape")] = int(m.group(2))
            in_caveats = False
            continue
        if ln.startswith("Caveats that have not been checked"):
            in_caveats = True
            continue
        m = re.match(r"(\d+) nodes are in (\d+) subgraphs", ln)
        if m:
            part.update(subgraph_nodes=int(m.group(1)), subgraphs=int(m.group(2)))
            in_caveats = False
            continue
        m = re.match(r"Model should perform well with .* as is: (\w+)", ln)
        if m:
            ep["verdict"] = m.group(1)
            in_caveats = False
            continue
        m = re.match(r"Model should perform well with .* if modified to have fixed input shapes: (\w+)", ln)
        if m:
            ep["verdict_fixed_shapes"] = m.group(1)
            continue
        if in_caveats and ln and ":" in ln and not ln.startswith(("INFO", "=")):
            if ln not in ep["caveats"]:
                ep["caveats"].append(ln)
            continue
        if re.search(r"(should work|may work|not work|not recommended|can be considered|cannot run)", ln):
            part["message"] = ln
            in_caveats = False
    return eps


# ---------------------------------------------------------------------------------------------- graph facts


def load_graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def all_graphs(graph):
    """The graph and every subgraph (Loop / If / Scan bodies), with the initializers visible in each."""
    stack = [(graph, set())]
    while stack:
        g, outer = stack.pop()
        visible = outer | {i.name for i in g.initializer}
        yield g, visible
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append((a.g, visible))
                for sg in a.graphs:
                    stack.append((sg, visible))


def structure_hash(model) -> str:
    """Hash of everything the mobile checker reads (ops, wiring, shapes, dtypes), not initializer values."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.metadata_props[:]
    for g, _ in all_graphs(m.graph):
        for t in g.initializer:
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                      "string_data", "external_data"):
                t.ClearField(f)
            t.ClearField("data_location")
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.HasField("t"):
                        a.t.ClearField("raw_data")
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()[:16]


def qparam_facts(model) -> dict:
    """Where each quantization scale / zero point comes from, and the integer types of activations and weights."""
    import onnx
    from onnx import numpy_helper

    src = {"scales": Counter(), "zero_points": Counter()}
    computed_from = Counter()
    act_types, weight_kinds = Counter(), Counter()
    ops = Counter()
    loops = 0
    for g, visible in all_graphs(model.graph):
        inits = {i.name: i for i in g.initializer}
        consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
        producer = {o: n.op_type for n in g.node for o in n.output}
        for n in g.node:
            ops[n.op_type] += 1
            loops += n.op_type in ("Loop", "Scan", "If")
            for what, table in (("scales", SCALE_INPUTS), ("zero_points", ZERO_POINT_INPUTS)):
                for i in table.get(n.op_type, ()):
                    if i >= len(n.input) or not n.input[i]:
                        continue
                    name = n.input[i]
                    kind = "initializer" if name in visible else "constant" if name in consts else "computed"
                    src[what][kind] += 1
                    if kind == "computed":
                        computed_from[producer.get(name, "graph input")] += 1
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
                zp = n.input[2] if len(n.input) > 2 else ""
                act_types[onnx.TensorProto.DataType.Name(inits[zp].data_type) if zp in inits else "UINT8"] += 1
            if n.op_type == "DequantizeLinear" and n.input[0] in inits:
                w, s = inits[n.input[0]], inits.get(n.input[1])
                zp = inits.get(n.input[2]) if len(n.input) > 2 else None
                per_channel = s is not None and (s.dims[0] if s.dims else 1) > 1
                zp0 = zp is None or (not zp.external_data and not numpy_helper.to_array(zp).any())
                weight_kinds[(onnx.TensorProto.DataType.Name(w.data_type),
                              "per-channel" if per_channel else "per-tensor", "zp 0" if zp0 else "zp≠0")] += 1
    total = sum(src["scales"].values())
    const = all(set(c) <= {"initializer"} for c in src.values())
    return dict(scales=dict(src["scales"]), zero_points=dict(src["zero_points"]),
                qparams_computed_from=dict(computed_from),
                constant_scales=bool(total) and const, quantized=bool(total),
                activation_types=dict(act_types),
                weight_types={" ".join(k): v for k, v in weight_kinds.items()},
                subgraph_ops=loops, op_counts=dict(ops))


def xnnpack_quant_verdict(facts: dict) -> str:
    """Whether ORT's XNNPACK EP could take this graph's quantized Conv groups (its GetTensorQuantType /
    GetConvCompType rules: constant scales; u8 only per-tensor; s8 weights per-channel need s8 activations)."""
    if not facts["quantized"]:
        return "float graph: no integer ops"
    if not facts["constant_scales"]:
        return "no: scales are computed in the graph (XNNPACK reads scales as constant initializers)"
    acts = set(facts["activation_types"])
    per_channel_s8 = any(k.startswith("INT8 per-channel") for k in facts["weight_types"])
    if "UINT8" in acts and per_channel_s8:
        return "no: u8 activations × s8 per-channel weights (XNNPACK's quantized Conv has no u8s8)"
    return "maybe: constant scales and a type combination XNNPACK's Conv takes (MatMul/Gemm stay on CPU)"


# ---------------------------------------------------------------------------------------------- CPU profiling


def feeds_for(session, manifest) -> dict | None:
    """Inputs for one profiled run at B=1 (U-Net: t=500; pipeline: 2 steps); None for unknown inputs."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = [1, *manifest.sample_shape]
    feeds = {}
    for i in session.get_inputs():
        if i.name in ("sample", "noise"):
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        elif i.name == "timestep":
            feeds[i.name] = np.array([500], dtype=np.int64)
        elif i.name == "steps":
            feeds[i.name] = np.array([2], dtype=np.int64)
        else:
            return None
    return feeds


def cpu_profile(path: Path, manifest, trusted: bool = False) -> dict:
    """Run the graph once on the CPU EP with profiling; count the kernels that ran, per op and provider."""
    import onnxruntime as ort

    from qexport_runtime.session import session_options

    if path.suffix == ".ort" and not trusted:
        return dict(skipped="ORT-format graph: loaded only with --trust-artifact (it may carry saved "
                            "runtime optimizations)")
    so = session_options(threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        needs_ext = "png" in path.stem
        if needs_ext:
            try:
                from onnxruntime_extensions import get_library_path
            except ImportError:
                return dict(skipped="needs onnxruntime-extensions (pip install onnxruntime-extensions)")
            so.register_custom_ops_library(get_library_path())
        try:
            sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (record ORT's reason, whatever its type)
            return dict(error=f"onnxruntime cannot load it: {str(e).strip().splitlines()[0][:200]}")
        feeds = feeds_for(sess, manifest)
        if feeds is None:
            sess.end_profiling()
            return dict(skipped=f"unknown inputs {[i.name for i in sess.get_inputs()]}")
        sess.run(None, feeds)
        prof = sess.end_profiling()
        events = json.loads(Path(prof).read_text())
    kernels, providers = Counter(), Counter()
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and "op_name" in args:
            kernels[args["op_name"]] += 1
            providers[args.get("provider", "?")] += 1
    integer = {k: v for k, v in sorted(kernels.items()) if is_integer_kernel(k)}
    return dict(providers=dict(providers), kernels=dict(sorted(kernels.items())), integer_kernels=integer,
                float_conv_matmul={k: kernels[k] for k in ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul",
                                                           "Gemm", "FusedGemm") if kernels.get(k)},
                qdq_conversions={k: kernels[k] for k in ("QuantizeLinear", "DequantizeLinear") if kernels.get(k)})


def runtime_peak_rss(artifact: Path, role: str, steps: int = 50) -> dict:
    """VmHWM of a fresh process: imports, then the runtime's Sampler (probes, correction) sampling one image."""
    code = f"""
import json
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
from qexport_runtime.artifact import load_artifact
from qexport_runtime.sampler import Sampler
base = hwm()
s = Sampler(load_artifact({str(artifact)!r}), role={role!r}, threads=None)
s.sample(num_steps={steps}, batch=1, seed=0)
print(json.dumps(dict(role={role!r}, steps={steps}, batch=1, baseline_mb=round(base, 1), peak_mb=round(hwm(), 1))))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *[p for p in sys.path if p]])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return dict(role=role, error=(p.stderr.strip().splitlines() or ["?"])[-1][:200])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["delta_mb"] = round(r["peak_mb"] - r["baseline_mb"], 1)
    return r


# ---------------------------------------------------------------------------------------------- the map


def build_map(artifact: Path, dedupe: bool = True, trusted: bool = False, rss: bool = False,
              progress: bool = True) -> dict:
    import onnxruntime as ort
    from tqdm import tqdm

    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.bench import machine_info

    art = load_artifact(artifact)
    graphs = [(n, e.role) for n, e in art.manifest.files.items() if n.endswith(GRAPH_SUFFIXES)]
    files, seen = {}, {}
    for name, role in tqdm(graphs, desc="provider map", unit="graph", leave=False, disable=not progress):
        path = art.path / name
        entry = dict(role=role, bytes=art.manifest.files[name].bytes)
        if path.suffix == ".ort":
            entry["checker"] = dict(skipped="the checker reads .onnx files only; see the .onnx it was made from")
        else:
            model = load_graph(path)
            entry["facts"] = qparam_facts(model)
            entry["xnnpack"] = xnnpack_quant_verdict(entry["facts"])
            h = structure_hash(model)
            entry["structure"] = h
            if dedupe and h in seen:
                entry["checker"] = dict(verdict_from=seen[h], eps=files[seen[h]]["checker"].get("eps"),
                                        recommendation=files[seen[h]]["checker"].get("recommendation"))
            else:
                entry["checker"] = run_checker(path)
                seen[h] = name
        entry["cpu"] = cpu_profile(path, art.manifest, trusted=trusted)
        files[name] = entry
    m = machine_info()
    out = dict(artifact=str(art.path), source=art.manifest.source.get("model_id"), bits=art.manifest.bits,
               groups=art.manifest.groups, onnxruntime=ort.__version__,
               available_providers=ort.get_available_providers(),
               machine=dict(cpu=m["cpu"], arch=m["arch"], cores=m["cores"], isa=m["isa"]),
               files=files)
    if rss:
        out["peak_rss"] = [runtime_peak_rss(art.path, r) for r in ("int", "fp32") if art.manifest.files_with_role(r)]
    out["map"] = provider_table(out)
    return out


def provider_table(res: dict) -> list[dict]:
    """One row per kind of graph: where its integer ops run on each provider, and why (checked ⇒ 'here')."""
    rows = []
    kinds = {}
    for name, e in res["files"].items():
        kinds.setdefault(e["role"], []).append(name)

    def checker_cell(names, ep):
        e = res["files"][names[0]].get("checker", {})
        v = (e.get("eps") or {}).get(ep)
        if not v:
            return "not checked"
        a, f = v.get("as_is", {}), v.get("fixed_shapes") or {}
        s = f"checker: {v['verdict']}"
        if f:
            s += f" ({f.get('partitions')} partitions, {f.get('supported_nodes')}/{f.get('nodes')} nodes with fixed shapes)"
        elif a:
            s += f" ({a.get('partitions')} partitions, {a.get('supported_nodes')}/{a.get('nodes')} nodes)"
        return s

    for role, names in kinds.items():
        first = res["files"][names[0]]
        facts = first.get("facts")
        label = names[0] if len(names) == 1 else re.sub(r"g\d{3}", "gNNN", names[0]) + f" (×{len(names)})"
        cpu = first["cpu"]
        if "integer_kernels" in cpu:
            ik = cpu["integer_kernels"]
            cpu_cell = ("integer: " + ", ".join(f"{k}×{v}" for k, v in ik.items())) if ik else \
                "float kernels only (no integer kernel ran)"
            cpu_cell += " (profiled here)"
        else:
            cpu_cell = cpu.get("skipped") or cpu.get("error") or "?"
        if facts is None:  # .ort
            rows.append(dict(file=label, role=role, CPU="same kernels as the .onnx it was converted from "
                             "(ORT-format: for minimal/mobile builds)",
                             XNNPACK="as its .onnx", NNAPI="as its .onnx", QNN="as its .onnx", CoreML="as its .onnx"))
            continue
        const = facts["constant_scales"]
        loop = facts["subgraph_ops"] > 0
        why_scales = ("scales looked up in the graph (" + ", ".join(f"{k}→scale×{v}" for k, v in
                      facts["qparams_computed_from"].items()) + ")") if facts["quantized"] and not const else ""
        if not facts["quantized"]:
            row = dict(XNNPACK="no integer ops (float reference)", NNAPI="float; " + checker_cell(names, "NNAPI"),
                       QNN="no integer ops (float reference)",
                       CoreML="float; " + checker_cell(names, "CoreML MLProgram"))
        else:
            nn = "integer ops stay on CPU: " + (why_scales if not const else "")
            if const:
                nn = "constant scales meet NNAPI's Q/DQ caveat; " + checker_cell(names, "NNAPI")
            else:
                nn += "; " + checker_cell(names, "NNAPI")
            if loop:
                nn += "; Loop body not partitioned"
            qnn = ("route to the HTP: constant scales, u8 activations with s8 per-channel weights (not run here: "
                   "no QNN EP in this build)") if const and not loop else \
                  "integer ops stay on CPU: " + ("Loop subgraph" if loop else "QNN needs constant scales") + \
                  " (not run here)"
            coreml = "no int8 ops: Q/DQ/QLinear* are not in the CoreML EP's op lists; " + \
                checker_cell(names, "CoreML MLProgram")
            row = dict(XNNPACK=first["xnnpack"] + "; MatMul/Gemm groups are not XNNPACK ops",
                       NNAPI=nn, QNN=qnn, CoreML=coreml)
        rows.append(dict(file=label, role=role, CPU=cpu_cell, **row))
    return rows


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Execution-provider map: {Path(res['artifact']).name} ({res['source']}, "
             f"W{res['bits'].get('weights')}A{res['bits'].get('activations')}, {res['groups']} groups)", "",
             f"onnxruntime {res['onnxruntime']} on {m['cpu']} ({m['arch']}, {m['cores']} cores, {m['isa']}); "
             f"providers in this build: {', '.join(res['available_providers'])}.", "",
             "## Where the integer ops run", "",
             "| file | CPU | XNNPACK | NNAPI | QNN | CoreML |", "|---|---|---|---|---|---|"]
    for r in res["map"]:
        lines.append(f"| `{r['file']}` | {r['CPU']} | {r['XNNPACK']} | {r['NNAPI']} | {r['QNN']} | {r['CoreML']} |")
    missing = [ep for ep in ("XNNPACK", "NNAPI", "QNN", "CoreML")
               if not any(p.lower().startswith(ep.lower()) for p in res["available_providers"])]
    if missing:
        lines += ["", f"{', '.join(missing)} are not in this onnxruntime build: their columns come from the mobile "
                  "usability checker, the graph facts computed here (scale sources, integer types, subgraphs) and "
                  "the EPs' support rules in ORT's sources and docs, not from a run."]
    lines += ["", "## check_onnx_model_mobile_usability verdicts", "",
              "As is / with fixed shapes (`make_dynamic_shape_fixed` on `batch`): verdict (partitions, "
              "supported/total nodes). The checker tests op types and shapes only, not its caveats (such as "
              "constant scales).", "",
              "| file | NNAPI | CoreML NeuralNetwork | CoreML MLProgram | unsupported ops (NNAPI) | recommendation |",
              "|---|---|---|---|---|---|"]

    def cell(v):
        if not v:
            return "—"
        a, f = v.get("as_is") or {}, v.get("fixed_shapes") or {}
        s = f"{v.get('verdict')} ({a.get('partitions')}, {a.get('supported_nodes')}/{a.get('nodes')})"
        if f:
            s += f" / {v.get('verdict_fixed_shapes')} ({f.get('partitions')}, {f.get('supported_nodes')}/{f.get('nodes')})"
        return s

    for name, e in res["files"].items():
        c = e.get("checker", {})
        if "skipped" in c or "error" in c and not c.get("eps"):
            lines.append(f"| `{name}` | {c.get('skipped') or c.get('error')} | | | | |")
            continue
        eps = c.get("eps") or {}
        nn = eps.get("NNAPI") or {}
        unsup = ", ".join(o.split(":")[-1] for o in (nn.get("as_is") or {}).get("unsupported_ops", []))
        rec = c.get("recommendation") or ""
        rec = "CPU EP" if rec.startswith("For optimal") else ("try NNAPI/CoreML" if rec else "?")
        via = f" (= {c['verdict_from']})" if c.get("verdict_from") else ""
        lines.append(f"| `{name}`{via} | {cell(nn)} | {cell(eps.get('CoreML NeuralNetwork'))} | "
                     f"{cell(eps.get('CoreML MLProgram'))} | {unsup} | {rec} |")
    lines += ["", "## Quantization parameters and CPU kernels", "",
              "| file | scale / zero-point inputs (where from) | activations | weights | CPU integer kernels | float Conv/MatMul on CPU |",
              "|---|---|---|---|---|---|"]
    for name, e in res["files"].items():
        f = e.get("facts")
        if f is None:
            continue
        cpu = e["cpu"]
        ik = ", ".join(f"{k}×{v}" for k, v in (cpu.get("integer_kernels") or {}).items()) or \
            (cpu.get("skipped") or cpu.get("error") or "none")
        fl = ", ".join(f"{k}×{v}" for k, v in (cpu.get("float_conv_matmul") or {}).items()) or "none"
        qp = "; ".join(f"{w}: " + ", ".join(f"{k} {v}" for k, v in f[w].items()) for w in ("scales", "zero_points")
                       if f[w]) or "none"
        lines.append(f"| `{name}` | {qp} | {', '.join(f['activation_types']) or '—'} | "
                     f"{', '.join(f['weight_types']) or '—'} | {ik} | {fl} |")
    if res.get("peak_rss"):
        lines += ["", "## Peak RSS of the Python runtime (fresh process, B=1, 50 DDIM steps)", "",
                  "| graph role | after imports (MB) | peak (MB) | added by the session and loop (MB) |", "|---|---|---|---|"]
        for r in res["peak_rss"]:
            if "error" in r:
                lines.append(f"| {r['role']} | {r['error']} | | |")
            else:
                lines.append(f"| {r['role']} | {r['baseline_mb']} | {r['peak_mb']} | {r['delta_mb']} |")
    return "\n".join(lines) + "\n"


def write_results(res: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(res))
    for e in slim["files"].values():  # the raw log is long; keep it, but only once per checked structure
        e.get("checker", {}).pop("log", None) if e.get("checker", {}).get("verdict_from") else None
    (out / "provider_map.json").write_text(json.dumps(slim, indent=2) + "\n")
    (out / "provider_map.md").write_text(to_markdown(res))
    return out / "provider_map.json", out / "provider_map.md"


def build_artifact(out: Path) -> Path:
    if (out / "manifest.json").exists():
        return out
    subprocess.run(["qexport", "convert", "digits16-ddpm", "--bits", "8", "--static-groups", "-o", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", nargs="?", type=Path, help=f"artifact folder (default: build {DEFAULT_ARTIFACT})")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for provider_map.json / .md")
    p.add_argument("--rss", action="store_true", help="also measure the runtime's peak RSS at B=1 (fresh process)")
    p.add_argument("--no-dedupe", action="store_true", help="run the checker on every file, even identical structures")
    p.add_argument("--trust-artifact", action="store_true", help="profile .ort files too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    art = a.artifact or build_artifact(DEFAULT_ARTIFACT)
    res = build_map(art, dedupe=not a.no_dedupe, trusted=a.trust_artifact, rss=a.rss, progress=not a.quiet)
    js, md = write_results(res, a.out)
    print(md.read_text())
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
