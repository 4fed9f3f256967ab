"""Tokenizer-compression benchmark cases (issue 4): compress_tokens / expand_tokens (GEMM-bound, TFLOP/s) and
pack_latents / unpack_latents (memory-bound, GB/s), against their peers.

Sizes: Cheers' tokenizer, 32x32 ViT tokens x 1152 channels -> 16x16 tokens x 4608 (LayerNorm -> 2x2
space-to-depth -> Linear(4608 -> 4608) -> GELU) and its head's inverse (Linear(1536 -> 4 x 1152) -> 2x2
depth-to-space); 64 images on a GPU (the issue's target size) and 1 / 8; on the CPU a smaller sweep (1 and 4
images at Cheers' widths, 1 and 8 images at a narrower 384 -> 1536 projection).  Latents: 32 x 32 x 32 packed 2x2.

Peers, per GEMM case:
  umm_ops   the public op, automatic backend (CPU: fused gather + MKL GEMM + fused epilogue; CUDA: the CuTe
            gather-GEMM)
  umm_ops[triton]  the Triton gather-GEMM (GPU only)
  eager     F.layer_norm -> reshape/permute/reshape -> F.linear -> F.gelu, in the input dtype
  compile   torch.compile of the eager chain
  mm        torch.mm on the PRE-UNFOLDED, pre-normalised tensor (A @ W^T, no bias, no activation): the plain GEMM
            whose rate the fused op should approach (fwd+bwd: the three GEMMs A W^T, dY W and dY^T A)
TokensCase.flops = 2 M K N (fwd), x 3 for fwd+bwd; bench/run.py turns it into TFLOP/s and the fraction of the
plain GEMM's rate (mm time / op time).
Case.bytes: the ideal traffic (x, W read and out written once; + grad read, dx / dW written for fwd+bwd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import umm_ops
from cases import Case, _esize, _with_backward


@dataclass
class TokensCase(Case):
    flops: float = 0.0

    @property
    def extra_info(self) -> dict:
        """Copied into pytest-benchmark's extra_info by bench/conftest.py (read by bench/run.py)."""
        return {"flops": self.flops}


