"""Does the compiled decode step compute what the eager model computes? Check it after changing inductor
settings or kernels, on the GPU that will run them.

Teacher-forced: the eager model decodes greedily, quantized layers on the plain PyTorch path (no Triton
kernels); then the decode step compiled as generate.py compiles it (CUDA graphs, the same inductor settings,
the --kernels chosen) runs on the same tokens, and each step's logits are compared with the eager ones. bf16
rounding shows as a relative error of ~1e-2; a race between kernels or a wrong kernel as one of order 1. Each
--pdl setting (programmatic dependent launch) is compiled afresh.

    python scripts/check_compiled.py --random_init 7B --n_layer 4 [--quantize int8] [--kernels torch]
        [--no-compile_layer_once] [--no-attention_kernel]
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as g  # noqa: E402
import kernels  # noqa: E402
import quantize  # noqa: E402
from model import ModelArgs, Transformer, run_layer  # noqa: E402


@torch.no_grad()
def stepped_logits(step, model: Transformer, prompt: Tensor, tokens: Tensor) -> Tensor:
    """Prefill prompt [T] eagerly, then feed tokens [n] one by one through step(model, x, input_pos):
    the float32 logits [n, V] of each step. The caches must already hold T + n positions."""
    T = prompt.numel()
    model(prompt.view(1, -1), torch.arange(T, device=prompt.device), prefill=True)
    out = []
    for i, t in enumerate(tokens):
        with sdpa_kernel(SDPBackend.MATH):  # as generate.decode_n_tokens
            logits = step(model, t.view(1, 1), torch.tensor([T + i], device=prompt.device))
        out.append(logits[0, -1].float().clone())  # CUDA-graph outputs are overwritten by the next replay
    return torch.stack(out)


def compare(ref: Tensor, got: Tensor) -> tuple[float, float]:
    """(worst step's max |got - ref| / max |ref|, share of steps whose argmax agrees), over logits [n, V]."""
    err = ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max()
    return float(err), float((got.argmax(-1) == ref.argmax(-1)).float().mean())


def compiled_step(pdl: bool):
    """generate.py's inductor settings and decode compilation, with PDL on or off; a fresh compile."""
    g.set_inductor_options("cuda", pdl)
    torch._dynamo.reset()
    return torch.compile(g.model_forward, mode="reduce-overhead", fullgraph=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Compare the compiled decode step's logits with the eager model's (GPU).")
    p.add_argument("--random_init", default="7B", metavar="MODEL_NAME", help="named config of the random model")
    p.add_argument("--n_layer", type=int, default=4, help="layers to keep (fewer compile faster; every layer is alike)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None, help="quantize the random weights in memory")
    p.add_argument(
        "--kernels", choices=["auto", "gemv", "torch"], default="auto", help="matmul kernels, as generate.py's flag"
    )
    p.add_argument(
        "--compile_layer_once",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as generate.py's flag (on by default): one compiled layer reused for all",
    )
    p.add_argument(
        "--attention_kernel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as generate.py's flag (on by default on one GPU): decode attention as one Triton kernel",
    )
    p.add_argument("--steps", type=int, default=32, help="decode steps compared")
    p.add_argument(
        "--pdl",
        choices=["off", "on", "both"],
        default="both",
        help="programmatic dependent launch (inductor's kernels and our int8 kernels)",
    )
    p.add_argument("--tol", type=float, default=0.05, help="largest relative logit error accepted")
    p.add_argument("--seed", type=int, default=0, help="weights and prompt")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: no GPU visible: this check compiles CUDA graphs")
    device = torch.device("cuda")
    config = dataclasses.replace(ModelArgs.from_name(args.random_init), n_layer=args.n_layer)
    model = g.random_model(config, device, torch.bfloat16, args.seed)
    if args.quantize:
        quantize.quantize_model(model, args.quantize, 32)
    # int4 packed for the kernels
    model = g.place(model, device, torch.bfloat16, use_tp=False, kernels_mode=args.kernels)
    kernels.use_triton_kernels(model, "torch", pdl=False)  # the reference: the plain PyTorch paths, no Triton kernels
    kernels.store_hidden(model)  # as generate.py compiles
    model.decode_layer = g.run_layer_once if args.compile_layer_once else run_layer  # eager, a plain call
    prompt = torch.randint(3, 32000, (16,), generator=torch.Generator().manual_seed(args.seed)).int().to(device)
    model.setup_caches(max_batch_size=1, max_seq_length=prompt.numel() + args.steps)
    tokens = g.generate(model, prompt, args.steps, temperature=0)[0][0, prompt.numel() :]  # eager greedy
    ref = stepped_logits(g.model_forward, model, prompt, tokens)
    worst = 0.0
    for pdl in {"off": [False], "on": [True], "both": [False, True]}[args.pdl]:
        kernels.use_triton_kernels(model, args.kernels, pdl)  # our kernels, launched with PDL or not
        if args.attention_kernel and not kernels.use_decode_attention_kernel(model, pdl):
            raise SystemExit("error: --attention_kernel does not fit this model's head sizes")
        err, agree = compare(ref, stepped_logits(compiled_step(pdl), model, prompt, tokens))
        worst = max(worst, err)
        print(
            f"pdl {'on' if pdl else 'off'}: max relative logit error {err:.2e} over {args.steps} steps; "
            f"argmax agrees on {100 * agree:.0f}%"
        )
    if worst > args.tol:
        raise SystemExit(f"error: compiled decode differs from eager by {worst:.2e} > --tol {args.tol}")


if __name__ == "__main__":
    main()
