"""Checkpoint formats and weight-only quantization: int8 per channel, int4 per group (round-to-nearest or GPTQ), the
plain PyTorch layers that run them, loading and saving checkpoints, and the quantize.py command line.

Formats (what `quantize.py` writes and `generate.py` recognises from the tensors themselves):
  int8: `weight` int8 [N, K], `scales` [N]                      ->  w = weight * scales
  int4: `weight` uint8 [N, K/2] (even k in the high nibble), `scales_and_zeros` [K/g, N, 2]
                                                                ->  w = (q - 8) * scale + zero
The int4 layout is the input of `torch.ops.aten._convert_weight_to_int4pack`; at load time it is repacked for
our int4 GEMV on CUDA (kernels.py), for tinygemm (--kernels torch) or for torch's CPU int4 kernel.
"""

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from model import ConditionalFeedForward, ModelArgs, Transformer

GROUPSIZES = (32, 64, 128, 256)
# int4 inputs with more rows (prefill) dequantize to bf16 and matmul: the int4 kernels are built for few rows
DEQUANT_MIN_ROWS = 64

# ---------------------------------------------------------------- quantizers


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel: w [N, K] -> (int8 [N, K], scales [N]), error <= scale / 2."""
    scales = w.float().abs().amax(dim=-1).clamp(min=1e-8) * (1 / 127)  # CUDA divides by a scalar this way: same bits
    q = torch.clamp(torch.round(w.float() / scales[..., None]), -127, 127).to(torch.int8)
    return q, scales.to(w.dtype)


def int4_group_params(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Asymmetric per-group scale and zero of w [N, K] -> ([N, K/g], [N, K/g]) such that w ~ (q - 8) * s + z."""
    wg = w.float().reshape(w.shape[0], -1, groupsize)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = (hi - lo).clamp(min=1e-6) * (1 / 15)  # as CUDA divides by a scalar: the same bits on every device
    return scales, lo + 8 * scales


def int4_quantize_with(w: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    """Integer codes 0..15 of w [N, K] for given group scales/zeros [N, K/g]."""
    wg = w.float().reshape(w.shape[0], -1, groupsize)
    q = torch.round((wg - zeros[..., None]) / scales[..., None]) + 8
    return q.clamp(0, 15).reshape(w.shape).to(torch.int32)


def pack_int4(q: Tensor, scales: Tensor, zeros: Tensor, dtype=torch.bfloat16) -> tuple[Tensor, Tensor]:
    """Codes [N, K] and params [N, K/g] -> (uint8 [N, K/2], scales_and_zeros [K/g, N, 2])."""
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    return packed, torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)


def quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest groupwise int4: w [N, K] -> (uint8 [N, K/2], scales_and_zeros [K/g, N, 2])."""
    scales, zeros = int4_group_params(w, groupsize)
    return pack_int4(int4_quantize_with(w, scales, zeros, groupsize), scales, zeros, w.dtype)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] -> codes [N, K] (int32, 0..15)."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def tinygemm_codes(packed: Tensor) -> Tensor:
    """torch's CUDA int4 layout (`_convert_weight_to_int4pack`: int32 [N/8, K/(16 IK), 32, IK/2] for IK inner k-tiles)
    -> codes uint8 [N, K]. Lane t of an 8-row tile holds row t // 4; its word j covers bytes 16 j + 4 i + t % 4 of the
    super-tile (i = 0..3), whose high nibbles (even k) sit in bits 4i..4i+3 and low nibbles (odd k) in bits 16+4i..
    prepare_for_device checks this against torch's own packing before trusting it."""
    NT, KO, _, J = packed.shape
    shifts = torch.tensor([0, 16, 4, 20, 8, 24, 12, 28], dtype=torch.int32, device=packed.device)  # (i, even/odd k)
    q = ((packed.view(NT, KO, 8, 4, J, 1) >> shifts) & 15).to(torch.uint8)  # [NT, KO, r, c, J, (i, parity)]
    q = q.view(NT, KO, 8, 4, J, 4, 2).permute(0, 2, 1, 4, 5, 3, 6)  # [NT, r, KO, J, i, c, parity]
    return q.reshape(NT * 8, KO * J * 32)


def dequantize_codes(q: Tensor, scales_and_zeros: Tensor, dtype) -> Tensor:
    """Codes [N, K] and scales_and_zeros [K/g, N, 2] -> weights [N, K] = (q - 8) * scale + zero, group by group."""
    N, K = q.shape
    s, z = scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # [N, K/g] each
    return ((q.view(N, s.shape[1], -1).to(dtype) - 8) * s[..., None] + z[..., None]).view(N, K)