def s2d(x, H, W, f=2):
    n, _, c = x.shape
    return x.reshape(n, H // f, f, W // f, f, c).permute(0, 1, 3, 2, 4, 5).reshape(n, (H // f) * (W // f), f * f * c)


def d2s(y, H, W, f=2):
    n, _, cf = y.shape
    c = cf // (f * f)
    return y.reshape(n, H // f, W // f, f, f, c).permute(0, 1, 3, 2, 4, 5).reshape(n, H * W, c)


def eager_compress(x, lw, lb, w, b, H=32, W=32):
    xn = F.layer_norm(x, (x.shape[-1],), lw, lb, 1e-6)
    return F.gelu(F.linear(s2d(xn, H, W), w, b))


def eager_expand(y, w, b, H=32, W=32):
    return d2s(F.linear(y, w, b), H, W)


def eager_pack(z, rm, rv, f=2):
    B, C, H, W = z.shape
    t = z.reshape(B, C, H // f, f, W // f, f).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // f) * (W // f), C * f * f)
    return ((t.float() - rm) * torch.rsqrt(rv + 1e-4)).to(z.dtype)


def eager_unpack(t, rm, rv, H=32, W=32, f=2):
    B, _, K = t.shape
    C = K // (f * f)
    z = (t.float() * torch.sqrt(rv + 1e-4) + rm).to(t.dtype)
    return z.reshape(B, H // f, W // f, C, f, f).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _mm_chain(bwd):
    """The plain GEMMs of the same problem on a pre-unfolded A: fwd A W^T; fwd+bwd also dY W and dY^T A."""
    def run(a, w, dy):
        y = torch.mm(a, w.t())
        if not bwd:
            return y
        return y, torch.mm(dy, w), torch.mm(dy.t(), a)
    return run


def make_tokens_cases(device: str, quick: bool, dtypes=None) -> list[Case]:
    """dtypes: override the GEMM cases' dtypes (default: bf16 (+ fp16) on a GPU, fp32 on the CPU)."""
    on_gpu = device == "cuda"
    H = W = 32
    f = 2
    if on_gpu:
        configs = [(1152, 4608, 1536, [8] if quick else [1, 8, 64])]
        dtypes_default = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16]
    else:
        configs = ([(384, 1536, 512, [1])] if quick else
                   [(384, 1536, 512, [1, 8]), (1152, 4608, 1536, [1, 4])])
        dtypes_default = [torch.float32]
    dtypes = dtypes or dtypes_default
    with_triton = on_gpu and umm_ops.backends()["triton"]["runnable"]
    cases: list[Case] = []
    for dtype in dtypes:
        es = _esize(dtype)
        for C, Co, Ci, images in configs:
            K = f * f * C
            for n in images:
                M = n * (H // f) * (W // f)
                T = n * H * W
                r = lambda *s, dt=dtype: torch.randn(*s, device=device, dtype=dt)  # noqa: E731

                for direction in ("fwd", "fwd+bwd"):
                    bwd = direction == "fwd+bwd"

                    def c_inputs(n=n, C=C, Co=Co, K=K, r=r, bwd=bwd):
                        ins = (r(n, H * W, C), 1 + 0.1 * r(C), 0.1 * r(C), r(Co, K) / K**0.5, 0.1 * r(Co))
                        return tuple(t.requires_grad_(True) for t in ins) if bwd else ins

                    def umm_c(x, lw, lb, w, b):
                        return umm_ops.compress_tokens(x, (H, W), lw, lb, w, b, factor=f)

                    impls = {"umm_ops": umm_c, "eager": eager_compress, "compile": _compiled(eager_compress)}
                    if with_triton:
                        def tri(*a):
                            with umm_ops.use_backend("triton"):
                                return umm_c(*a)
                        impls["umm_ops[triton]"] = tri
                    if bwd:
                        impls = {k: _with_backward(fn, 5) for k, fn in impls.items()}
                    flops = 2.0 * M * K * Co * (3 if bwd else 1)
                    nbytes = (T * C + Co * K + M * Co) * es * (1 if not bwd else 2)
                    shape = f"({n}, {H}x{W}, {C}) -> ({n}, {M // n}, {Co})"
                    op = f"compress_tokens[{C}->{Co}]"  # the widths are part of the case id (several sweeps)
                    cases.append(TokensCase(op, direction, n, dtype, device, shape, nbytes, c_inputs,
                                            impls, flops=flops))
                    mm = _mm_chain(bwd)
                    cases.append(TokensCase(op, direction, n, dtype, device, shape, nbytes,
                                            lambda M=M, K=K, Co=Co, r=r: (r(M, K), r(Co, K) / K**0.5, r(M, Co)),
                                            {"mm": mm}, flops=flops))

                    def e_inputs(n=n, C=C, Ci=Ci, K=K, r=r, bwd=bwd):
                        ins = (r(n, (H // f) * (W // f), Ci), r(K, Ci) / Ci**0.5, 0.1 * r(K))
                        return tuple(t.requires_grad_(True) for t in ins) if bwd else ins

                    def umm_e(y, w, b):
                        return umm_ops.expand_tokens(y, (H, W), w, b, factor=f)

                    impls = {"umm_ops": umm_e, "eager": eager_expand, "compile": _compiled(eager_expand)}
                    if with_triton:
                        def tri_e(*a):
                            with umm_ops.use_backend("triton"):
                                return umm_e(*a)
                        impls["umm_ops[triton]"] = tri_e
                    if bwd:
                        impls = {k: _with_backward(fn, 3) for k, fn in impls.items()}
                    eflops = 2.0 * M * Ci * K * (3 if bwd else 1)
                    ebytes = (M * Ci + K * Ci + T * C) * es * (1 if not bwd else 2)
                    eshape = f"({n}, {M // n}, {Ci}) -> ({n}, {H}x{W}, {C})"
                    eop = f"expand_tokens[{Ci}->4x{C}]"
                    cases.append(TokensCase(eop, direction, n, dtype, device, eshape, ebytes, e_inputs,
                                            impls, flops=eflops))
                    cases.append(TokensCase(eop, direction, n, dtype, device, eshape, ebytes,
                                            lambda M=M, K=K, Ci=Ci, r=r: (r(M, Ci), r(K, Ci) / Ci**0.5, r(M, K)),
                                            {"mm": _mm_chain(bwd)}, flops=eflops))
    # latent packing (memory-bound): Cheers' VAE latents 32 channels at 32 x 32, packed 2x2 -> 256 x 128
    lat_images = ([8] if quick else [8, 64]) if on_gpu else ([4] if quick else [4, 32])
    for dtype in ([torch.bfloat16] if on_gpu else [torch.float32]):
        es = _esize(dtype)
        for n in lat_images:
            Cl = 32
            rm = torch.randn(Cl * 4, device=device)
            rv = torch.rand(Cl * 4, device=device) + 0.5

            def z_in(n=n, dtype=dtype):
                return (torch.randn(n, Cl, H, W, device=device, dtype=dtype),)

            def t_in(n=n, dtype=dtype):
                return (torch.randn(n, (H // 2) * (W // 2), Cl * 4, device=device, dtype=dtype),)

            nbytes = 2 * n * Cl * H * W * es
            cases.append(Case("pack_latents", "fwd", n, dtype, device, f"({n}, {Cl}, {H}, {W})", nbytes, z_in,
                              {"umm_ops": lambda z, rm=rm, rv=rv: umm_ops.pack_latents(z, rm, rv),
                               "eager": lambda z, rm=rm, rv=rv: eager_pack(z, rm, rv),
                               "compile": _compiled(lambda z, rm=rm, rv=rv: eager_pack(z, rm, rv))}))
            cases.append(Case("unpack_latents", "fwd", n, dtype, device, f"({n}, 256, {Cl * 4})", nbytes, t_in,
                              {"umm_ops": lambda t, rm=rm, rv=rv: umm_ops.unpack_latents(t, (H, W), rm, rv),
                               "eager": lambda t, rm=rm, rv=rv: eager_unpack(t, rm, rv),
                               "compile": _compiled(lambda t, rm=rm, rv=rv: eager_unpack(t, rm, rv))}))
    return cases
