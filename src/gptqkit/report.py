"""`gptqkit report DIR`: a self-contained HTML page about one quantized checkpoint.

It reads what every quantization leaves in the checkpoint (quant_log.json with per-layer loss,
damp, tokens and time; quantize_config.json; the safetensors headers; eval.json with perplexity
when `gptqkit quantize` measured it) and renders a summary (size before/after, bits per
parameter, perplexity, config, calibration, time) and an inline SVG plot of each layer's GPTQ
loss on a log scale, colored by layer kind. No scripts, no external files: the page opens
anywhere, offline.
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.json"  # perplexity before/after, written by `gptqkit quantize` when it evaluates

# layer kind -> (label, color); the first pattern that matches a layer's last name part wins
KINDS: list[tuple[str, str, str]] = [
    ("q", r"^(q_proj|query|wq|q)$", "#1f77b4"),
    ("k", r"^(k_proj|key|wk|k)$", "#ff7f0e"),
    ("v", r"^(v_proj|value|wv|v)$", "#2ca02c"),
    ("qkv", r"(qkv|c_attn|query_key_value|Wqkv)", "#17becf"),
    ("o", r"^(o_proj|out_proj|dense|wo|c_proj|attn_out)$", "#d62728"),
    ("gate", r"^(gate_proj|w1|gate)$", "#9467bd"),
    ("up", r"^(up_proj|w3|fc1|c_fc|dense_h_to_4h|up)$", "#8c564b"),
    ("down", r"^(down_proj|w2|fc2|dense_4h_to_h|down)$", "#e377c2"),
    ("lm_head", r"^lm_head$", "#000000"),
]
OTHER_COLOR = "#7f7f7f"


def layer_kind(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    for kind, rx, _ in KINDS:
        if re.search(rx, last):
            return kind
    return "other"


def kind_color(kind: str) -> str:
    return next((c for k, _, c in KINDS if k == kind), OTHER_COLOR)


def _block_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else None


def collect(directory: str | Path, *, need_log: bool = True) -> dict[str, Any]:
    """Everything the page (and `gptqkit inspect`) shows, as plain data. need_log=False reads any
    GPTQ checkpoint, including peers' without gptqkit's quant_log.json."""
    from safetensors import safe_open

    from .config import QuantizeConfig
    from .errors import CheckpointError
    from .formats.checkpoint import shard_files

    d = Path(directory)
    log_path = d / "quant_log.json"
    if need_log and not log_path.is_file():
        raise FileNotFoundError(f"{d} has no quant_log.json; is it a checkpoint written by gptqkit quantize?")
    qlog = json.loads(log_path.read_text()) if log_path.is_file() else {}
    cfg = QuantizeConfig.load(d)
    model_cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}

    dsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    shapes: dict[str, list[int]] = {}
    qbytes = other_params = other_bytes = 0
    files = shard_files(d)
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    shape, dt = sl.get_shape(), sl.get_dtype()
                    nb = (math.prod(shape) if shape else 1) * dsize.get(dt, 4)
                    shapes[k] = shape
                    if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
                        qbytes += nb
                    else:
                        other_params += math.prod(shape) if shape else 1
                        other_bytes += nb
        except Exception as e:  # safetensors raises its own types for truncated files
            raise CheckpointError(f"{f} is truncated or corrupted ({e}); download or copy it again") from e
    # a quantized layer holds K x N parameters: N from scales [G, N], K from g_idx [K] (or, for
    # checkpoints without g_idx, qweight rows x 32 / bits): per layer, so mixed bits count right
    bits_by_layer = {}
    qparams = 0
    for k, shape in shapes.items():
        if not k.endswith(".qweight"):
            continue
        name = k[: -len(".qweight")]
        K = shapes.get(f"{name}.g_idx", [None])[0]
        if K is None:
            K = shape[0] * 32 // ((cfg.for_module(name) or cfg).bits)
        bits_by_layer[name] = shape[0] * 32 // K
        said = (cfg.for_module(name) or cfg).bits
        if bits_by_layer[name] != said:
            raise CheckpointError(f"{name}: its tensors hold {bits_by_layer[name]}-bit codes, but the quantization "
                                  f"config says {said} bits; the config or the tensors are wrong")
        qparams += K * shape[1]
    total_bytes = sum(f.stat().st_size for f in files)
    layers = qlog.get("layers", [])
    for lay in layers:
        lay["kind"] = layer_kind(lay["name"])
        lay["block"] = _block_index(lay["name"])
    evals = json.loads((d / EVAL_FILE).read_text()) if (d / EVAL_FILE).is_file() else {}
    return {
        "path": str(d),
        "model_type": model_cfg.get("model_type"),
        "architectures": model_cfg.get("architectures"),
        "config": cfg.to_dict(),
        "layers": layers,
        "quantized_layers": len(bits_by_layer),
        "bits_histogram": {b: list(bits_by_layer.values()).count(b) for b in sorted(set(bits_by_layer.values()))},
        "files": [f.name for f in files],
        "seconds": qlog.get("seconds"),
        "forwards": qlog.get("forwards"),
        "calib_tokens": qlog.get("calib_tokens"),
        "mean_loss": qlog.get("mean_loss"),
        "quantized_params": qparams,
        "other_params": other_params,
        "size_bytes": total_bytes,
        "size_fp16_bytes": (qparams + other_params) * 2,
        "quantized_layer_bytes": qbytes,
        "bits_per_param_quantized": qbytes * 8 / qparams if qparams else None,
        "bits_per_param_overall": total_bytes * 8 / max(1, qparams + other_params),
        "eval": evals,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def loss_plot_svg(layers: list[dict], width: int = 1000, height: int = 360) -> str:
    """Inline SVG: each layer's loss (log scale) in quantization order, colored by kind."""
    e = html.escape
    ml, mr, mt, mb = 70, 20, 20, 60
    pw, ph = width - ml - mr, height - mt - mb
    pts = [(i, max(float(l["loss"]), 1e-12), l) for i, l in enumerate(layers)
           if l.get("loss") is not None and math.isfinite(float(l["loss"]))]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="loss-plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="GPTQ loss per layer, log scale">',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>']
    if not pts:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no layers logged</text></svg>')
        return "".join(parts)
    lo = math.floor(math.log10(min(p[1] for p in pts)))
    hi = math.ceil(math.log10(max(p[1] for p in pts)))
    if hi == lo:
        hi += 1
    n = len(layers)

    def X(i: float) -> float:
        return ml + (i + 0.5) * pw / max(1, n)

    def Y(v: float) -> float:
        return mt + ph - (math.log10(v) - lo) / (hi - lo) * ph

    for p in range(lo, hi + 1):  # decades: grid lines and labels
        y = Y(10.0 ** p)
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="12">1e{p}</text>')
    # block boundaries and labels along x
    blocks: dict[int, list[int]] = {}
    for i, lay in enumerate(layers):
        if lay.get("block") is not None:
            blocks.setdefault(lay["block"], []).append(i)
    step = max(1, math.ceil(len(blocks) / 20))
    for b, idx in sorted(blocks.items()):
        x0 = X(idx[0] - 0.5)
        parts.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#eee"/>')
        if b % step == 0:
            xc = (X(idx[0]) + X(idx[-1])) / 2
            parts.append(f'<text x="{xc:.1f}" y="{mt + ph + 16}" text-anchor="middle" font-size="11">{b}</text>')
    parts.append(f'<text x="{ml + pw / 2}" y="{height - 24}" text-anchor="middle" font-size="13">'
                 'decoder block (layers in quantization order)</text>')
    parts.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" font-size="13" '
                 f'transform="rotate(-90 16 {mt + ph / 2})">GPTQ loss (log scale)</text>')
    # one polyline per kind, then the points with tooltips
    kinds: dict[str, list[tuple[int, float, dict]]] = {}
    for p in pts:
        kinds.setdefault(p[2]["kind"], []).append(p)
    for kind, kp in kinds.items():
        if len(kp) > 1:
            d = " ".join(f"{X(i):.1f},{Y(v):.1f}" for i, v, _ in kp)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{kind_color(kind)}" stroke-opacity="0.35"/>')
    r = 4 if n <= 300 else 2.5
    for i, v, lay in pts:
        tip = (f'{lay["name"]}: loss {float(lay["loss"]):.4g}, damp {lay.get("damp")}, {lay.get("bits")} bits, '
               f'g{lay.get("group_size")}, {lay.get("method")}, {lay.get("seconds")} s')
        parts.append(f'<circle class="pt kind-{e(lay["kind"])}" cx="{X(i):.1f}" cy="{Y(v):.1f}" r="{r}" '
                     f'fill="{kind_color(lay["kind"])}"><title>{e(tip)}</title></circle>')
    # legend
    lx = ml + 8
    for kind in [k for k, _, _ in KINDS if k in kinds] + (["other"] if "other" in kinds else []):
        parts.append(f'<circle cx="{lx}" cy="{height - 8}" r="5" fill="{kind_color(kind)}"/>'
                     f'<text x="{lx + 9}" y="{height - 4}" font-size="12">{e(kind)}</text>')
        lx += 18 + 8 * len(kind) + 14
    parts.append("</svg>")
    return "".join(parts)