def dequantize_int4(packed: Tensor, scales_and_zeros: Tensor, dtype) -> Tensor:
    """The plain-PyTorch reference: uint8 [N, K/2], [K/g, N, 2] -> weights [N, K]."""
    return dequantize_codes(unpack_int4(packed), scales_and_zeros, dtype)


@torch.library.custom_op("gptfast::int4_mm_cpu", mutates_args=())
def int4_mm_cpu(x: Tensor, packed: Tensor, groupsize: int, scales_and_zeros: Tensor) -> Tensor:
    """torch's CPU int4 matmul, opaque to inductor: inductor's own lowering of it loses the group size inside a
    compiled layer region ("group size must be a scalar", torch 2.11-2.13)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, groupsize, scales_and_zeros)


@int4_mm_cpu.register_fake
def _(x, packed, groupsize, scales_and_zeros):
    return x.new_empty(x.shape[0], scales_and_zeros.shape[1])  # [M, N]


# ---------------------------------------------------------------- quantized layers


class WeightOnlyInt8Linear(nn.Module):
    """w = weight * scales, per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype)) * self.scales


class WeightOnlyInt4Linear(nn.Module):
    """w = (q - 8) * scale + zero, per group of inputs. kernel: "tinygemm" (CUDA, torch's _weight_int4pack_mm),
    "cpu" (torch's CPU int4 mm) or "reference" (dequantize + matmul); chosen by prepare_for_device (kernels.py's
    Int4GemvLinear runs our own on CUDA)."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2, dtype=dtype))
        self.kernel = "reference"
        self.register_buffer("packed", None, persistent=False)  # the kernel's own layout, made by prepare_for_device
        self.dequant_prefill = False  # tinygemm: inputs of over DEQUANT_MIN_ROWS rows dequantize and matmul instead

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.kernel == "tinygemm" and self.dequant_prefill and x.shape[0] > DEQUANT_MIN_ROWS:
            y = F.linear(x, dequantize_codes(tinygemm_codes(self.packed), self.scales_and_zeros, x.dtype))
        elif self.kernel == "tinygemm":
            y = torch.ops.aten._weight_int4pack_mm(
                x.to(torch.bfloat16), self.packed, self.groupsize, self.scales_and_zeros.to(torch.bfloat16)
            )
        elif self.kernel == "cpu":
            y = int4_mm_cpu(x, self.packed, self.groupsize, self.scales_and_zeros.to(x.dtype))
        else:
            y = F.linear(x, dequantize_int4(self.weight, self.scales_and_zeros, x.dtype))
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class ConditionalFeedForwardInt8(ConditionalFeedForward):
    """Mixtral experts with int8 weights [E, out, in] and per-(expert, out-channel) scales."""

    def __init__(self, num_experts: int, dim: int, intermediate_size: int, dtype=torch.bfloat16):
        nn.Module.__init__(self)
        E, I, D = num_experts, intermediate_size, dim
        for name, shape in (("w1", (E, I, D)), ("w2", (E, D, I)), ("w3", (E, I, D))):
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8))
            self.register_buffer("scales" + name[1], torch.ones(shape[:2], dtype=dtype))

    def expert_weight(self, name: str, idx) -> Tensor:
        scales = getattr(self, "scales" + name[1])
        return getattr(self, name)[idx].to(scales.dtype) * scales[idx].unsqueeze(-1)


# ---------------------------------------------------------------- whole-model transforms


def linear_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def int4_fits(in_features: int, groupsize: int) -> bool:
    """torch's int4 kernels need K divisible by the group size and by 32 (two 16-wide k-tiles)."""
    return in_features % groupsize == 0 and in_features % 32 == 0


