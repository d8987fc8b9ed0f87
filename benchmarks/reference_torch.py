"""A plain PyTorch implementation of iclsim's default training, the peer baseline of
``reference_speedup``: one-layer linear attention (1/n scaling, same parameter shapes and
initialisation scale) trained on isotropic IID prompts with Adam and the same warmup-cosine
schedule, a fresh batch of prompts drawn token by token every step, eager mode, float32.

Run alone: ``python benchmarks/reference_torch.py --n 20 --steps 500``. Needs the optional
extra ``pip install -e '.[reference]'`` (torch).
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def train(dim: int, n: int, steps: int, batch: int = 512, lr: float = 1e-2, warmup: int = 200,
          final_lr_fraction: float = 1e-3, noise_var: float = 0.0, seed: int = 0) -> float:
    """Train and return the mean loss of the last 10% of steps."""
    torch.manual_seed(seed)
    D = dim + 1
    Wq = (torch.randn(D, D) * D**-0.5).requires_grad_()
    Wk = torch.randn(D, D) * D**-0.5
    Wk[dim] = 0.0
    Wk.requires_grad_()
    Wv = torch.randn(D, D) * D**-0.5
    Wv[:dim, dim] = 0.0
    Wv.requires_grad_()
    opt = torch.optim.Adam([Wq, Wk, Wv], lr=lr)
    warm = min(warmup, steps - 1)

    def schedule(step):  # optax.warmup_cosine_decay_schedule(0, lr, warm, steps, lr * final)
        if step < warm:
            return step / warm
        t = (step - warm) / max(steps - warm, 1)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    for _ in range(steps):
        beta = torch.randn(batch, dim)
        X = torch.randn(batch, n, dim)
        x = torch.randn(batch, dim)
        y = torch.einsum("bnd,bd->bn", X, beta) + math.sqrt(noise_var) * torch.randn(batch, n)
        yq = torch.einsum("bd,bd->b", x, beta) + math.sqrt(noise_var) * torch.randn(batch)
        Z = torch.cat([X, y[..., None]], dim=-1)
        zq = torch.cat([x, torch.zeros(batch, 1)], dim=-1)
        S = torch.einsum("bni,bnj->bij", Z, Z) / n
        pred = torch.einsum("bi,bij,j->b", (zq @ Wq) @ Wk.T, S, Wv[:, -1])
        loss = torch.mean((yq - pred) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    tail = losses[-max(steps // 10, 1):]
    return sum(tail) / len(tail)


def timed_train(**kwargs) -> tuple[float, float]:
    """(wall seconds, final loss)."""
    start = time.perf_counter()
    loss = train(**kwargs)
    return time.perf_counter() - start, loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    seconds, loss = timed_train(dim=args.dim, n=args.n, steps=args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {seconds:.2f} s, "
          f"{args.steps * 512 / seconds:.3g} prompts/s, final loss {loss:.4f}")