def render_html(info: dict[str, Any]) -> str:
    e = html.escape
    cfg = info["config"]
    cal = (cfg.get("meta") or {}).get("calibration") or {}
    ev = info.get("eval") or {}

    def ppl(k: str) -> str:
        v = ev.get(k)
        if isinstance(v, dict):
            v = v.get("perplexity")
        return f"{v:.3f}" if isinstance(v, (int, float)) else "not measured"

    rows = [
        ("Model", f'{e(str(info.get("model_type")))} ({e(", ".join(info.get("architectures") or []))})'),
        ("Checkpoint", e(info["path"])),
        ("Size before (fp16 equivalent)", _fmt_bytes(info["size_fp16_bytes"])),
        ("Size after (on disk)", _fmt_bytes(info["size_bytes"])),
        ("Compression", f'{info["size_fp16_bytes"] / max(1, info["size_bytes"]):.2f}x'),
        ("Bits per parameter, quantized layers",
         f'{info["bits_per_param_quantized"]:.3f}' if info["bits_per_param_quantized"] else "-"),
        ("Bits per parameter, whole model", f'{info["bits_per_param_overall"]:.3f}'),
        ("Parameters", f'{info["quantized_params"] / 1e6:.2f}M quantized + {info["other_params"] / 1e6:.2f}M kept'),
        ("Perplexity before / after", f'{ppl("ppl_before")} / {ppl("ppl_after")}'
         + (f' ({e(str(ev.get("text")))})' if ev.get("text") else "")),
        ("Quantization time", f'{info["seconds"]:.1f} s' if info.get("seconds") is not None else "-"),
        ("Block forwards", e(str(info.get("forwards")))),
        ("Calibration", e(f'{cal.get("source", "?")}: {cal.get("nsamples", "?")} x {cal.get("seqlen", "?")} tokens, '
                          f'seed {cal.get("seed", "?")}') + f' ({info.get("calib_tokens")} real tokens)'),
        ("Mean layer loss", f'{info["mean_loss"]:.4g}' if info.get("mean_loss") is not None else "-"),
    ]
    summary = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    shown = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "true_sequential", "mse",
             "lm_head", "checkpoint_format", "dynamic")
    cfg_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(json.dumps(cfg.get(k)))}</td></tr>" for k in shown if k in cfg)
    # per-kind summary
    by_kind: dict[str, list[float]] = {}
    for lay in info["layers"]:
        by_kind.setdefault(lay["kind"], []).append(float(lay["loss"]))
    kind_rows = "".join(
        f'<tr><td><span class="sw" style="background:{kind_color(k)}"></span>{e(k)}</td><td>{len(v)}</td>'
        f'<td>{sum(v) / len(v):.4g}</td><td>{max(v):.4g}</td></tr>' for k, v in by_kind.items())
    worst = sorted(info["layers"], key=lambda l: -float(l["loss"]))[:10]
    layer_rows = "".join(
        f'<tr><td>{e(l["name"])}</td><td>{e(l["kind"])}</td><td>{float(l["loss"]):.4g}</td>'
        f'<td>{e(str(l.get("damp")))}</td><td>{e(str(l.get("bits")))}</td><td>{e(str(l.get("group_size")))}</td>'
        f'<td>{e(str(l.get("method")))}</td><td>{e(str(l.get("tokens")))}</td><td>{e(str(l.get("seconds")))}</td></tr>'
        for l in worst)
    bumped = [l for l in info["layers"] if l.get("damp") is not None and float(l["damp"]) > float(cfg["damp_percent"])]
    note = (f"<p class=note>{len(bumped)} layer(s) needed more damping than damp_percent={cfg['damp_percent']} "
            f"(the Hessian was ill-conditioned).</p>" if bumped else "")
    headline = e(f'{_fmt_bytes(info["size_fp16_bytes"])} (fp16) -> {_fmt_bytes(info["size_bytes"])}, '
                 f'{info["bits_per_param_overall"]:.2f} bits/param overall; {len(info["layers"])} layers; '
                 f'perplexity {ppl("ppl_before")} -> {ppl("ppl_after")}; '
                 + (f'{info["seconds"]:.1f} s' if info.get("seconds") is not None else ""))
    title = f'gptqkit report: {info.get("model_type") or ""} {cfg["bits"]}-bit g{cfg["group_size"]}'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 22px; margin: 0 0 12px; }} h2 {{ font-size: 17px; margin: 22px 0 8px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; }}