@torch.no_grad()
def quantize_model(model: Transformer, mode: str, groupsize: int = 32, device=None, gptq_inputs=None) -> Transformer:
    """Quantize a loaded model's linear layers (and Mixtral experts) in place; returns the model."""
    if mode not in ("int8", "int4", "int4-gptq"):
        raise ValueError(f"unknown quantization mode {mode!r}: int8, int4 or int4-gptq")
    if mode != "int8":
        check_groupsize(model, groupsize)
    if mode == "int4-gptq":
        if gptq_inputs is None:
            raise ValueError("int4-gptq needs calibration tokens (gptq_inputs)")
        gptq_quantize_model(model, gptq_inputs, groupsize)
    kept = []  # int4: layers whose width the kernels cannot take
    for name, lin in tqdm(linear_layers(model), desc=f"{mode}", unit="layer", disable=None, leave=False):
        w = lin.weight.data
        if mode == "int8":
            q = WeightOnlyInt8Linear(lin.in_features, lin.out_features, w.dtype).to(w.device)
            q.weight, q.scales = quantize_int8(w)
        elif not int4_fits(lin.in_features, groupsize):
            kept.append(f"{name}: {lin.in_features}")
            continue
        else:
            q = int4_layer(lin, *quantize_int4(w, groupsize))
        set_module(model, name, q)
    if kept:
        print(
            f"note: {len(kept)} layers have input widths not a multiple of {max(groupsize, 32)} "
            f"({kept[0]}{', ...' if len(kept) > 1 else ''}): kept in float"
        )
    if mode == "int8":
        for name, m in list(model.named_modules()):
            if type(m) is ConditionalFeedForward:
                E, I, D = m.w1.shape
                q = ConditionalFeedForwardInt8(E, D, I, m.w1.dtype).to(m.w1.device)
                for wname in ("w1", "w2", "w3"):
                    codes, scales = quantize_int8(getattr(m, wname).data.flatten(0, 1))
                    setattr(q, wname, codes.view_as(getattr(m, wname)))
                    setattr(q, "scales" + wname[1], scales.view(getattr(m, wname).shape[:2]))
                set_module(model, name, q)
    if device is not None:
        prepare_for_device(model, torch.device(device))
    return model


def int4_layer(lin: nn.Linear, packed: Tensor, scales_and_zeros: Tensor) -> "WeightOnlyInt4Linear":
    groupsize = lin.in_features // scales_and_zeros.shape[0]
    q = WeightOnlyInt4Linear(lin.in_features, lin.out_features, groupsize, lin.weight.dtype).to(lin.weight.device)
    q.weight, q.scales_and_zeros = packed, scales_and_zeros
    return q


def check_groupsize(model: nn.Module, groupsize: int) -> None:
    if groupsize not in GROUPSIZES:
        raise ValueError(f"groupsize {groupsize} is not one of {GROUPSIZES}")
    if not any(int4_fits(lin.in_features, groupsize) for _, lin in linear_layers(model)):
        widths = sorted({lin.in_features for _, lin in linear_layers(model)})
        raise ValueError(f"groupsize {groupsize} divides none of the layer widths {widths}: use a smaller --groupsize")


def convert_for_checkpoint(model: Transformer, state_dict: dict) -> None:
    """Swap in quantized layers wherever the state dict holds quantized tensors (detected by content)."""
    for name, lin in linear_layers(model):
        w = state_dict.get(name + ".weight")
        if w is not None and w.dtype == torch.int8 and name + ".scales" in state_dict:
            set_module(
                model, name, WeightOnlyInt8Linear(lin.in_features, lin.out_features, state_dict[name + ".scales"].dtype)
            )
        elif name + ".scales_and_zeros" in state_dict:
            sz = state_dict[name + ".scales_and_zeros"]
            if w is None or w.dtype != torch.uint8 or w.dim() != 2:
                raise ValueError(
                    f"{name}: int4 weights packed for one device by an older gpt-fast "
                    f"({tuple(w.shape) if w is not None else None}, "
                    f"{w.dtype if w is not None else None}): re-run quantize.py on model.pth"
                )
            set_module(
                model,
                name,
                WeightOnlyInt4Linear(lin.in_features, lin.out_features, lin.in_features // sz.shape[0], sz.dtype),
            )
    for name, m in list(model.named_modules()):
        if type(m) is ConditionalFeedForward and state_dict.get(name + ".w1", torch.empty(0)).dtype == torch.int8:
            E, I, D = m.w1.shape
            set_module(model, name, ConditionalFeedForwardInt8(E, D, I, state_dict[name + ".scales1"].dtype))


def prepare_for_device(model: nn.Module, device) -> None:
    """Repack each int4 layer not yet packed (kernels.use_kernels takes those for our GEMV first) for torch's int4
    kernel on its device; once: idempotent."""
    device = torch.device(device)
    int4 = [m for m in model.modules() if type(m) is WeightOnlyInt4Linear and m.packed is None]
    for m in int4:
        repack_int4(m, device)
    if any(m.kernel == "tinygemm" and not m.dequant_prefill for m in int4):
        print(
            "note: this torch packs int4 weights in a layout quantize.tinygemm_codes does not read: "
            "long prompts run on tinygemm (slower)"
        )


def repack_int4(m: WeightOnlyInt4Linear, device: torch.device) -> None:
    """The checkpoint's int4 layout -> torch's kernel's; the checkpoint copy is dropped (a prepared model is for
    inference, not for saving). On CUDA tinygemm with 2 inner k-tiles (batch 1: faster per layer than 8), whose
    prefill (over DEQUANT_MIN_ROWS rows) dequantizes from tinygemm's layout: tinygemm re-reads the weights for
    every 16 rows, which makes long prompts several times slower."""
    m.kernel = "tinygemm" if device.type == "cuda" else "cpu"
    if not int4_fits(m.in_features, m.groupsize) or m.out_features % 16:  # torch's packing needs N % 16
        m.kernel = "reference"
    if m.kernel == "tinygemm":
        m.packed = torch.ops.aten._convert_weight_to_int4pack(m.weight.to(device), 2)
        # prefill reads the codes back out of torch's layout: only if this torch packs as tinygemm_codes expects
        m.dequant_prefill = torch.equal(
            tinygemm_codes(m.packed[:1]), unpack_int4(m.weight[:8].to(device)).to(torch.uint8)
        )
    elif m.kernel == "cpu":
        m.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(m.weight.cpu()), 1)
    if m.packed is not None:
        m.weight = m.weight.new_empty(0)


# ---------------------------------------------------------------- checkpoint files


def load_checkpoint(checkpoint_path) -> dict:
    """A state dict, read memory-mapped and without running code (weights_only)."""
    try:
        return torch.load(str(checkpoint_path), mmap=True, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many kinds for a bad zip, pickle or storage
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"cannot read checkpoint {checkpoint_path} (corrupt, truncated or not a state dict?): {reason}"
        ) from None


def check_state_dict(model: nn.Module, state_dict: dict, config_name: str = "") -> None:
    """One-line ValueError when the checkpoint's keys or shapes do not fit the model's config."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(s)}"
        for k, s in expected.items()
        if k in state_dict and state_dict[k].shape != s
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{name}: {items[:3]}{' ...' if len(items) > 3 else ''}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if items
        ]
        raise ValueError(f"checkpoint does not match the model config{config_name}: " + "; ".join(parts))


def read_state_dict(checkpoint_path: Path) -> dict:
    """The checkpoint's tensors, memory-mapped, with torch.compile's key prefix removed."""
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.is_dir():
        raise FileNotFoundError(
            f"{checkpoint_path} is a folder: pass the model file in it, e.g. {checkpoint_path / 'model.pth'}"
        )
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    state_dict = load_checkpoint(checkpoint_path)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{checkpoint_path} holds a {type(state_dict).__name__}, not a state dict")
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}


def save_model(state_dict: dict, args: ModelArgs, out_dir: Path) -> Path:
    """model.pth and model_config.json into out_dir, as the converters write a model; returns model.pth's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(state_dict, out_dir / "model.pth")
    save_atomic((json.dumps(asdict(args), indent=2) + "\n").encode(), out_dir / "model_config.json")
    return out_dir / "model.pth"


def quantized_format(state_dict: dict) -> Optional[str]:
    """'int8' or 'int4' when the state dict holds quantized weights (read from the tensors, as loading does)."""
    if any(k.endswith(".scales_and_zeros") for k in state_dict):
        return "int4"
    if any(isinstance(v, Tensor) and v.dtype == torch.int8 for v in state_dict.values()):
        return "int8"
    return None