th {{ background: #f3f3f3; font-weight: 600; }}
.cols {{ display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }}
.sw {{ display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 6px; }}
.note {{ color: #8a5a00; }}
</style></head><body>
<h1>{e(title)}</h1>
<p id="headline">{headline}</p>
<h2>GPTQ loss per layer</h2>
{loss_plot_svg(info["layers"])}
{note}
<div class="cols">
<div><h2>Summary</h2><table id="summary">{summary}</table></div>
<div><h2>Config</h2><table id="config">{cfg_rows}</table></div>
<div><h2>Loss by layer kind</h2><table id="kinds"><tr><th>kind</th><th>layers</th><th>mean loss</th>
<th>max loss</th></tr>{kind_rows}</table></div>
</div>
<h2>Largest losses</h2>
<table id="worst"><tr><th>layer</th><th>kind</th><th>loss</th><th>damp</th><th>bits</th><th>group</th><th>method</th>
<th>tokens</th><th>seconds</th></tr>{layer_rows}</table>
<p style="font-size:12px;color:#777">Loss: GPTQ's error estimate of each layer, Σ (w−q)² / [H⁻¹]ᵢᵢ / 2 over its
weights (what the reference implementation logs), from quant_log.json / quant_log.csv; hover a point for details.</p>
</body></html>
"""


def write_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Render the report of checkpoint `directory` to `out` (default DIR/report.html)."""
    info = collect(directory)
    out = Path(out) if out else Path(directory) / "report.html"
    out.write_text(render_html(info), encoding="utf-8")
    return out