def load_checkpoint_model(checkpoint_path) -> Transformer:
    """The plain model of a checkpoint, its config beside it, weights on the CPU (memory-mapped) in the checkpoint's
    dtype; quantized layers wherever the tensors are quantized. No kernels, no device: generate.place does that."""
    checkpoint_path = Path(checkpoint_path)
    state_dict = read_state_dict(checkpoint_path)
    args = ModelArgs.from_checkpoint(checkpoint_path)
    tied = args.tie_embeddings and "output.weight" not in state_dict  # a quantized output layer has its own weights
    if tied and "tok_embeddings.weight" in state_dict:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    with torch.device("meta"):
        model = Transformer(args)
    convert_for_checkpoint(model, state_dict)
    check_state_dict(model, state_dict, f" ({checkpoint_path.parent / 'config'})")
    model.load_state_dict(state_dict, assign=True)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def save_atomic(obj, path: Path, save: Optional[Callable] = None) -> None:
    """save(obj, file) (default: the bytes of obj as they are, else torch.save) into a temporary file beside path,
    renamed onto path only once complete: an interrupted or failed write leaves path as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if save is None:
                save = (lambda data, f: f.write(data)) if isinstance(obj, bytes) else torch.save
            save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output gets a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- GPTQ


class HessianHook:
    """Accumulates H = 2 X^T X / n over the inputs X of the linear layers it is attached to."""

    def __init__(self, layers: list):
        self.H, self.n = {}, {}
        self.handles = [lin.register_forward_hook(self.hook(name)) for name, lin in layers]

    def hook(self, name):
        def fn(_module, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            n = self.n.get(name, 0)
            H = self.H.get(name, torch.zeros(x.shape[1], x.shape[1], device=x.device))
            self.H[name] = H * (n / (n + x.shape[0])) + (x.t() @ x) * (2.0 / (n + x.shape[0]))
            self.n[name] = n + x.shape[0]

        return fn

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def gptq_quantize_model(model: Transformer, inputs: Tensor, groupsize: int) -> None:
    """GPTQ block by block: each block's layers are calibrated on the outputs of the already quantized blocks
    before it, so memory holds one block's Hessians at a time. inputs: calibration tokens [B, S]."""
    model.setup_caches(inputs.shape[0], inputs.shape[1])
    input_pos = torch.arange(inputs.shape[1], device=inputs.device)
    mask, freqs = model.causal_mask[None, None, input_pos], model.freqs_cis[input_pos]
    x = model.tok_embeddings(inputs)  # [B, S, dim]
    stages = [(f"layers.{i}", b, lambda b, x: b(x, input_pos, freqs, mask)) for i, b in enumerate(model.layers)]
    stages.append(("", model, lambda m, x: m.output(m.norm(x))))
    for prefix, module, run in tqdm(stages, desc="GPTQ", unit="block", disable=None, leave=False):
        layers = [(n, m) for n, m in linear_layers(module) if prefix or n == "output"]
        layers = [(n, m) for n, m in layers if int4_fits(m.in_features, groupsize)]
        hooks = HessianHook(layers)
        run(module, x)
        hooks.remove()
        for name, lin in layers:
            set_module(module, name, int4_layer(lin, *gptq_quantize(lin.weight.data, hooks.H[name], groupsize)))
        if prefix:
            x = run(module, x)


@torch.no_grad()
def gptq_quantize(
    w: Tensor, H: Tensor, groupsize: int, blocksize: int = 128, damp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022): quantize columns in order, pushing each one's error onto the columns not yet
    quantized through the inverse Hessian; group parameters are set from the updated weights of each group."""
    W = w.float().clone()  # [N, K]
    N, K = W.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    blocksize = max(blocksize // groupsize, 1) * groupsize  # groups never straddle blocks
    Q = torch.zeros_like(W, dtype=torch.int32)
    scales, zeros = (
        torch.zeros(N, K // groupsize, dtype=W.dtype, device=W.device),
        torch.zeros(N, K // groupsize, dtype=W.dtype, device=W.device),
    )
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Hinv1, Err1 = (
            W[:, i1:i2].clone(),
            Hinv[i1:i2, i1:i2],
            torch.zeros(N, i2 - i1, dtype=W.dtype, device=W.device),
        )
        for i in range(i2 - i1):
            col = i1 + i
            g = col // groupsize
            if col % groupsize == 0:
                s, z = int4_group_params(W1[:, i : i + groupsize], groupsize)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            q = torch.clamp(torch.round((W1[:, i] - zeros[:, g]) / scales[:, g]) + 8, 0, 15)
            Q[:, col] = q.to(torch.int32)
            err = (W1[:, i] - ((q - 8) * scales[:, g] + zeros[:, g])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return pack_int4(Q, scales.float(), zeros.float(), w.dtype)


def calibration_tokens(path: Path, tokenizer, n_samples: int, seq_len: int) -> Tensor:
    """n_samples windows of seq_len tokens from a local text file -> [n, S]."""
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), bos=False)
    if len(ids) < seq_len:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than --calibration_seq_len {seq_len}")
    step = max((len(ids) - seq_len) // max(n_samples - 1, 1), 1)
    rows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, step)][:n_samples]
    return torch.tensor(rows, dtype=torch.int)


# ---------------------------------------------------------------- command line


def output_path(checkpoint_path: Path, mode: str, groupsize: int) -> Path:
    name = "model_int8.pth" if mode == "int8" else f"model_{mode}.g{groupsize}.pth"
    return checkpoint_path.parent / name


def unquantized_weights(state_dict: dict, mode: str, groupsize: int) -> list[str]:
    """Float matmul weights that mode should have quantized: every one but the embedding, except, for int4, those
    whose width int4_fits refuses and Mixtral's experts (int4 covers linear layers only)."""
    left = []
    for k, v in state_dict.items():
        if not v.is_floating_point() or v.dim() < 2 or k == "tok_embeddings.weight":
            continue
        if mode != "int8" and (v.dim() == 3 or not int4_fits(v.shape[-1], groupsize)):
            continue
        left.append(k)
    return left


def quantize_checkpoint(checkpoint_path: Path, out: Path, mode: str, groupsize: int, device, gptq_inputs=None) -> None:
    """Quantize a float checkpoint on device and write it to out. The weights keep the checkpoint's dtype until the
    quantizers, which work in float32: the same codes on every device."""
    fmt = quantized_format(read_state_dict(checkpoint_path))
    if fmt is not None:
        raise ValueError(f"{checkpoint_path} is already quantized ({fmt}): start from the float model.pth")
    if Path(out).resolve() == Path(checkpoint_path).resolve():
        raise ValueError(f"the output {out} would overwrite the input: start from the float model.pth")
    model = load_checkpoint_model(checkpoint_path)
    quantize_model(model.to(device), mode, groupsize, gptq_inputs=gptq_inputs)
    state_dict = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()
    }
    left = unquantized_weights(state_dict, mode, groupsize)
    if left:  # a model with kernels swapped in hides its linear layers from the quantizer
        raise ValueError(f"{len(left)} weights were not quantized to {mode} ({left[0]}, ...): nothing written")
    save_atomic(state_dict, out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Quantize a model.pth to int8 or int4 weights.")
    p.add_argument(
        "--checkpoint_path",
        type=Path,
        default=Path("checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth"),
        help="the bf16 model.pth to quantize",
    )
    p.add_argument(
        "--mode",
        choices=["int8", "int4", "int4-gptq"],
        default="int8",
        help="int8 per-channel, int4 groupwise, or int4 with GPTQ",
    )
    p.add_argument("--groupsize", type=int, default=32, help=f"int4 group size, one of {GROUPSIZES}")
    p.add_argument("--calibration_file", type=Path, default=None, help="int4-gptq: local text file to calibrate on")
    p.add_argument("--calibration_samples", type=int, default=32, help="int4-gptq: number of calibration windows")
    p.add_argument(
        "--calibration_seq_len",
        type=int,
        default=None,
        help="int4-gptq: tokens per calibration window (default: 512, or the model's context if shorter)",
    )
    p.add_argument(
        "--device",
        type=str,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run the quantization",
    )
    args = p.parse_args(argv)
    if args.mode == "int4-gptq" and (args.calibration_file is None or not args.calibration_file.is_file()):
        raise SystemExit(
            f"error: int4-gptq needs --calibration_file pointing to a local text file (got {args.calibration_file})"
        )
    if args.mode != "int8" and args.groupsize not in GROUPSIZES:
        raise SystemExit(f"error: --groupsize {args.groupsize} is not one of {GROUPSIZES}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible: pass --device cpu")
    out = output_path(args.checkpoint_path, args.mode, args.groupsize)
    from tokenizer import find_tokenizer, get_tokenizer

    t0 = time.time()
    try:
        inputs = None
        if args.mode == "int4-gptq":
            context = ModelArgs.from_checkpoint(args.checkpoint_path).block_size
            args.calibration_seq_len = args.calibration_seq_len or min(512, context)
            if args.calibration_seq_len > context:
                raise ValueError(
                    f"--calibration_seq_len {args.calibration_seq_len} exceeds the model's context {context}"
                )
            tok = get_tokenizer(find_tokenizer(args.checkpoint_path.parent))
            inputs = calibration_tokens(
                args.calibration_file, tok, args.calibration_samples, args.calibration_seq_len
            ).to(args.device)
        quantize_checkpoint(args.checkpoint_path, out, args.mode, args.groupsize, args.device, inputs)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Wrote {out} in {time.time() - t0:.1f} s ({out.stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
